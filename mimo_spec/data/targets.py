"""Items to generate in data files: image and speech targets of output modalities (#19).

In a record, an assistant turn places an item to generate with the output modality's tag
``<gen:NAME>`` (``<gen:image_out>``); the files, in order, are the record's ``"output_images"`` (image
modalities) or ``"output_audios"`` (audio modalities), resolved like its inputs (``data.image_folder`` /
``data.audio_folder``)::

    {"id": "7", "output_images": ["red_circle.png"],
     "conversations": [{"from": "human", "value": "draw a red circle"},
                       {"from": "gpt", "value": "<gen:image_out>"}]}

In WebDataset shards the files may instead be members of the sample: ``key.out.png`` (``key.out.0.png``,
``key.out.1.png``, ... for several; ``key.out.wav`` for audio).

A tag becomes the modality's run (a discrete modality: its begin token, one generation token per code, its
end token; the codes are scored by the modality's loss, the begin and end tokens by the LM's). Images are
decoded, brought to the tokenizer's (or decoder's) square size the way the data's input images are
(``data.image_resize``: pad / fit with ``data.image_mean``'s colour, crop or squash, with ``data.image_resample``'s
filter: a model generates what it is shown) and scaled to its pixel range; audio is read mono, resampled to the
tokenizer's rate and cut or zero-padded to ``num_frames`` frames.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mimo_spec.data.tokenizer import Tag
from mimo_spec.errors import ConfigError, DataError

KEYS = {"image": "output_images", "audio": "output_audios"}


def image_range(mod) -> tuple[float, float]:
    """The pixel range of an output modality's images: its tokenizer's ``value_range`` (a VQ tokenizer without
    one: [-1, 1], as Janus / Chameleon / Emu3 take them), a decoder's [0, 1]."""
    tok = getattr(mod, "tokenizer", None)
    if tok is None:
        return (0.0, 1.0)
    return tuple(getattr(tok, "value_range", (-1.0, 1.0)))


def output_tags(model) -> dict[str, Tag]:
    """``<gen:NAME>`` -> the run of each output modality of ``model``."""
    tags = {}
    for name, mod in model.modalities.items():
        if not getattr(mod, "has_output", False):
            continue
        discrete = getattr(mod, "tokenizer", None) is not None
        tags[f"<gen:{name}>"] = Tag(name, mod.generation_token_id, mod.num_generation_tokens, trainable=True,
                                    begin_id=mod.begin_token_id if discrete else None,
                                    end_id=mod.end_token_id if discrete else None, codes=discrete)
    return tags


def _kind(mod) -> str:
    tok = getattr(mod, "tokenizer", None)
    return getattr(tok, "item_kind", None) or ("image" if tok is not None or mod.decoder is not None else "audio")


class OutputTargets:
    """The output modalities' target files of records, found at encoding and decoded when a sample is built.
    Holds only shapes and ranges (pickles into DataLoader workers)."""

    def __init__(self, model, image_root: Path | None = None, audio_root: Path | None = None, *,
                 image_resize: str = "squash", image_resample: str = "bicubic", image_mean=(0.5, 0.5, 0.5)):
        from mimo_spec.data.preprocess import IMAGE_RESIZES, per_channel, pil_filter

        if image_resize not in IMAGE_RESIZES:
            raise ConfigError(f"unknown image_resize {image_resize!r}", path="data.image_resize",
                              hint=f"one of {', '.join(IMAGE_RESIZES)}")
        pil_filter(image_resample)  # an unknown filter is a config error now, not at the first sample
        mean, _ = per_channel(image_mean if isinstance(image_mean, (list, tuple)) else [image_mean], [1.0], 3)
        # pad / fit: the background LLaVA's and Janus's processors use, int() of the mean colour
        self.image_geometry = (image_resize, image_resample, tuple(int(m * 255) for m in mean))
        self.tags = output_tags(model)
        self.spec = {}
        for name, mod in model.modalities.items():
            if not getattr(mod, "has_output", False):
                continue
            kind = _kind(mod)
            if kind == "image":
                shape = tuple(mod.example_targets(1).shape[1:])
                self.spec[name] = ("image", shape, image_range(mod))
            else:
                tok = mod.tokenizer
                frames = int(mod.num_frames or 0)
                samples = int(getattr(tok, "hop_length", 0) or 0) * frames
                if not samples:  # the smallest clip length that gives num_frames frames
                    samples = next(n for n in range(frames, frames * 4096 + 1, max(1, frames // 4 or 1))
                                   if tok.num_frames(n) >= frames)
                self.spec[name] = ("audio", (samples, int(tok.sampling_rate)), None)
        self.roots = {"image": image_root, "audio": audio_root}

    def files(self, record, turns: list[list[str]], where: str) -> dict[str, list]:
        """{modality: [Media]}: the record's target files for its ``<gen:NAME>`` tags (counts checked)."""
        from mimo_spec.data.records import Media

        extra = getattr(record, "extra", None) or {}
        out, used = {}, {k: 0 for k in KEYS.values()}
        for tag, t in self.tags.items():
            n = sum(text.count(tag) for _, text in turns)
            kind = self.spec[t.modality][0]
            key = KEYS[kind]
            given = extra.get(key) or []
            if isinstance(given, str):
                given = [given]
            if not n:
                continue
            start = used[key]
            names = given[start:start + n]
            if len(names) != n or not all(isinstance(x, (str, Media)) for x in names):
                raise DataError(f"{n} {tag} tag(s) in the text but {len(given) - start} file(s) in {key!r}",
                                path=where, hint=f"each {tag} takes the next file of \"{key}\", in order")
            used[key] += n
            root = self.roots.get(kind) or Path(getattr(record, "file", "") or ".").parent
            out[t.modality] = [x if isinstance(x, Media) else Media(name=x, path=root / x) for x in names]
        for key, n in used.items():
            if len(extra.get(key) or []) > n and isinstance(extra.get(key), list):
                raise DataError(f"{len(extra[key])} file(s) in {key!r} but {n} output tag(s) take them", path=where,
                                hint="place each target with its modality's <gen:NAME> tag in an answer")
        return out

    def load(self, files: dict[str, list], where: str) -> dict[str, torch.Tensor]:
        """{modality: (n, ...) targets} decoded from :meth:`files`' answer."""
        return {name: torch.stack([self._one(name, m, where) for m in media]) for name, media in files.items()}

    def _one(self, name: str, media, where: str) -> torch.Tensor:
        kind, shape, value_range = self.spec[name]
        if kind == "image":
            import numpy as np

            from mimo_spec.data.preprocess import load_image, pil_filter, square_image

            c, h, w = shape
            resize, resample, fill = self.image_geometry
            img = load_image(media, where).convert("RGB")
            if h == w:
                img = square_image(img, h, resize, resample, fill)
            else:  # a tokenizer of non-square images: resized to its shape
                img = img.resize((w, h), pil_filter(resample))
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[:c]
            low, high = value_range
            return x * (high - low) + low
        from mimo_spec.data.preprocess import read_audio, resample

        samples, rate = shape
        wave, got = read_audio(media, where)
        if got != rate:
            wave = resample(wave, got, rate)
        return torch.nn.functional.pad(wave[:samples], (0, max(0, samples - wave.shape[0])))


class ConditionDropout(torch.utils.data.Dataset):
    """A training set whose samples with an item to generate lose their condition with probability ``p``
    (``data.condition_dropout``): every token before the first item's begin token (its first generation
    token where it has none) but the BOS tokens (the first token when the tokenizer has no BOS) becomes ``pad_id``
    and is not scored, which is the unconditional
    row ``mimo_spec.generation`` builds for classifier-free guidance (as Janus trains and samples it), and the
    condition's input items (an image to edit) go with their placeholders. The item's codes stay scored. Which samples lose it depends only on (seed, index), so a resumed run sees the
    same data. Everything else (``order``, ``token_length``, ...) is the wrapped dataset's."""

    def __init__(self, dataset, model, p: float, seed: int, pad_id: int, bos_id: int | None = None):
        self.dataset, self.p, self.seed, self.pad_id = dataset, float(p), int(seed), int(pad_id)
        self.bos_id = None if bos_id is None else int(bos_id)  # kept in the row, as generation keeps it
        self.starts = sorted({int(m.begin_token_id if getattr(m, "begin_token_id", None) is not None
                                  else m.generation_token_id)
                              for m in model.modalities.values() if getattr(m, "has_output", False)})
        # input modalities' placeholder ids: a condition's items (an image to edit) go with it
        self.placeholders = {name: int(m.special_token_id) for name, m in model.modalities.items()
                             if getattr(m, "special_token_id", None) is not None}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def dropped(self, index: int) -> bool:
        """Whether sample ``index`` loses its condition (when it has an item to generate)."""
        digest = hashlib.blake2b(f"{self.seed}:condition:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < self.p

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if not sample.get("targets") or not self.dropped(index):
            return sample
        ids = sample["input_ids"]
        at = torch.isin(ids, torch.tensor(self.starts, dtype=ids.dtype)).nonzero()
        if at.numel() == 0:
            return sample
        first = int(at[0, 0])
        # the condition's input items go too (the unconditional row generation builds has none): every item of
        # a modality whose placeholders are all in the condition; a modality with items on both sides (an item
        # after the one to generate) cannot be split here, and the sample keeps its condition
        gone = []
        for name, token in self.placeholders.items():
            before, after = bool((ids[1:first] == token).any()), bool((ids[first:] == token).any())
            if before and after:
                return sample
            if before:
                gone.append(name)
        ids, labels = ids.clone(), sample["labels"].clone()
        head = ids[:first]  # as mimo_spec.generation.unconditional_ids: BOS (else the first token) stays
        keep = head == self.bos_id if self.bos_id is not None else torch.arange(first) == 0
        labels[:first][~keep] = -100
        ids[:first] = torch.where(keep, head, torch.full_like(head, self.pad_id))
        out = {**sample, "input_ids": ids, "labels": labels}
        if gone:
            out["items"] = {k: v for k, v in (sample.get("items") or {}).items() if k not in gone}
            out["num_items"] = {k: (0 if k in gone else v) for k, v in (sample.get("num_items") or {}).items()}
        return out
