"""Tokenizers for training data and prompts, and the chat template that masks the loss.

Two tokenizers share one small interface (``encode``, ``decode``, ``bos_id``,
``eos_id``, ``pad_id``, ``vocab_size``):

- ``ByteTokenizer``: UTF-8 bytes are ids 0..255; bos/eos/pad follow at
  ``special_start``, ``special_start + 1``, ``special_start + 2``. Needs nothing
  on disk, so the default job trains with no downloads.
- ``HFTokenizer``: a Hugging Face tokenizer loaded from a LOCAL directory
  (``AutoTokenizer.from_pretrained(dir, local_files_only=True, trust_remote_code=False)``); never
  downloads, never runs code that comes with the folder (a folder asking for it is refused).

``encode_conversation`` turns user/assistant turns (with modality tags such as
``<image>``) into ``input_ids`` and ``labels``: every tag becomes a run of
placeholder ids, and only assistant answers (and their end-of-turn token) are
trained; everything else gets label -100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mimo_spec.data.config import ChatTemplate, validate_data_config
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.loss import IGNORE_INDEX

# Files one of which every saved Hugging Face tokenizer directory holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int  # one past the largest id the tokenizer can produce

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids, skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus bos/eos/pad at ``special_start`` .. ``special_start + 2``.

    ``vocab_size`` is ``special_start + 3``: the LM's vocabulary must be at least that big.
    """

    def __init__(self, special_start: int = 256):
        if special_start < 256:
            raise ConfigError(f"must be >= 256 (bytes take ids 0..255), got {special_start}",
                              path="data.special_tokens_start")
        self.bos_id, self.eos_id, self.pad_id = special_start, special_start + 1, special_start + 2
        self.vocab_size = special_start + 3
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids -> text; special ids are dropped (or shown as <bos>/<eos>/<pad>), other non-byte ids as U+FFFD."""
        names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
        out, pending = [], bytearray()
        for i in (int(i) for i in ids):
            if 0 <= i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if i in names:
                out.append("" if skip_special_tokens else names[i])
            else:  # e.g. a modality placeholder id
                out.append("" if skip_special_tokens else "\ufffd")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteTokenizer(bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory, behind the same interface.

    pad falls back to eos, then to 0 (padding is never trained, so any id works).
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"no such tokenizer directory: {directory}", path="data.tokenizer",
                              hint="give 'byte' or a local directory saved with tokenizer.save_pretrained(); "
                                   "nothing is downloaded")
        if not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"{directory} holds no tokenizer files", path="data.tokenizer",
                              hint=f"expected one of {', '.join(TOKENIZER_FILES)} "
                                   "(save one with tokenizer.save_pretrained(dir))")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("a tokenizer directory needs the transformers package", path="data.tokenizer",
                              hint="pip install 'mimo-spec[hf]', or use tokenizer: byte") from None
        remote = remote_code_request(directory)
        if remote:
            raise ConfigError(f"the tokenizer in {directory} asks to run code from its folder ({remote}); "
                              "mimo-spec never runs code that comes with a tokenizer", path="data.tokenizer",
                              hint="use a tokenizer whose class transformers ships (saved with save_pretrained()), "
                                   "or tokenizer: byte")
        try:
            # trust_remote_code=False, never None: None makes transformers ask on stdin (jobs have no terminal)
            self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # corrupt or incomplete files: say which directory
            raise ConfigError(f"cannot load the tokenizer in {directory}: {e}", path="data.tokenizer",
                              hint="check the files were written by save_pretrained()") from None
        self.directory = directory
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(self.tok)
        self.special_ids = set(self.tok.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.directory)!r}, vocab_size={self.vocab_size})"


# Files of a Hugging Face folder whose ``auto_map`` makes transformers import code from the folder.
REMOTE_CODE_FILES = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


def remote_code_request(directory: Path) -> str:
    """Where a Hugging Face folder asks transformers to run its own code (``"config.json: auto_map
    AutoTokenizer -> tok.MyTok"``), or "" when it does not. Read as JSON only: nothing is imported."""
    import json

    for name in REMOTE_CODE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable: transformers' own loading reports it
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            shown = ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else auto_map
            return f"{name}: auto_map {shown}"
    return ""


def reserved_token_ids(model) -> dict[int, str]:
    """Token ids the model's modalities claim (placeholders and generation tokens) -> a description."""
    out = {}
    for name, mod in model.modalities.items():
        if mod.special_token_id is not None:
            out[int(mod.special_token_id)] = f"modalities.{name}.params.special_token_id"
        if mod.generation_token_id is not None:
            out[int(mod.generation_token_id)] = f"modalities.{name}.params.generation_token_id"
    return out


def build_tokenizer(data_cfg, model) -> Tokenizer:
    """The tokenizer ``data_cfg.tokenizer`` names ("byte" or a local directory), checked against ``model``.

    Raises ConfigError naming ``data.tokenizer`` when its ids do not fit the LM's
    vocabulary, or (byte tokenizer) when they collide with a modality's token ids.
    """
    cfg = validate_data_config(data_cfg)
    lm_vocab = int(model.language_model.vocab_size)
    if cfg.tokenizer == "byte":
        tok = ByteTokenizer(cfg.special_tokens_start)
        reserved = reserved_token_ids(model)
        clash = sorted(i for i in set(range(256)) | tok.special_ids if i in reserved)
        if clash:
            raise ConfigError(f"byte tokenizer id {clash[0]} is also {reserved[clash[0]]}",
                              path="data.special_tokens_start" if clash[0] >= 256 else "data.tokenizer",
                              hint="move the modality's token id above the tokenizer's ids, "
                                   "or set data.special_tokens_start elsewhere")
    else:
        tok = HFTokenizer(resolve_path(cfg.tokenizer))
    if tok.vocab_size > lm_vocab:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the language model's vocabulary is "
                          f"{lm_vocab}", path="data.tokenizer",
                          hint=f"raise model.params.vocab_size to at least {tok.vocab_size}"
                               + (" or lower data.special_tokens_start" if cfg.tokenizer == "byte" else ""))
    return tok


def resolve_path(path: str | Path) -> Path:
    """A user path: ``~`` expanded; relative paths against the directory the run was started in.

    Hydra may change the working directory, so its original one is used when it runs.
    """
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd()) / p
    except Exception:  # Hydra not running (tests, Python API)
        pass
    return Path.cwd() / p


# ------------------------------------------------------------------------------ chat template

@dataclass(frozen=True)
class Tag:
    """A modality tag in the text (e.g. ``<image>``) and the run of ids it expands to."""

    modality: str
    token_id: int
    length: int
    trainable: bool = False  # generation tokens of an output modality are trained; input placeholders never


@dataclass
class EncodedConversation:
    """input_ids, labels: lists of equal length S. runs: (modality, start, length) per tag, in order."""

    input_ids: list[int]
    labels: list[int]
    runs: list[tuple[str, int, int]]


def encode_conversation(tokenizer: Tokenizer, turns: list[tuple[str, str]], tags: dict[str, Tag],
                        template: ChatTemplate | None = None, *, add_generation_prompt: bool = False,
                        reserved: set[int] | frozenset = frozenset(), where: str = "") -> EncodedConversation:
    """Lay out ``turns`` [(role, text)] with ``template`` and tokenise them.

    role is "user", "assistant" or "system" (plain untrained text). Each tag in the text becomes ``tag.length``
    copies of ``tag.token_id``. Labels equal the ids on assistant answers and
    their eos, and are -100 elsewhere (bos, prefixes, user turns, input
    placeholders). ``add_generation_prompt`` ends with the assistant prefix (for
    generation). Text that tokenises to a ``reserved`` id raises InputError naming ``where``.
    """
    if template is None:
        template = ChatTemplate()
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True))) if tags else None
    ids: list[int] = []
    labels: list[int] = []
    runs: list[tuple[str, int, int]] = []

    def text(s: str, train: bool) -> None:
        if not s:
            return
        pieces = pattern.split(s) if pattern else [s]
        found = pattern.findall(s) if pattern else []
        for k, piece in enumerate(pieces):
            if piece:
                toks = tokenizer.encode(piece)
                bad = reserved.intersection(toks)
                if bad:
                    raise InputError(f"text {piece[:40]!r} tokenises to id {min(bad)}, a modality's placeholder id",
                                     path=where, hint="give the modality a token id the tokenizer never produces")
                ids.extend(toks)
                labels.extend(toks if train else [IGNORE_INDEX] * len(toks))
            if k < len(found):
                tag = tags[found[k]]
                runs.append((tag.modality, len(ids), tag.length))
                ids.extend([tag.token_id] * tag.length)
                labels.extend([tag.token_id if train and tag.trainable else IGNORE_INDEX] * tag.length)

    def special(token_id: int | None, train: bool) -> None:
        if token_id is not None:
            ids.append(token_id)
            labels.append(token_id if train else IGNORE_INDEX)

    special(tokenizer.bos_id, False)
    text(template.system, False)
    for role, value in turns:
        if role == "user":
            text(template.user_prefix, False)
            text(value, False)
            text(template.user_suffix, False)
        elif role == "assistant":
            text(template.assistant_prefix, False)
            text(value, True)
            special(tokenizer.eos_id, True)  # the model learns to stop
            text(template.assistant_suffix, False)
        elif role == "system":
            text(value, False)
            text(template.user_suffix, False)
        else:
            raise InputError(f"unknown role {role!r}", path=where, hint="roles are user, assistant and system")
    if add_generation_prompt:
        text(template.assistant_prefix, False)
    return EncodedConversation(ids, labels, runs)
