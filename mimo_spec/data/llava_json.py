"""LLaVA-style conversation data: a JSON (or JSONL) list of samples with image and WAV files.

::

    [{"id": "000",
      "image": "coco/000.jpg",                 # or "images": [...]; "audio" / "audios" for WAV files
      "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                        {"from": "gpt", "value": "A cat on a sofa."}]}]

Construction reads and tokenises every sample (text only, so it is quick),
checks the referenced files exist, and applies the length limit; images and
audio are decoded in ``__getitem__``. Each ``<image>`` / ``<audio>`` tag becomes
exactly ``tokens_per_item`` placeholder ids; a sample with files but no tags gets
them in front of its first user turn (as LLaVA does). The loss covers assistant
answers only.

Samples longer than the limit are dropped (``truncation: drop``) or cut
(``truncation: truncate``); a cut that would land inside a run of placeholders
drops the sample instead, so an item is never split. ``num_dropped`` and
``drop_reasons`` ({"too_long" | "cut_inside_placeholders": count}) report them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from mimo_spec.data.config import max_length
from mimo_spec.data.preprocess import MediaProcessor
from mimo_spec.data.tokenizer import Tag, encode_conversation, reserved_token_ids, resolve_path
from mimo_spec.errors import DataError, InputError, Problem
from mimo_spec.loss import IGNORE_INDEX

IMAGE_TAG, AUDIO_TAG = "<image>", "<audio>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_PROBLEMS = 20  # problems reported at once before giving up on the file


def read_records(path: Path, key: str = "data.path") -> list[dict]:
    """The samples of a JSON list or JSONL file. Raises DataError naming the file (and line, column)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}", path=key,
                         hint="relative paths resolve against the directory the run was started in")
    from mimo_spec.train.limits import machine_memory, require_fits

    # the text and the parsed records are both held: at least twice the file's size
    require_fits(2 * path.stat().st_size, machine_memory(), f"reading {path}", key,
                 "split the file into smaller ones, or use data.max_samples on a shorter copy", cls=DataError)
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        records = []
        # JSON Lines are split at "\n" only: str.splitlines would also split inside strings at U+2028 etc.
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON at line {lineno}, column {e.colno}: {e.msg}",
                                     path=key, hint="each line of a .jsonl file is one JSON object") from None
                except RecursionError:
                    raise _too_deep(path, line, key, lineno) from None
                except ValueError as e:  # e.g. an integer of more digits than Python converts
                    raise DataError(f"{path}: cannot read the JSON at line {lineno}: {e}"[:400], path=key,
                                     hint="each line of a .jsonl file is one JSON object of ordinary values") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=key,
                         hint="check it with: python -m json.tool FILE") from None
    except RecursionError:
        raise _too_deep(path, text, key) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise DataError(f"{path}: cannot read the JSON: {e}"[:400], path=key,
                         hint="a list of samples holding ordinary values (strings, short numbers)") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got a {type(records).__name__}", path=key,
                         hint='[{"id": ..., "image": ..., "conversations": [...]}, ...]')
    return records


def _too_deep(path: Path, text: str, key: str, lineno: int | None = None) -> DataError:
    """The DataError for JSON nested deeper than the reader's recursion allows, naming the file, the line
    where the nesting passes the limit, and the limit."""
    import re
    import sys

    limit = sys.getrecursionlimit()  # json's decoder recurses once per level, within Python's limit
    depth, deepest, line, deepest_line = 0, 0, 1, 1
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]', text):  # strings are skipped whole
        c = m.group()
        if c == "\n":
            line += 1
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
                if depth >= limit:
                    break
        elif c in "]}":
            depth -= 1
    where = f"line {lineno if lineno is not None else deepest_line}"
    return DataError(f"{path}: lists/objects nested too deeply at {where} (more than the JSON reader's limit of "
                     f"about {limit} levels)", path=key,
                     hint="a sample is an object with a list of turns: a few levels deep; this file is damaged "
                          "or not LLaVA data")


def _short(value, size: int = 80) -> str:
    """A bounded repr for messages: never recurses far into nested data, never prints more than ``size``."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, size, size
    return r.repr(value)[:size]


def _file_list(rec: dict, one: str, many: str, where: str) -> list[str]:
    value = rec.get(many, rec.get(one))
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DataError(f"{one!r} / {many!r} must be a path or a list of paths, got {_short(value)}", path=where,
                        hint=f'e.g. "{one}": "file" or "{many}": ["file1", "file2"]')
    return values


class LlavaJsonDataset(torch.utils.data.Dataset):
    """The ``train`` or ``eval`` split of a LLaVA-style JSON file, prepared for ``model``."""

    def __init__(self, cfg, model, tokenizer, split: str = "train"):
        # the model's ids and geometry are kept, not the model: the dataset pickles cheaply into DataLoader workers
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.max_len = max_length(cfg, model)
        self.template = cfg.template
        self.reserved = set(reserved_token_ids(model))
        self.media = MediaProcessor(model, image_modality=cfg.image_modality, audio_modality=cfg.audio_modality,
                                    image_mean=cfg.image_mean, image_std=cfg.image_std,
                                    image_resize=cfg.image_resize)
        self.input_modalities = [n for n, m in model.modalities.items() if m.has_input]
        self.tags: dict[str, Tag] = {}
        for tag, name in ((IMAGE_TAG, self.media.image_modality), (AUDIO_TAG, self.media.audio_modality)):
            if name is not None:
                self.tags[tag] = Tag(name, model.modalities[name].special_token_id, self.media.tokens_per_item[name])

        self.file, records = self._split_records(cfg, split)
        base = self.file.parent
        self.image_root = resolve_path(cfg.image_folder) if cfg.image_folder else base
        self.audio_root = resolve_path(cfg.audio_folder) if cfg.audio_folder else base

        self.samples: list[dict] = []
        self.drop_reasons: dict[str, int] = Counter()
        self.dropped: list[tuple[str, str]] = []  # (sample, reason), the first 100
        self.num_truncated = 0
        problems: list[Problem] = []
        for index, rec in records:
            where = f"{self.file.name}: sample {index}"
            if isinstance(rec, dict) and "id" in rec:
                where += f" (id {_short(rec['id'], 40)})"
            try:
                sample = self._prepare(rec, where)
            except InputError as e:
                problems.extend(e.problems)
                if len(problems) >= MAX_PROBLEMS:
                    problems.append(Problem("", f"stopped after {MAX_PROBLEMS} problems in {self.file}"))
                    break
                continue
            if sample is not None:
                self.samples.append(sample)
        if problems:
            raise DataError(problems)
        self.drop_reasons = dict(self.drop_reasons)
        if split == "train" and not self.samples:
            reasons = ", ".join(f"{k}: {v}" for k, v in self.drop_reasons.items())
            raise DataError(f"no training samples in {self.file}" + (f": all {self.num_dropped} dropped ({reasons})"
                                                                      if self.num_dropped else ""),
                             path="data.path", hint="raise data.max_seq_len or use truncation: truncate"
                             if self.num_dropped else "the file holds no samples")

    @property
    def num_dropped(self) -> int:
        return sum(self.drop_reasons.values())

    def _split_records(self, cfg, split: str) -> tuple[Path, list[tuple[int, object]]]:
        """(file, [(index in file, record)]) of this split: ``eval_path``, or a seeded ``eval_fraction``."""
        if cfg.eval_path is not None:
            key = "data.path" if split == "train" else "data.eval_path"
            file = resolve_path(cfg.path if split == "train" else cfg.eval_path)
            records = list(enumerate(read_records(file, key)))
            return file, records[: cfg.max_samples] if cfg.max_samples else records
        file = resolve_path(cfg.path)
        records = list(enumerate(read_records(file)))
        records = records[: cfg.max_samples] if cfg.max_samples else records
        n = len(records)
        n_eval = min(max(round(n * cfg.eval_fraction), 1 if cfg.eval_fraction > 0 else 0), max(n - 1, 0))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        chosen = set(order[:n_eval]) if split == "eval" else set(order[n_eval:])
        return file, [records[i] for i in sorted(chosen)]

    # --------------------------------------------------------------------- preparation
    def _prepare(self, rec, where: str) -> dict | None:
        """A record -> {input_ids, labels (int32), images, audio, where}; None when dropped."""
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}", path=where,
                            hint='a sample is {"id": ..., "image": ..., "conversations": [...]}')
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise DataError("missing or empty 'conversations'", path=where,
                             hint='"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]')
        turns = []
        for k, turn in enumerate(conv):
            if (not isinstance(turn, dict) or not isinstance(turn.get("value"), str)
                    or not isinstance(turn.get("from"), str) or turn["from"] not in ROLES):
                raise DataError(f"conversations[{k}] must be {{\"from\": human|gpt|system, \"value\": text}}, got "
                                 f"{_short(turn)}", path=where,
                                hint='each turn is one object, e.g. {"from": "gpt", "value": "A cat."}')
            turns.append([ROLES[turn["from"]], turn["value"]])
        files = {}
        for tag, one, many, root in ((IMAGE_TAG, "image", "images", self.image_root),
                                     (AUDIO_TAG, "audio", "audios", self.audio_root)):
            names = _file_list(rec, one, many, where)
            n_tags = sum(t[1].count(tag) for t in turns)
            if (names or n_tags) and tag not in self.tags:
                raise DataError(f"the sample has {one} input but the model has no {one} modality", path=where,
                                 hint=f"add one, e.g. modality=[{'vision_clip' if one == 'image' else 'audio_whisper'}]"
                                      f", or remove the {one} samples")
            if names and n_tags == 0:  # LLaVA: the files go in front of the first user turn
                first = next((t for t in turns if t[0] == "user"), turns[0])
                first[1] = f"{tag}\n" * len(names) + first[1]
            elif n_tags != len(names):
                raise DataError(f"{n_tags} {tag} tag(s) in the text but {len(names)} {one} file(s)", path=where,
                                 hint=f"each {tag} takes the next path of {one!r}/{many!r}, in order")
            paths = [root / p for p in names]
            if self.cfg.check_files:
                for p in paths:
                    if not p.is_file():
                        raise DataError(f"{one} file not found: {p}", path=where,
                                         hint=f"check data.{one}_folder (now {root})")
            files[tag] = paths
        if not any(r == "assistant" and v.strip() for r, v in turns):
            raise DataError("no assistant answer: nothing to train on", path=where,
                             hint="every sample needs at least one non-empty gpt turn")
        try:
            enc = encode_conversation(self.tokenizer, [tuple(t) for t in turns], self.tags, self.template,
                                      reserved=self.reserved, where=where)
        except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"): not text any tokenizer takes
            bad = e.object[e.start:e.end] if isinstance(e.object, str) else ""
            raise DataError(f"the conversation holds {bad.encode('unicode_escape').decode() or 'a character'}, "
                            f"which is not valid Unicode text ({e.reason})", path=where,
                            hint="a lone surrogate escape in the JSON: fix or remove the sample") from None
        ids, labels, runs = enc.input_ids, enc.labels, enc.runs
        if len(ids) > self.max_len:
            cut = self.max_len
            if self.cfg.truncation == "drop":
                return self._drop(where, "too_long")
            if any(start < cut < start + length for _, start, length in runs):
                return self._drop(where, "cut_inside_placeholders")
            ids, labels = ids[:cut], labels[:cut]
            kept = [r for r in runs if r[1] < cut]
            for tag, paths in files.items():  # items whose runs were cut off go too
                if paths:
                    files[tag] = paths[: sum(1 for r in kept if r[0] == self.tags[tag].modality)]
            self.num_truncated += 1
        if not any(lab != IGNORE_INDEX for lab in labels[1:]):
            raise DataError(f"no trainable tokens left after truncating to {self.max_len} tokens", path=where,
                             hint="the answers start past the limit: raise data.max_seq_len, use "
                                  "truncation: drop, or shorten the sample")
        return {"input_ids": torch.tensor(ids, dtype=torch.int32), "labels": torch.tensor(labels, dtype=torch.int32),
                "images": files.get(IMAGE_TAG, []), "audio": files.get(AUDIO_TAG, []), "where": where}

    def _drop(self, where: str, reason: str) -> None:
        self.drop_reasons[reason] += 1
        if len(self.dropped) < 100:
            self.dropped.append((where, reason))
        return None

    # ---------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        items, num_items = {}, {name: 0 for name in self.input_modalities}
        for tag, paths, load in ((IMAGE_TAG, s["images"], self.media.image), (AUDIO_TAG, s["audio"], self.media.audio)):
            if not paths:
                continue
            loaded = [load(p, s["where"]) for p in paths]
            items[self.tags[tag].modality] = {
                enc: {kw: torch.cat([x[enc][kw] for x in loaded]) for kw in kws} for enc, kws in loaded[0].items()}
            num_items[self.tags[tag].modality] = len(paths)
        return {"input_ids": s["input_ids"].long(), "labels": s["labels"].long(), "items": items,
                "num_items": num_items, "targets": {}}

