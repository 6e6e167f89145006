"""Synthetic multimodal data that follows whatever modalities the model has.

Every sample is a short chat whose answer is learnable:

- **items** (input modalities): each item is drawn from a small set of classes
  and rendered so that its class is visible: images are a coloured shape
  (``a red circle``: 4 colours x 4 shapes), audio features a band of energy at a
  pitch with a temporal pattern (``a high beep``: 2 pitches x 3 patterns). The
  user turn holds 1..``max_items_per_sample`` items (placeholder runs of
  ``tokens_per_item``), the answer names them in order: ``a red circle and a high beep``.
  Encoders of an unknown input kind get random inputs and the caption ``an item``.
- **items of any size** (encoders with grid inputs, e.g. Qwen2-VL's packed patches with
  ``image_grid_thw``): each item is one of the encoder's own example items (``example_inputs``: items
  of different sizes), its floating inputs redrawn around a level that the caption names
  (``a bright image``, ``a dark video``), so a batch mixes item sizes and each item's placeholder run
  has that item's own length. A video modality whose encoder has a video grid (Qwen's
  ``video_grid_thw``) gets videos of 1 and 2 frame groups.
- **text only** (``text_only_fraction``): counting, repeating words, successors.
- **generation** (output modalities, ``generation_fraction``): ``draw a red circle``
  answered with the modality's generation tokens (trained, so the LM learns to
  emit them; a discrete modality's begin token, codes and end token), with the rendered image (values
  in [0, 1], the shape centred) as the target. ``generation_holdout`` lists drawings the training split
  never asks for (a test of composing a colour and a shape seen only apart).

Sample ``i`` of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import hashlib

import torch

from mimo_spec.data.config import max_length
from mimo_spec.data.drawings import COLORS, SHAPES  # noqa: F401 - also read from here
from mimo_spec.data.preprocess import modality_kind, normalize
from mimo_spec.data.tokenizer import Tag, encode_conversation, reserved_token_ids
from mimo_spec.errors import ConfigError, InputError

PITCHES = {"low": 0.2, "high": 0.65}  # centre of the energy band, as a fraction of the mel bins
SOUNDS = ("hum", "beep", "chirp")
QUESTIONS = {"image": "What is shown?", "audio": "What do you hear?", "video": "What happens?"}
# items of any size: a caption word -> the mean of the item's floating inputs (unit-variance noise around it)
LEVELS = {"dark": -1.0, "bright": 1.0}
# items of any size: the encoder's example items drawn from (sizes differ from one example item to the next)
GRID_POOL = 8
WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "one", "two")
# a sample's text (besides the template and its items) stays below this many tokens (bytes) ...
TEXT_BUDGET = 64
# ... plus at most this many per item (its caption, " and ", a newline)
ITEM_TEXT = 24


def _seed(seed: int, split: str, index: int) -> int:
    """A per-sample seed, stable across processes (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _pick(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=g))


def shape_mask(shape: str, size: int, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """The (size, size) bool mask of ``shape`` on [-1, 1]^2, moved by ``shift`` (dy, dx). The shapes stay
    apart even on an 8 x 8 grid of patches (a 6 x 6 square, a rounded circle, a hollow ring, a cross)."""
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis - float(shift[0]), axis - float(shift[1]), indexing="ij")
    return {
        "square": torch.maximum(x.abs(), y.abs()) < 0.75,
        "circle": x**2 + y**2 < 0.7**2,
        "cross": ((x.abs() < 0.22) | (y.abs() < 0.22)) & (torch.maximum(x.abs(), y.abs()) < 0.85),
        "ring": ((x**2 + y**2).sqrt() - 0.6).abs() < 0.18,
    }[shape]


def render_image(color: str, shape: str, size: int, channels: int = 3, *, noise: float = 0.0,
                 generator: torch.Generator | None = None, shift: bool = True) -> torch.Tensor:
    """A ``color`` ``shape`` on a dark background: (channels, size, size) in [0, 1].

    The shape is shifted a little at random (with ``generator``, unless ``shift`` is false) so samples differ.
    """
    moved = generator is not None and shift
    offset = (torch.rand(2, generator=generator) - 0.5) * 0.3 if moved else torch.zeros(2)
    mask = shape_mask(shape, size, (float(offset[0]), float(offset[1])))
    rgb = torch.tensor(COLORS[color])
    fg = rgb.repeat((channels + 2) // 3)[:channels] if channels != 1 else rgb.mean().view(1)
    img = torch.where(mask, fg.view(-1, 1, 1), torch.full((channels, 1, 1), 0.1))
    if noise:
        img = img + noise * torch.randn(img.shape, generator=generator)
    return img.clamp(0, 1)


def render_audio(pitch: str, sound: str, mel_bins: int, frames: int, *, noise: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Log-mel-like features (mel_bins, frames) in Whisper's range: a band of energy at ``pitch``;
    ``hum`` is steady, ``beep`` switches on and off, ``chirp`` rises."""
    t = torch.arange(frames).float()
    centre = torch.full((frames,), PITCHES[pitch] * mel_bins)
    on = torch.ones(frames, dtype=torch.bool)
    if sound == "beep":
        on = (t // max(1, frames // 8)) % 2 == 0
    elif sound == "chirp":
        centre = centre + (t / max(1, frames - 1) - 0.5) * 0.3 * mel_bins
    bins = torch.arange(mel_bins).float().view(-1, 1)
    band = ((bins - centre.view(1, -1)).abs() <= max(1.0, mel_bins / 12)) & on.view(1, -1)
    x = torch.where(band, torch.tensor(1.0), torch.tensor(-0.5))
    if noise:
        x = x + noise * torch.randn(x.shape, generator=generator)
    return x


def _stats(values, channels: int) -> list[float]:
    """Per-channel mean/std for ``channels`` (averaged when the config's count does not match)."""
    values = list(values)
    return values if len(values) in (1, channels) else [sum(values) / len(values)]


class SyntheticDataset(torch.utils.data.Dataset):
    """``num_samples`` (train) or ``eval_samples`` (eval) generated samples for ``model``."""

    def __init__(self, cfg, model, tokenizer, split: str = "train"):
        # only shapes and ids are kept from the model, so the dataset pickles cheaply into DataLoader workers
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.template = cfg.template
        self.max_len = max_length(cfg, model)
        self.length = cfg.num_samples if split == "train" else cfg.eval_samples
        # an item takes at least one token, so no more than max_len fit: a larger setting only makes the
        # fitting loop below count down for ever (the same samples as before for any setting that fits)
        self.max_items = min(cfg.max_items_per_sample, self.max_len)
        self.reserved = set(reserved_token_ids(model))
        empty = encode_conversation(tokenizer, [("user", ""), ("assistant", "")], {}, self.template)
        self.text_budget = TEXT_BUDGET + len(empty.input_ids)  # the template's own tokens count too
        self.inputs, self.outputs, self.tags = {}, {}, {}
        for name, mod in model.modalities.items():
            if mod.has_input and _takes_grids(mod):
                self._grid_modality(name, mod)
            elif mod.has_input:
                # shapes of one item per encoder, from the encoder itself
                example = mod.example_inputs(1)
                shapes = {e: {k: tuple(v.shape[1:]) for k, v in kws.items()} for e, kws in example.items()}
                per_item = mod.tokens_per_item(example)
                self.inputs[name] = {"kind": modality_kind(mod), "shapes": shapes, "cost": per_item + ITEM_TEXT}
                self.tags[f"<{name}>"] = Tag(name, mod.special_token_id, per_item)
                self._check_fits(per_item + ITEM_TEXT, f"one {name} item takes {per_item} placeholder tokens")
            if mod.has_output:
                shape = tuple(mod.example_targets(1).shape[1:])
                n = mod.num_generation_tokens
                self.outputs[name] = {"shape": shape, "tokens": n}
                discrete = getattr(mod, "tokenizer", None) is not None  # begin, n codes, end
                self.tags[f"<gen:{name}>"] = Tag(name, mod.generation_token_id, n, trainable=True,
                                                 begin_id=getattr(mod, "begin_token_id", None) if discrete else None,
                                                 end_id=getattr(mod, "end_token_id", None) if discrete else None,
                                                 codes=discrete)
                self._check_fits(n + 2, f"generating one {name} item takes {n} tokens")

    def _grid_modality(self, name: str, mod) -> None:
        """An input modality whose items differ in size: a pool of the encoder's example items, each kept as
        templates (floating inputs by shape, redrawn per item; grids and masks as they are) with its token
        count. Its tag stands for one placeholder; each run is widened to its item's count."""
        from mimo_spec.models.items import modality_item_count, slice_modality_items

        example = mod.example_inputs(GRID_POOL, generator=torch.Generator().manual_seed(0))
        if modality_kind(mod) == "video":
            example = _video_example(mod, example) or example
        count = modality_item_count(mod, example)
        tokens = [int(t) for t in mod.item_tokens(example)]
        pool = []
        for j in range(count):
            item = slice_modality_items(mod, example, j, j + 1)
            pool.append({e: {kw: tuple(t.shape) if t.is_floating_point() else t.clone() for kw, t in kws.items()}
                         for e, kws in item.items()})
        cost = max(tokens) + ITEM_TEXT
        self.inputs[name] = {"kind": modality_kind(mod), "pool": pool, "tokens": tokens, "cost": cost}
        self.tags[f"<{name}>"] = Tag(name, mod.special_token_id, 1)
        self._check_fits(cost, f"one {name} item takes up to {max(tokens)} placeholder tokens")

    def _check_fits(self, tokens: int, what: str) -> None:
        if tokens + self.text_budget > self.max_len:
            raise ConfigError(f"{what}; with ~{self.text_budget} text tokens that exceeds the maximum length "
                              f"{self.max_len}", path="data.max_seq_len",
                              hint="raise data.max_seq_len / model.params.max_seq_len")

    def __len__(self) -> int:
        return self.length

    # ------------------------------------------------------------------------ sample parts
    def _item(self, name: str, g: torch.Generator) -> tuple[dict, str] | tuple[dict, str, int]:
        """One item of input modality ``name``: ({encoder: {kwarg: (1, ...)}}, caption); an item of any
        size: ({encoder: {kwarg: tensor}}, caption, placeholder count)."""
        spec, noise = self.inputs[name], self.cfg.noise
        if "pool" in spec:
            j = _pick(g, len(spec["pool"]))
            word = list(LEVELS)[_pick(g, len(LEVELS))]
            level = LEVELS[word]
            out = {enc: {kw: level + torch.randn(t, generator=g) if isinstance(t, tuple) else t.clone()
                         for kw, t in kws.items()}
                   for enc, kws in spec["pool"][j].items()}
            kind = spec["kind"] if spec["kind"] in QUESTIONS else "item"
            return out, f"a {word} {kind}", spec["tokens"][j]
        if spec["kind"] == "image":
            color, shape = list(COLORS)[_pick(g, len(COLORS))], SHAPES[_pick(g, len(SHAPES))]
            out = {}
            for enc, kws in spec["shapes"].items():
                c, h, _ = kws["pixel_values"]
                img = render_image(color, shape, h, c, noise=noise, generator=g)
                img = normalize(img, _stats(self.cfg.image_mean, c), _stats(self.cfg.image_std, c))
                out[enc] = {"pixel_values": img.unsqueeze(0)}
            return out, f"a {color} {shape}"
        if spec["kind"] == "audio":
            pitch, sound = list(PITCHES)[_pick(g, len(PITCHES))], SOUNDS[_pick(g, len(SOUNDS))]
            out = {enc: {"input_features": render_audio(pitch, sound, *kws["input_features"], noise=noise,
                                                        generator=g).unsqueeze(0)}
                   for enc, kws in spec["shapes"].items()}
            return out, f"a {pitch} {sound}"
        # an encoder of unknown kind: random inputs of its example shapes (nothing to learn from them)
        return {enc: {kw: torch.randn((1, *shape), generator=g) for kw, shape in kws.items()}
                for enc, kws in spec["shapes"].items()}, "an item"

    def _text_task(self, g: torch.Generator) -> tuple[str, str]:
        task = _pick(g, 3)
        if task == 0:
            a = _pick(g, 6)
            b = a + 2 + _pick(g, 5)
            return f"count from {a} to {b}", " ".join(str(i) for i in range(a, b + 1))
        if task == 1:
            words = " ".join(WORDS[_pick(g, len(WORDS))] for _ in range(1 + _pick(g, 3)))
            return f"repeat: {words}", words
        n = _pick(g, 99)
        return f"what comes after {n}?", str(n + 1)

    def _generation(self, g: torch.Generator) -> tuple[str, str, dict]:
        name = list(self.outputs)[_pick(g, len(self.outputs))]
        shape = self.outputs[name]["shape"]
        if len(shape) == 3:  # an image (C, H, W)
            held_out = set(self.cfg.generation_holdout) if self.split == "train" else set()
            color, kind = list(COLORS)[_pick(g, len(COLORS))], SHAPES[_pick(g, len(SHAPES))]
            while f"{color} {kind}" in held_out:  # never asked for in training
                color, kind = list(COLORS)[_pick(g, len(COLORS))], SHAPES[_pick(g, len(SHAPES))]
            # the drawing a prompt asks for is centred: one image per prompt, which greedy decoding can match
            target = render_image(color, kind, shape[1], shape[0], generator=g, shift=False)
            prompt = f"draw a {color} {kind}"
        else:
            target = torch.rand(shape, generator=g)
            prompt = f"make a {name} item"
        return prompt, f"<gen:{name}>", {name: target.unsqueeze(0)}

    # ----------------------------------------------------------------------------- sample
    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, self.split, index))
        r = float(torch.rand(1, generator=g))
        gen_p = self.cfg.generation_fraction if self.outputs else 0.0
        text_p = self.cfg.text_only_fraction if self.inputs else 1.0
        counts = {name: 0 for name in self.inputs}
        targets, user, answer = {}, "", ""
        if r < gen_p:
            user, answer, targets = self._generation(g)
        elif r < gen_p + (1 - gen_p) * text_p:
            user, answer = self._text_task(g)
        else:
            counts = {name: _pick(g, self.max_items + 1) for name in self.inputs}
            if not any(counts.values()):
                counts[list(self.inputs)[_pick(g, len(self.inputs))]] = 1
            # fewer items until they fit (one always does: checked at init); cost: placeholders + caption
            while sum(c * self.inputs[n]["cost"] for n, c in counts.items()) + self.text_budget > self.max_len:
                biggest = max(counts, key=lambda n: counts[n] * self.inputs[n]["cost"])
                counts[biggest] -= 1
        return self._sample(counts, user, answer, targets, g)

    def token_length(self, index: int) -> int:
        """Sample ``index``'s token count (it is generated: synthetic samples are cheap)."""
        return int(self[index]["input_ids"].shape[0])

    def _sample(self, counts: dict, user: str, answer: str, targets: dict, g: torch.Generator) -> dict:
        items, captions, tags, lengths = {}, [], [], {}
        for name, n in counts.items():
            parts = [self._item(name, g) for _ in range(n)]
            if parts:
                items[name] = {enc: {kw: torch.cat([p[0][enc][kw] for p in parts]) for kw in kws}
                               for enc, kws in parts[0][0].items()}
                captions += [p[1] for p in parts]
                tags += [f"<{name}>"] * n
                if len(parts[0]) == 3:  # items of any size: each run takes its own item's count
                    lengths[name] = [p[2] for p in parts]
        if captions:
            kinds = {self.inputs[n]["kind"] for n, c in counts.items() if c}
            question = QUESTIONS.get(kinds.pop() if len(kinds) == 1 else "mixed", "Describe these.")
            user = "\n".join(tags) + "\n" + question
            answer = " and ".join(captions)
        enc = encode_conversation(self.tokenizer, [("user", user), ("assistant", answer)], self.tags,
                                  self.template, reserved=self.reserved, where=f"synthetic[{self.split}]")
        ids, labels = _widen(enc.input_ids, enc.labels, enc.runs, lengths)
        if len(ids) > self.max_len:  # only a tokenizer far wordier than bytes gets here
            raise ConfigError(f"a synthetic sample takes {len(ids)} tokens, more than {self.max_len}",
                              path="data.max_seq_len", hint="raise it or lower data.max_items_per_sample")
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "items": items, "num_items": dict(counts),
                "targets": {m: t.float() for m, t in targets.items()}}


def _takes_grids(mod) -> bool:
    """Whether a modality's items go through an encoder with grid inputs (items of any size)."""
    return any(getattr(e, "grid_inputs", None) for e in getattr(mod, "src", mod).encoders.values())


def _widen(ids: list[int], labels: list[int], runs: list[tuple[str, int, int]],
           lengths: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """The k-th placeholder run of each modality in ``lengths`` (one token) repeated to ``lengths[m][k]``."""
    if not lengths:
        return list(ids), list(labels)
    out_ids, out_labels, pos, seen = [], [], 0, dict.fromkeys(lengths, 0)
    for name, start, length in runs:
        if name not in lengths:
            continue
        n = lengths[name][seen[name]]
        seen[name] += 1
        out_ids += ids[pos:start] + [ids[start]] * n
        out_labels += labels[pos:start] + [labels[start]] * n
        pos = start + length
    return out_ids + ids[pos:], out_labels + labels[pos:]


def _video_example(mod, example: dict) -> dict | None:
    """A video modality's example items as videos: for encoders with a video grid (a grid input named
    ``video*`` whose rows are (t, h, w), e.g. Qwen's ``video_grid_thw``), the example items under those
    names with every second one of 2 frame groups. None when an encoder has no such grid or the result is
    not valid input (the example then stays as it is)."""
    from mimo_spec.models.items import grid_of

    encoders = getattr(mod, "src", mod).encoders
    out = {}
    for name, kws in example.items():
        enc = encoders[name]
        g = grid_of(enc, kws)
        grids = getattr(enc, "grid_inputs", None) or {}
        video = next((n for n in grids if n.startswith("video") and g is not None and n != g[0]), None)
        if video is None or kws[g[0]].dim() != 2 or kws[g[0]].shape[1] != 3 or len(grids[video]) != len(g[1]):
            return None
        grid = kws[g[0]].clone()
        grid[1::2, 0] *= 2
        rows = sum(int(r) for r in enc.rows_per_item(video, grid))
        packed = dict(zip(g[1], grids[video]))
        item = {video: grid}
        for kw, t in kws.items():
            if kw in packed:
                item[packed[kw]] = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)  # values are redrawn per item
            elif kw != g[0]:
                item[kw] = t
        out[name] = item
    try:
        mod.validate_inputs(out, "videos")
    except InputError:
        return None
    return out
