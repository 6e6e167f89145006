"""Records -> training samples, lazily: a sample is tokenised and its media decoded when it is asked for.

:class:`SampleBuilder` turns one :class:`~mimo_spec.data.records.Record` into a sample in two steps:

- ``encode(record)``: the text only (chat template, placeholder runs, the length limit) plus what the
  media need (how many items each audio file becomes, read from its header; the placeholder count of
  each native-resolution image or video, from its header or container: each ``<image>`` / ``<video>``
  tag becomes a run of its own item's length; ``data.image_wrap`` / ``video_wrap`` / ``audio_wrap`` put
  their [before, after] ids around every run, e.g. Qwen's ``<|vision_start|>`` ... ``<|vision_end|>``;
  under Qwen3-VL's layout, ``data.qwen_vl``, a video's tag becomes per frame group its ``<1.5 seconds>``
  timestamp text, the wrap and that group's placeholders, as transformers' Qwen3VLProcessor expands it).
  Cheap: the packer asks every sample's length with it before any media is decoded.
- ``build(encoded)``: decodes the images, videos and audio into encoder inputs (in a DataLoader worker),
  checking each native item makes the count planned for it.

:class:`RecordDataset` is the map-style dataset of a record source (``mimo_spec.data.sources``):
``dataset[i]`` is sample ``i`` built on access, ``dataset.token_length(i)`` its token count without
decoding anything. A record that cannot be used raises :class:`~mimo_spec.errors.DataError` naming
it (bad JSON, a missing or undecodable file); one longer than ``data.max_seq_len`` under
``truncation: drop`` raises :class:`Dropped`. The loader skips both (``data.on_bad_sample``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from mimo_spec.data.config import max_length
from mimo_spec.data.media import MediaProcessor
from mimo_spec.data.records import Media, Record
from mimo_spec.data.tokenizer import Tag, encode_conversation, reserved_token_ids
from mimo_spec.errors import ConfigError, DataError, InputError, Problem
from mimo_spec.loss import IGNORE_INDEX

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Dropped(DataError):
    """A readable sample left out on purpose: longer than ``data.max_seq_len`` (``truncation: drop``), or
    cut inside an item's placeholders (``truncation: truncate``). ``reason``: ``too_long`` or
    ``cut_inside_placeholders``."""

    def __init__(self, reason: str, where: str, length: int, limit: int):
        self.reason = reason
        super().__init__(f"{reason.replace('_', ' ')}: {length} tokens, the limit is {limit}", path=where,
                         hint="raise data.max_seq_len, or truncation: truncate")


def short(value, size: int = 80) -> str:
    """A bounded repr for messages: never recurses far into nested data, never prints more than ``size``."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, size, size
    return r.repr(value)[:size]


@dataclass
class Encoded:
    """A record's text, tokenised: ``input_ids`` / ``labels`` (equal length), the media each modality's
    placeholder runs stand for (in order), and ``where`` / ``file`` / ``id`` for messages and logs.
    ``audio_cut``: audio files cut to the encoder's window (``audio_overflow: truncate``)."""

    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[tuple[str, Media]]]  # modality -> [(kind "image" | "video" | "audio", media)]
    where: str
    file: str = ""
    id: str | None = None
    truncated: bool = False
    audio_cut: int = 0
    extra: dict = field(default_factory=dict)
    # native-resolution modalities: the placeholder count of each item (planned from headers), and what
    # decoding each needs (a video's frames and grid; None for an image)
    item_tokens: dict[str, list[int]] = field(default_factory=dict)
    plans: dict[str, list] = field(default_factory=dict)
    # a preference pair (SampleBuilder.pairs): the rejected conversation's (input_ids, labels); these are the chosen
    rejected: tuple[list[int], list[int]] | None = None
    # output modalities: the files of the items to generate ("output_images" / "output_audios", data/targets.py)
    targets: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


class SampleBuilder:
    """Turns records into samples for one model: its placeholders, its encoders' input geometry, the
    data config's template, tags and length limit. Keeps only ids and shapes (not the model), so it
    pickles cheaply into DataLoader workers."""

    def __init__(self, cfg, model, tokenizer, pairs: bool = False):
        self.cfg, self.tokenizer = cfg, tokenizer
        # preference pairs (train.objective: dpo): every record is a prompt with a chosen and a rejected answer
        self.pairs = bool(pairs)
        self.max_len = max_length(cfg, model)
        self.truncation = getattr(cfg, "truncation", "drop")
        self.reserved = set(reserved_token_ids(model))
        self.media = MediaProcessor(model, **media_options(cfg))
        self.input_modalities = [n for n, m in model.modalities.items() if m.has_input]
        self.tags: dict[str, Tag] = {}
        self.kinds: dict[str, tuple[str, str | None]] = {}  # tag text -> (kind, modality)
        video_token = getattr(cfg, "video_token", "<video>")
        tags = [(cfg.image_token, "image"), (video_token, "video"), (cfg.audio_token, "audio")]
        if len({t for t, _ in tags}) < len(tags):
            raise ConfigError("data.image_token, data.video_token and data.audio_token must differ",
                              path="data.video_token", hint="e.g. <image>, <video>, <audio>")
        for tag, kind in tags:
            name = getattr(self.media, f"{kind}_modality", None)
            self.kinds[tag] = (kind, name)
            if name is not None:
                # a native-resolution modality's tag stands for one placeholder here; encode() widens each
                # run to its own item's count
                length = 1 if self.planned(name) else self.media.tokens_per_item[name]
                self.tags[tag] = Tag(name, model.modalities[name].special_token_id, length)
        # modality -> (ids before, ids after) each of its items' runs (data.image_wrap / video_wrap / audio_wrap)
        self.wraps: dict[str, tuple[list[int], list[int]]] = {}
        for kind in ("image", "video", "audio"):
            wrap, name = getattr(cfg, f"{kind}_wrap", None), getattr(self.media, f"{kind}_modality", None)
            tiling = self.media.tiling if kind == "image" and self.media.is_tiled(name) else None
            if tiling is not None and wrap is not None and tiling.name == "idefics3":
                raise ConfigError("idefics3 tiling writes its own text around each image's tiles; data.image_wrap "
                                  "would wrap every tile", path="data.image_wrap", hint="null")
            if wrap is None and tiling is not None:
                wrap = tiling.wrap  # the scheme's own markers (InternVL's <img> ... </img>)
            if wrap is not None and name is not None:
                self.wraps[name] = wrap_ids(tokenizer, wrap, self.reserved, f"data.{kind}_wrap")
        self._text_ids: dict[str, list[int]] = {}  # timestamp text -> ids (Qwen3-VL's videos)
        from mimo_spec.data.targets import OutputTargets  # items to generate: <gen:NAME> tags and their files

        from pathlib import Path

        folder = lambda key: Path(getattr(cfg, key)) if getattr(cfg, key, None) else None  # noqa: E731
        self.outputs = OutputTargets(model, folder("image_folder"), folder("audio_folder"),
                                     image_resize=getattr(cfg, "image_resize", "pad"),
                                     image_resample=getattr(cfg, "image_resample", "bicubic"),
                                     image_mean=cfg.image_mean)
        self.tags.update(self.outputs.tags)

    # ------------------------------------------------------------------------------ text
    def turns(self, record: Record) -> list[list[str]]:
        """The record's conversation as [[role, text]], checked. Raises DataError naming the record."""
        where, conv = record.where, record.conversations
        if not isinstance(conv, list) or not conv:
            raise DataError("missing or empty 'conversations'", path=where,
                            hint='"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]')
        turns = parse_turns(conv, where)
        if not any(r == "assistant" and v.strip() for r, v in turns):
            pair = "chosen" in (record.extra or {}) and "rejected" in (record.extra or {})
            raise DataError("no assistant answer: nothing to train on", path=where,
                            hint="a preference pair (chosen / rejected answers) trains with train.objective=dpo"
                            if pair else "every sample needs at least one non-empty gpt turn")
        return turns

    def encode(self, record: Record) -> Encoded:
        """The record's tokens and the media its placeholders stand for; no media is decoded (audio headers
        are read when an audio file may become several items; a native-resolution image's header and a
        video's container give their token counts). Raises DataError / :class:`Dropped`.

        Under ``pairs`` (preference training) the record is a prompt with a ``chosen`` and a ``rejected``
        answer (:func:`pair_turns`): the result is the chosen conversation, with the rejected one's ids and
        labels in ``rejected``; each labels its final answer only (the prompt is -100 in both)."""
        if self.pairs:
            return self.encode_pair(record)
        return self._encode(record)

    def encode_pair(self, record: Record) -> Encoded:
        """A preference record -> the chosen conversation's :class:`Encoded` with ``rejected`` set (see
        :meth:`encode`). Both share the prompt and its media (planned from the chosen one; decoded once)."""
        prompt, chosen, rejected = pair_turns(record)
        encoded = []
        for answer in (chosen, rejected):
            conv = [{"from": role, "value": text} for role, text in prompt + [answer]]
            one = self._encode(Record(conversations=conv, images=record.images, audios=record.audios, id=record.id,
                                      where=record.where, file=record.file, extra=record.extra,
                                      videos=record.videos))
            encoded.append(one)
        good, bad = encoded
        if {k: len(v) for k, v in good.media.items()} != {k: len(v) for k, v in bad.media.items()}:
            raise Dropped("cut_inside_placeholders", record.where, max(len(good), len(bad)), self.max_len)
        for enc in encoded:  # the answer alone is scored: the last run of trained labels
            enc.labels = answer_labels(enc.labels)
        good.rejected = (bad.input_ids, bad.labels)
        good.truncated = good.truncated or bad.truncated
        return good

    def _encode(self, record: Record) -> Encoded:
        where = record.where
        turns = self.turns(record)
        media: dict[str, list[tuple[str, Media]]] = {}
        counts: dict[str, list[int]] = {}  # native-resolution modalities: each item's placeholder count
        plans: dict[str, list] = {}  # ... and what decoding it needs (a video's frames), known already
        audio_cut = 0
        for tag, items, one in ((self.cfg.image_token, record.images, "image"),
                                (getattr(self.cfg, "video_token", "<video>"), getattr(record, "videos", []), "video"),
                                (self.cfg.audio_token, record.audios, "audio")):
            kind, name = self.kinds[tag]
            n_tags = sum(t[1].count(tag) for t in turns)
            if (items or n_tags) and name is None:  # the model's fault, not the sample's: never skipped
                example = {"image": "vision_clip", "audio": "audio_whisper", "video": "a video modality"}[one]
                raise ConfigError(f"the sample has {one} input but the model has no {one} modality", path=where,
                                hint=f"add one, e.g. modality=[{example}], or remove the {one} samples"
                                if one != "video" else "add a modality with item_kind: video (it may share the "
                                                       "image tower), or remove the video samples")
            if items and n_tags == 0:  # LLaVA: the files go in front of the first user turn
                first = next((t for t in turns if t[0] == "user"), turns[0])
                first[1] = f"{tag}\n" * len(items) + first[1]
            elif n_tags != len(items):
                raise DataError(f"{n_tags} {tag} tag(s) in the text but {len(items)} {one} file(s)", path=where,
                                hint=f"each {tag} takes the next {one} of the sample, in order")
            if not items:
                continue
            if kind == "audio":  # a long audio file may become several items: one placeholder run each
                per_file = []
                for k, m in enumerate(items):
                    n, cut = _naming(lambda: self.audio_items(m, where), kind, k, len(items), m)
                    per_file.append(n)
                    audio_cut += int(cut)
                if any(n != 1 for n in per_file):
                    turns = _expand_tags(turns, tag, per_file)
                media[name] = [(kind, m) for m, n in zip(items, per_file) for _ in range(n)]
                if self.planned(name):  # a variable-length audio encoder: each item its own count
                    counts[name], plans[name] = self.audio_counts(items, per_file, where)
            else:
                media[name] = [(kind, m) for m in items]
                if self.planned(name):
                    planned = [_naming(lambda: self.plan_item(kind, m, where, len(items) == 1), kind, k,
                                       len(items), m) for k, m in enumerate(items)]
                    counts[name] = [n for n, _ in planned]
                    plans[name] = [plan for _, plan in planned]
        targets = self.outputs.files(record, turns, where) if self.outputs.tags else {}
        try:
            enc = encode_conversation(self.tokenizer, [tuple(t) for t in turns], self.tags, self.cfg.template,
                                      reserved=self.reserved, where=where)
        except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"): not text any tokenizer takes
            bad = e.object[e.start:e.end] if isinstance(e.object, str) else ""
            raise DataError(f"the conversation holds {bad.encode('unicode_escape').decode() or 'a character'}, "
                            f"which is not valid Unicode text ({e.reason})", path=where,
                            hint="a lone surrogate escape in the JSON: fix or remove the sample") from None
        except InputError as e:
            raise DataError(e.problems) from None
        ids, labels, spans = widen_runs(enc.input_ids, enc.labels, enc.runs, counts, self.wraps,
                                        self.item_parts(plans))
        truncated = False
        if len(ids) > self.max_len:
            cut = self.max_len
            if self.truncation == "drop":
                raise Dropped("too_long", where, len(ids), self.max_len)
            if any(a < cut < b for _, a, b in spans):  # inside an item, its wrap or its timestamps
                raise Dropped("cut_inside_placeholders", where, len(ids), self.max_len)
            ids, labels, truncated = ids[:cut], labels[:cut], True
            kept = [r for r in spans if r[1] < cut]
            for name in list(media):  # items whose runs were cut off go too
                media[name] = media[name][: sum(1 for r in kept if r[0] == name)]
                if name in counts:
                    counts[name] = counts[name][: len(media[name])]
                    plans[name] = plans[name][: len(media[name])]
                if not media[name]:
                    del media[name]
                    counts.pop(name, None)
                    plans.pop(name, None)
        if not any(lab != IGNORE_INDEX for lab in labels[1:]):
            raise DataError(f"no trainable tokens left after truncating to {self.max_len} tokens", path=where,
                            hint="the answers start past the limit: raise data.max_seq_len, use "
                                 "truncation: drop, or shorten the sample")
        for name, files in targets.items() if truncated else ():  # an item to generate cut off: dropped
            tag = self.outputs.tags[f"<gen:{name}>"]
            if ids.count(tag.token_id) != len(files) * tag.length:
                raise Dropped("cut_inside_placeholders", where, len(ids), self.max_len)
        out = Encoded(ids, labels, media, where, record.file, record.id, truncated, audio_cut, record.extra,
                      counts, plans)
        out.targets = targets
        return out

    def planned(self, name: str | None) -> bool:
        """True when each item of modality ``name`` is planned from its header (its own count): native-resolution
        and tiled modalities."""
        return self.media.is_native(name) or self.media.is_tiled(name)

    def plan_item(self, kind: str, media: Media, where: str, alone: bool = True) -> tuple[int, object]:
        """(placeholder tokens, plan) of one native-resolution or tiled image or video, from its header /
        container (nothing decoded); the plan (a video's :class:`~mimo_spec.data.preprocess.VideoPlan`, a tiled
        image's :class:`~mimo_spec.data.tiling.TiledImage`, else None) is what decoding it reuses. ``alone``: the
        image is its sample's only one (OneVision tiles only such an image)."""
        if kind == "video":
            plan = self.media.video_plan(media, where)
            if self.media.is_tiled(self.media.video_modality):  # anyres (LLaVA-NeXT-Video): a fixed frame count
                return plan.tokens, plan
            return self.media.native[self.media.video_modality][3].tokens(plan.grid), plan
        if self.media.is_tiled(self.media.image_modality):
            plan = self.media.image_plan(media, where, alone=alone)
            return plan.tokens, plan
        return self.media.image_tokens(media, where), None

    def item_parts(self, plans: dict[str, list]) -> dict[str, list[list[tuple[list[int], int]]]]:
        """Items laid out as parts, (text ids, placeholders) each: Qwen3-VL's video frame groups
        (:meth:`frame_groups`) and tiled images whose scheme writes text between their tiles (idefics3)."""
        out = self.frame_groups(plans)
        name = self.media.image_modality
        if self.media.is_tiled(name) and name in plans and any(p.has_text for p in plans[name]):
            out[name] = [[(self.text_ids(text, "data.image_tiling"), n) for text, n in plan.parts]
                         for plan in plans[name]]
        return out

    def frame_groups(self, plans: dict[str, list]) -> dict[str, list[list[tuple[list[int], int]]]]:
        """Qwen3-VL's video layout (``data.qwen_vl``): per video, its frame groups as (timestamp text ids,
        placeholders), from the plans; {} for other layouts."""
        name = self.media.video_modality
        if not self.media.video_timestamps or name not in plans:
            return {}
        return {name: [[(self.text_ids(text), n) for text, n in self.media.video_groups(plan)]
                       for plan in plans[name]]}

    def text_ids(self, text: str, key: str = "data.qwen_vl") -> list[int]:
        """``text`` tokenised alone (a timestamp such as ``<1.5 seconds>``, a tile's ``<row_1_col_2>``),
        remembered; ``key``: the option a ConfigError names."""
        ids = self._text_ids.get(text)
        if ids is None:
            from mimo_spec.data.tokenizer import encode_many

            ids = list(encode_many(self.tokenizer, [text])[0])
            bad = sorted(set(ids) & self.reserved)
            if bad:
                raise ConfigError(f"{text!r} tokenises to id {bad[0]}, a modality's placeholder or generation id",
                                  path=key, hint="give the modality another token id")
            if len(self._text_ids) > 4096:
                self._text_ids.clear()
            self._text_ids[text] = ids
        return ids

    def audio_counts(self, files: list[Media], per_file: list[int], where: str) -> tuple[list[int], list]:
        """(placeholders of each audio item, a None plan each) for a variable-length audio encoder: each
        file's items' counts from its header (``per_file[k]`` items of file k)."""
        counts = [t for k, (m, n) in enumerate(zip(files, per_file))
                  for t in _naming(lambda: self.media.audio_tokens(m, where), "audio", k, len(files), m)[:n]]
        return counts, [None] * len(counts)

    def audio_items(self, media: Media, where: str) -> tuple[int, bool]:
        """(items, cut) an audio file becomes: several for audio longer than the encoder's window
        (``data.audio_overflow: split``), else one."""
        count = getattr(self.media, "audio_items", None)
        return count(media, where) if count is not None else (1, False)

    # ------------------------------------------------------------------------------ media
    def build(self, enc: Encoded) -> dict:
        """The sample: ids and labels as tensors, every item decoded into its encoder's inputs."""
        items, num_items = {}, {name: 0 for name in self.input_modalities}
        for name, entries in enc.media.items():
            items[name], num_items[name] = self.decode(name, entries, enc.where, enc.item_tokens.get(name),
                                                       enc.plans.get(name))
        sample = {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                  "labels": torch.tensor(enc.labels, dtype=torch.long), "items": items, "num_items": num_items,
                  "targets": self.outputs.load(enc.targets, enc.where) if enc.targets else {}}
        if enc.rejected is not None:  # a preference pair: collate makes it two adjacent rows sharing the items
            sample["rejected_input_ids"] = torch.tensor(enc.rejected[0], dtype=torch.long)
            sample["rejected_labels"] = torch.tensor(enc.rejected[1], dtype=torch.long)
        return sample

    def decode(self, name: str, entries: list[tuple[str, Media]], where: str,
               counts: list[int] | None = None, plans: list | None = None) -> tuple[dict, int]:
        """One modality's items, in order: ({encoder: {kwarg: (n, ...)}}, n); a native-resolution modality's
        packed inputs are the items' rows back to back, its grid one row per item. A split audio file stands
        for several consecutive entries and is decoded once (truncation may have kept only its first ones).
        ``counts``: the placeholder count planned for each item (native modalities), checked against what
        the decoded item makes; ``plans``: what :meth:`plan_item` found for each (videos are not re-read)."""
        loaded, k = [], 0
        tiled = self.media.is_tiled(name) and plans is not None
        items = 0  # tiled images: the items (tiles) of all of them
        while k < len(entries):
            kind, m = entries[k]
            run = 1
            while k + run < len(entries) and entries[k + run][1] is m:
                run += 1
            if kind == "audio":
                x = self.media.audio(m, where)
                have = next(iter(next(iter(x.values())).values())).shape[0]
                if have < run:
                    raise DataError(f"{m.name} gave {have} audio item(s) but its placeholders need {run}",
                                    path=where, hint="the audio file changed while it was read, or its header is wrong")
                loaded.append({e: {kw: t[:run] for kw, t in kws.items()} for e, kws in x.items()})
            else:
                run = 1
                plan = plans[k] if plans is not None else None
                x = _naming(lambda: self.media.video(m, where, plan) if kind == "video"
                            else self.media.image(m, where, plan) if plan is not None else self.media.image(m, where),
                            kind, k, len(entries), m)
                if tiled:
                    items += plan.items
                elif counts is not None:
                    got = self.media.item_tokens(name, x)[0]
                    if got != counts[k]:
                        raise DataError(f"{kind} {k + 1} of {len(entries)} ({m.name}) makes {got} tokens once "
                                        f"decoded, but its header said {counts[k]}", path=where,
                                        hint="the file changed while in use, or its header disagrees with its "
                                             "pixels (e.g. EXIF orientation): re-export it")
                loaded.append(x)
            k += run
        merged = {e: {kw: torch.cat([x[e][kw] for x in loaded]) for kw in kws} for e, kws in loaded[0].items()}
        return merged, items if tiled else len(entries)

    def prompt(self, text: str, images=(), audio=(), where: str = "prompt", videos=()) -> tuple[torch.Tensor, dict]:
        """A user prompt with image / video / audio files -> (input_ids (1, S), modality_inputs), laid out as
        training samples are and ending with the assistant prefix. Tags (``data.image_token`` /
        ``data.video_token`` / ``data.audio_token``) place the files in order; without tags the files go
        first, one per line, in the model's modality order. A video is a file or a folder of frame images."""
        groups = [(self.cfg.image_token, [Media(str(f), path=_path(f)) for f in images]),
                  (getattr(self.cfg, "video_token", "<video>"), [Media(str(f), path=_path(f)) for f in videos]),
                  (self.cfg.audio_token, [Media(str(f), path=_path(f)) for f in audio])]
        order = self.input_modalities  # untagged files go first in the model's modality order, as in synthetic data
        groups.sort(key=lambda g: order.index(self.kinds[g[0]][1]) if self.kinds[g[0]][1] in order else len(order))
        prefix, media, counts, plans = "", {}, {}, {}
        for tag, files in groups:
            kind, name = self.kinds[tag]
            n_tags = text.count(tag)
            if (files or n_tags) and name is None:
                raise InputError(f"the prompt has {tag} input but the model has no such input modality", path=where)
            if files and n_tags == 0:
                prefix += f"{tag}\n" * len(files)
            elif n_tags != len(files):
                raise InputError(f"{n_tags} {tag} tag(s) in the prompt but {len(files)} file(s)", path=where,
                                 hint="each tag takes the next file, in order")
            if files:
                per_file = [self.audio_items(m, where)[0] if kind == "audio" else 1 for m in files]
                media[tag] = (kind, name, files, per_file)
                if self.planned(name) and kind == "audio":
                    counts[name], plans[name] = self.audio_counts(files, per_file, where)
                elif self.planned(name):
                    planned = [_naming(lambda: self.plan_item(kind, m, where, len(files) == 1), kind, k,
                                       len(files), m) for k, m in enumerate(files)]
                    counts[name], plans[name] = [n for n, _ in planned], [p for _, p in planned]
        turns = [["user", prefix + text]]
        for tag, (kind, name, files, per_file) in media.items():
            if any(n != 1 for n in per_file):
                turns = _expand_tags(turns, tag, per_file)
        enc = encode_conversation(self.tokenizer, [tuple(t) for t in turns], self.tags, self.cfg.template,
                                  add_generation_prompt=True, reserved=self.reserved, where=where)
        ids, _, _ = widen_runs(enc.input_ids, enc.labels, enc.runs, counts, self.wraps, self.item_parts(plans))
        inputs = {}
        for tag, (kind, name, files, per_file) in media.items():
            inputs[name] = self.decode(name, [(kind, m) for m, n in zip(files, per_file) for _ in range(n)], where,
                                       counts.get(name), plans.get(name))[0]
        return torch.tensor([ids], dtype=torch.long), inputs


def parse_turns(conv, where: str, key: str = "conversations") -> list[list[str]]:
    """Turns ``[{"from"|"role": ..., "value"|"content": text}]`` -> [[role, text]] (roles user / assistant /
    system); DataError naming ``where`` and ``key[k]`` for a malformed turn."""
    turns = []
    for k, turn in enumerate(conv):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if not isinstance(value, str) or not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{key}[{k}] must be {{\"from\": human|gpt|system, \"value\": text}}, got "
                            f"{short(turn)}", path=where,
                            hint='each turn is one object, e.g. {"from": "gpt", "value": "A cat."}')
        turns.append([ROLES[role], value])
    return turns


PAIR_HINT = ('a preference record is {"image": ..., "conversations": [prompt turns], "chosen": "answer", '
             '"rejected": "answer"} (also "question" / "prompt" for the prompt, or chosen / rejected as whole '
             'conversations)')


def pair_turns(record: Record) -> tuple[list[list[str]], list[str], list[str]]:
    """A preference record -> (prompt turns, chosen answer turn, rejected answer turn), each turn [role, text].

    Accepted shapes: ``conversations`` (or ``prompt``: turns or text; or ``question``: text) holding the prompt,
    with ``chosen`` / ``rejected`` each an answer text, one answer turn, or a list of turns (the answer alone,
    or the whole conversation: the prompt's turns, then the answer). Without a prompt, ``chosen`` and
    ``rejected`` are whole conversations: their common turns are the prompt (TRL's implicit prompt). Each answer
    is one assistant turn. Raises DataError naming the record."""
    where, extra = record.where, record.extra or {}
    if "chosen" not in extra or "rejected" not in extra:
        missing = " and ".join(repr(k) for k in ("chosen", "rejected") if k not in extra)
        raise DataError(f"no preference pair: the record has no {missing} answer (train.objective dpo trains on "
                        "chosen / rejected pairs)", path=where, hint=PAIR_HINT)
    prompt = record.conversations
    if prompt is None:
        prompt = extra.get("prompt", extra.get("question"))
    if isinstance(prompt, str):
        prompt = [{"from": "human", "value": prompt}]
    if prompt is not None and (not isinstance(prompt, list) or not prompt):
        raise DataError(f"the prompt must be a list of turns or a text, got {short(prompt)}", path=where,
                        hint=PAIR_HINT)
    prompt_turns = parse_turns(prompt, where) if prompt is not None else None

    def answer_turns(key: str) -> list[list[str]]:
        value = extra[key]
        if isinstance(value, str):
            return [["assistant", value]]
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise DataError(f"{key!r} must be an answer text or a list of turns, got {short(value)}", path=where,
                            hint=PAIR_HINT)
        return parse_turns(value, where, key)

    chosen, rejected = answer_turns("chosen"), answer_turns("rejected")
    if prompt_turns is None:  # whole conversations: the turns they share are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt_turns = chosen[:n]
        chosen, rejected = chosen[n:], rejected[n:]
    else:
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            if len(turns) > len(prompt_turns) and turns[:len(prompt_turns)] == prompt_turns:
                turns[:] = turns[len(prompt_turns):]  # the whole conversation given: the prompt's turns dropped
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != 1 or turns[0][0] != "assistant" or not turns[0][1].strip():
            raise DataError(f"{key!r} must end the prompt with one non-empty assistant answer, got "
                            f"{short(turns)}", path=where, hint=PAIR_HINT)
    if not prompt_turns or not any(r == "user" for r, _ in prompt_turns):
        raise DataError("the preference record has no prompt (no user turn before the answers)", path=where,
                        hint=PAIR_HINT)
    return prompt_turns, chosen[0], rejected[0]


def answer_labels(labels: list[int]) -> list[int]:
    """``labels`` with only their last run of trained labels kept (the final answer, its end-of-sequence token
    included); every label before it -100."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:]


def _naming(call, kind: str, k: int, n: int, media: Media):
    """``call()``, its DataError naming the item when the sample has several of its kind: "video 2 of 3: ..."
    (the message names the file too)."""
    try:
        return call()
    except DataError as e:
        what = f"{kind} {k + 1} of {n}"
        if n == 1:
            raise
        if any(p.message.startswith(what) for p in e.problems):
            raise
        raise DataError([Problem(p.path, f"{what}: {p.message}", p.hint) for p in e.problems]) from None


def widen_runs(ids: list[int], labels: list[int], runs: list[tuple[str, int, int]],
               counts: dict[str, list[int]],
               wraps: dict[str, tuple[list[int], list[int]]] | None = None,
               groups: dict[str, list[list[tuple[list[int], int]]]] | None = None,
               ) -> tuple[list[int], list[int], list[tuple[str, int, int]]]:
    """Each run of a modality in ``counts`` (one placeholder per tag) widened to its item's own count: the
    k-th run of modality m becomes ``counts[m][k]`` copies of its placeholder (and its label). ``wraps``:
    modality -> (ids before, ids after) put around each of its runs, labelled -100 (Qwen's
    ``<|vision_start|>`` ... ``<|vision_end|>``); where the text already holds them right around the tag
    they are not added again. ``groups``: modality -> per item its parts [(text ids, placeholders)]
    (Qwen3-VL's videos: a frame group's timestamp text and its placeholders); such an item's tag becomes,
    part after part, the text ids, the wrap, the placeholders and the wrap (text and wraps labelled -100;
    markers the text holds around the tag stay where they are, outside). Returns the ids, the labels and
    each item's span ``(modality, start, end)``: its placeholders with its wrap ids (and timestamp text)."""
    wraps = wraps or {}
    groups = groups or {}
    if not counts and not wraps:
        return ids, labels, [(name, start, start + length) for name, start, length in runs]
    out_ids: list[int] = []
    out_labels: list[int] = []
    spans: list[tuple[str, int, int]] = []
    seen = dict.fromkeys(counts, 0)
    pos = 0
    added = 0  # out_ids up to here hold ids this function put in (a wrap is never taken for the text's own)
    for name, start, length in runs:
        out_ids += ids[pos:start]
        out_labels += labels[pos:start]
        before, after = wraps.get(name, ((), ()))
        parts = None
        if name in counts:
            if length != 1 or seen[name] >= len(counts[name]):
                raise DataError(f"{name}: {seen[name] + 1} placeholder runs for {len(counts[name])} items",
                                hint="each tag takes one item")
            if name in groups:
                parts = groups[name][seen[name]]
        if parts is not None:  # timestamped frame groups, each in its own wrap
            seen[name] += 1
            begin = len(out_ids)
            for text, n in parts:
                out_ids += list(text) + list(before) + [ids[start]] * n + list(after)
                out_labels += ([IGNORE_INDEX] * (len(text) + len(before)) + [labels[start]] * n
                               + [IGNORE_INDEX] * len(after))
            spans.append((name, begin, len(out_ids)))
            pos = start + length
            added = len(out_ids)
            continue
        if before and not (len(out_ids) - len(before) >= added and out_ids[len(out_ids) - len(before):] == before):
            out_ids += before
            out_labels += [IGNORE_INDEX] * len(before)
        begin = len(out_ids) - len(before)  # the wrap before it, added or the text's own
        if name in counts:
            n = counts[name][seen[name]]
            seen[name] += 1
            out_ids += [ids[start]] * n
            out_labels += [labels[start]] * n
        else:
            out_ids += ids[start:start + length]
            out_labels += labels[start:start + length]
        pos = start + length
        if after and ids[pos:pos + len(after)] != after:
            out_ids += after
            out_labels += [IGNORE_INDEX] * len(after)
        spans.append((name, begin, len(out_ids) + (len(after) if after and ids[pos:pos + len(after)] == after
                                                   else 0)))
        added = len(out_ids)
    out_ids += ids[pos:]
    out_labels += labels[pos:]
    return out_ids, out_labels, spans


def wrap_ids(tokenizer, wrap, reserved, key: str) -> tuple[list[int], list[int]]:
    """``[before, after]`` text (``data.image_wrap`` ...) -> their ids, each tokenised alone; a ConfigError
    naming ``key`` when one holds a modality's placeholder id."""
    from mimo_spec.data.tokenizer import encode_many

    if len(wrap) != 2 or not all(isinstance(w, str) for w in wrap):
        raise ConfigError(f"expected [before, after] text, got {short(wrap)}", path=key,
                          hint='e.g. ["<|vision_start|>", "<|vision_end|>"], or null')
    try:
        before, after = (list(x) for x in encode_many(tokenizer, list(wrap)))
    except UnicodeEncodeError:
        raise ConfigError(f"{short(wrap)} is not valid Unicode text", path=key) from None
    bad = sorted(set(before + after) & set(reserved))
    if bad:
        raise ConfigError(f"{short(wrap)} tokenises to id {bad[0]}, a modality's placeholder or generation id",
                          path=key, hint="wrap the items in other text, or give the modality another token id")
    return before, after


def _path(f):
    from mimo_spec.data.local import resolve_path

    return resolve_path(f)


_NATIVE_OPTIONS = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "video_fps", "video_min_frames",
                   "video_max_frames", "video_num_frames")


# data.image_<name>: the tiling options (mimo_spec.data.tiling.build_tiling's keyword arguments)
_TILING_OPTIONS = ("min_tiles", "max_tiles", "thumbnail", "longest_edge", "split")


def media_options(cfg) -> dict:
    """The MediaProcessor keyword arguments a data config sets."""
    return {"image_modality": getattr(cfg, "image_modality", None),
            "audio_modality": getattr(cfg, "audio_modality", None),
            "video_modality": getattr(cfg, "video_modality", None),
            **{k: getattr(cfg, k) for k in _NATIVE_OPTIONS if getattr(cfg, k, None) is not None},
            "qwen_vl": getattr(cfg, "qwen_vl", "auto"),
            "image_tiling": getattr(cfg, "image_tiling", "auto"),
            "tiling_options": {k: getattr(cfg, f"image_{k}") for k in _TILING_OPTIONS
                               if getattr(cfg, f"image_{k}", None) is not None},
            "image_mean": cfg.image_mean,
            "image_std": cfg.image_std, "image_resize": getattr(cfg, "image_resize", "pad"),
            "image_resample": getattr(cfg, "image_resample", "bicubic"),
            **({"image_processor": cfg.image_processor} if cfg.image_processor else {}),
            **({"audio_overflow": cfg.audio_overflow} if cfg.audio_overflow != "split" else {})}


def _expand_tags(turns: list[list[str]], tag: str, counts: list[int]) -> list[list[str]]:
    """Each occurrence of ``tag`` (in order over the turns) repeated ``counts[k]`` times."""
    k, out = 0, []
    for role, text in turns:
        pieces = text.split(tag)
        new = pieces[0]
        for piece in pieces[1:]:
            new += tag * counts[k] + piece
            k += 1
        out.append([role, new])
    return out


class RecordDataset(torch.utils.data.Dataset):
    """The samples of a record source for one model, built on access.

    ``dataset[i]``: the sample (media decoded); ``token_length(i)``: its token count (text only, the last few
    remembered); ``encoded(i)``: its tokens and media references. Both raise DataError for an unusable
    record and :class:`Dropped` for one left out by the length limit.
    """

    def __init__(self, source, builder: SampleBuilder):
        self.source, self.builder = source, builder
        self.max_len = builder.max_len
        self._lengths: OrderedDict[int, int] = OrderedDict()

    def use_pairs(self) -> None:
        """Read every record as a preference pair (``train.objective: dpo``, see :meth:`SampleBuilder.encode`)."""
        self.builder.pairs = True
        self._lengths.clear()

    def __len__(self) -> int:
        return len(self.source)

    def order(self, seed: int):
        """The source's sample order (a mixture's honours its weights)."""
        return self.source.order(seed)

    def encoded(self, index: int) -> Encoded:
        record = self.source.record(int(index))
        try:
            return self.builder.encode(record)
        except DataError as e:
            e.record_info = {"where": record.where, "file": record.file, "id": record.id}
            raise

    def token_length(self, index: int) -> int:
        index = int(index)
        if index in self._lengths:
            self._lengths.move_to_end(index)
            return self._lengths[index]
        n = len(self.encoded(index))
        self._lengths[index] = n
        if len(self._lengths) > 65536:
            self._lengths.popitem(last=False)
        return n

    def __getitem__(self, index: int) -> dict:
        enc = self.encoded(index)
        try:
            sample = self.builder.build(enc)
        except DataError as e:
            e.record_info = {"where": enc.where, "file": enc.file, "id": enc.id}
            raise
        sample["where"] = enc.where
        return sample

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lengths"] = OrderedDict()
        return state
