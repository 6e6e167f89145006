"""Tokenizers for training data and prompts, and the chat templates that lay conversations out.

Two tokenizers share one small interface (``encode``, ``encode_batch``, ``decode``, ``bos_id``,
``eos_id``, ``pad_id``, ``vocab_size``):

- ``ByteTokenizer``: UTF-8 bytes are ids 0..255; bos/eos/pad follow at
  ``special_start``, ``special_start + 1``, ``special_start + 2``. Needs nothing
  on disk, so the default job trains with no downloads.
- ``HFTokenizer``: a Hugging Face tokenizer loaded from a LOCAL directory
  (``AutoTokenizer.from_pretrained(dir, local_files_only=True, trust_remote_code=False)``); never
  downloads, never runs code that comes with the folder (a folder asking for it is refused).

``encode_conversation`` turns user/assistant turns (with modality tags such as
``<image>``) into ``input_ids`` and ``labels``: laid out with ``data.template``, else the
tokenizer's own chat template (``apply_chat_template``), else LLaVA-1.5's layout; every tag
becomes a run of placeholder ids, and only assistant answers (and their end-of-turn token) are
trained; everything else gets label -100. ``ConversationEncoder`` says exactly what is trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mimo_spec.data.config import ChatTemplate, validate_data_config
from mimo_spec.data.local import remote_code_request, resolve_path
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
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

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
        self._added: dict[str, int] | None = None
        # a fast (Rust-backed) tokenizer's core: ids with character offsets, at a fraction of the wrapper's cost
        self.backend = getattr(self.tok, "backend_tokenizer", None) if getattr(self.tok, "is_fast", False) else None

    def encode(self, text: str) -> list[int]:
        if self.backend is not None:  # the Rust tokenizer itself: the same ids, without the Python wrapper's cost
            return self._backend_encode(text).ids
        return list(self.tok.encode(text, add_special_tokens=False))

    def _backend_encode(self, text: str):
        try:
            return self.backend.encode(text, add_special_tokens=False)
        except TypeError:  # not UTF-8 text (a lone surrogate): raise UnicodeEncodeError, as the byte tokenizer does
            text.encode("utf-8")
            raise

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text. One Rust call each: for the few short pieces of a conversation that is
        faster than a batched call (whose thread pool also makes forked DataLoader workers warn)."""
        return [self.encode(t) for t in texts]

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, (start, end) character offsets of each token) for each text; fast tokenizers only."""
        out = []
        for text in texts:
            e = self._backend_encode(text)
            out.append((e.ids, e.offsets))
        return out

    @property
    def added_vocab(self) -> dict[str, int]:
        """The tokenizer's added tokens (specials such as ``<|im_end|>``, ``<|image_pad|>``) -> id."""
        if self._added is None:
            self._added = dict(self.tok.get_added_vocab())
        return self._added

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.directory)!r}, vocab_size={self.vocab_size})"


def reserved_token_ids(model) -> dict[int, str]:
    """Token ids the model's modalities claim (placeholders and generation tokens) -> a description."""
    out = {}
    for name, mod in model.modalities.items():
        if mod.special_token_id is not None:
            out[int(mod.special_token_id)] = f"modalities.{name}.params.special_token_id"
        if mod.generation_token_id is not None:
            out[int(mod.generation_token_id)] = f"modalities.{name}.params.generation_token_id"
        for key in ("begin_token_id", "end_token_id"):
            if getattr(mod, key, None) is not None:
                out[int(getattr(mod, key))] = f"modalities.{name}.params.{key}"
    return out


def placeholder_modalities(data_cfg, model) -> dict[str, str]:
    """Which modality each placeholder tag of the data goes to: ``data.image_token`` -> the image input
    modality, ``data.audio_token`` -> the audio one (``data.image_modality`` / ``data.audio_modality``
    when set, else the model's only one; a kind the model lacks is left out)."""
    from mimo_spec.data.preprocess import find_modality

    cfg = validate_data_config(data_cfg)
    out = {}
    for kind in ("image", "video", "audio"):
        name = find_modality(model, kind, getattr(cfg, f"{kind}_modality", None), f"{kind}_modality")
        if name is not None:
            out[getattr(cfg, f"{kind}_token")] = name
    return out


def check_placeholder_tokens(data_cfg, model, tok: HFTokenizer) -> None:
    """A Hugging Face tokenizer against the model's placeholder ids.

    - ``data.image_token`` / ``data.audio_token`` that is one of the tokenizer's added tokens (its own
      ``<image>`` or ``<|image_pad|>``) must be its modality's ``special_token_id``: then that id is
      the tag's, legitimately in the tokenizer's range.
    - no modality id may be the tokenizer's bos / eos / pad / unk id (every sample would hold it).

    Ordinary text that tokenises to a placeholder id is refused per sample by ``encode_conversation``.
    """
    cfg = validate_data_config(data_cfg)
    try:
        tags = placeholder_modalities(cfg, model)
    except ConfigError:  # several image modalities and none chosen: the dataset says so when it needs one
        tags = {}
    for key in ("image_token", "video_token", "audio_token"):
        text = getattr(cfg, key)
        tid, name = tok.added_vocab.get(text), tags.get(text)
        if tid is None or name is None:
            continue
        sid = model.modalities[name].special_token_id
        if sid != tid:
            raise ConfigError(f"{text!r} is the tokenizer's own token {tid}, but modalities.{name}.params."
                              f"special_token_id is {sid}: the tag must be the modality's placeholder id",
                              path=f"data.{key}",
                              hint=f"set modalities.{name}.params.special_token_id={tid}, or choose a data.{key} "
                                   "that is not one of the tokenizer's tokens")
    reserved = reserved_token_ids(model)
    hf = tok.tok
    for what in ("bos", "eos", "pad", "unk"):
        tid = getattr(hf, f"{what}_token_id", None)
        if tid is not None and int(tid) in reserved:
            raise ConfigError(f"the tokenizer's {what} token {getattr(hf, f'{what}_token')!r} is id {tid}, which is "
                              f"also {reserved[int(tid)]}", path="data.tokenizer",
                              hint="give the modality a token id the tokenizer never produces")


def build_tokenizer(data_cfg, model) -> Tokenizer:
    """The tokenizer ``data_cfg.tokenizer`` names ("byte" or a local directory), checked against ``model``.

    Raises ConfigError naming ``data.tokenizer`` when its ids do not fit the LM's
    vocabulary, or when they collide with a modality's token ids (byte tokenizer: any of its ids;
    Hugging Face: see ``check_placeholder_tokens``).
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
    if isinstance(tok, HFTokenizer):
        check_placeholder_tokens(cfg, model, tok)
        resolve_template(cfg.template, tok)  # a tokenizer with several chat templates and no default: say so now
    return tok


# ------------------------------------------------------------------------------ chat template

ROLES = ("user", "assistant", "system")
# a Jinja chat template that marks what is trained with {% generation %} ... {% endgeneration %}
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# stands for message k when a template's own text is found (private-use characters: no template changes them)
SENTINEL = "\ue000{}\ue001"


@dataclass(frozen=True)
class Tag:
    """A modality tag in the text (e.g. ``<image>``) and the run of ids it expands to."""

    modality: str
    token_id: int
    length: int
    trainable: bool = False  # generation tokens of an output modality are trained; input placeholders never
    # a discrete modality's item: its begin / end tokens around the run (trained with a trainable tag), and the
    # run's positions are codes (scored by the modality's own loss, so their LM labels are -100)
    begin_id: int | None = None
    end_id: int | None = None
    codes: bool = False


@dataclass
class EncodedConversation:
    """input_ids, labels: lists of equal length S. runs: (modality, start, length) per tag, in order."""

    input_ids: list[int]
    labels: list[int]
    runs: list[tuple[str, int, int]]


def tokenizer_chat_template(tokenizer) -> str | None:
    """The Jinja chat template a Hugging Face tokenizer comes with (its default one), or None."""
    hf = getattr(tokenizer, "tok", None)
    if hf is None or not getattr(hf, "chat_template", None):
        return None
    try:
        template = hf.get_chat_template()
    except ValueError as e:  # several named templates, none of them "default"
        raise ConfigError(f"the tokenizer's chat template cannot be chosen: {e}", path="data.template",
                          hint="set data.template (user_prefix, assistant_prefix ...) to lay conversations "
                               "out") from None
    _check_jinja(template, getattr(tokenizer, "path", None))
    return template


def _check_jinja(template: str, where) -> None:
    """A chat template that is not valid Jinja is the tokenizer folder's fault, not every sample's: compiled
    now as transformers compiles it (its sandbox and extensions), a syntax error is a ConfigError."""
    try:
        from jinja2.exceptions import TemplateSyntaxError
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: the first sample's rendering says it instead
        return
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise ConfigError(f"the tokenizer's chat template is not valid Jinja: {e.message} (template line {e.lineno})",
                          path="data.tokenizer" + (f" ({where})" if where else ""),
                          hint="fix chat_template in the tokenizer folder (tokenizer_config.json or "
                               "chat_template.jinja), or set data.template to lay conversations out") from None


def resolve_template(template: ChatTemplate | None, tokenizer) -> ChatTemplate | str:
    """The layout conversations get: ``template`` (``data.template``) when set, else the tokenizer's own
    Jinja ``chat_template`` (a str) when it has one, else ``ChatTemplate()`` (LLaVA-1.5's layout)."""
    if template is not None:
        return template
    own = tokenizer_chat_template(tokenizer)
    return own if own is not None else ChatTemplate()


def _alternation(texts) -> re.Pattern | None:
    texts = sorted(set(texts), key=len, reverse=True)  # longest first: "<image_2>" before "<image>"
    return re.compile("|".join(re.escape(t) for t in texts)) if texts else None


class ConversationEncoder:
    """``encode_conversation`` for one tokenizer, tag set, template and reserved ids, with what it can
    compute once (tag patterns, the template's own text for each sequence of roles) kept between calls.

    ``encoder(turns, add_generation_prompt=False, where="")`` -> EncodedConversation, exactly as
    ``encode_conversation(tokenizer, turns, tags, template, ...)``; that function keeps one per tokenizer.

    Two layouts (``resolve_template``):

    - a ``ChatTemplate`` (``data.template``, or a tokenizer without a chat template, e.g. the byte one):
      bos, then the template's prefixes and suffixes around each turn, each piece tokenised on its own
      (``encode_batch``); after each assistant answer the tokenizer's eos. Trained: the answer and that
      eos. Tags are cut out of the text and replaced by their runs.
    - the tokenizer's own Jinja ``chat_template``, through ``apply_chat_template`` (so bos, headers and
      end-of-turn tokens are the template's). Trained:

      * a template with ``{% generation %}`` blocks: exactly the tokens transformers' assistant mask marks
        (``return_assistant_tokens_mask``), nothing else;
      * otherwise: every token that overlaps an assistant message's text in the rendered conversation,
        plus the template's text after the answer up to and including its first special or added token
        (``<|im_end|>``, ``<|eot_id|>``, ``</s>``: the model learns to stop), when that token comes before
        the next message's text. Headers (``<|im_start|>assistant\\n``), what follows the end-of-turn
        token, system and user turns are not trained. An answer the template does not show as written
        (not even stripped of surrounding white space) raises InputError naming ``where``.

      A tag that is one of the tokenizer's added tokens (``<|image_pad|>``) is tokenised as it is and each
      of its ids becomes the tag's run; any other tag is cut out of the rendered text (so it never merges
      with its neighbours) and the pieces are tokenised apart. A fast tokenizer is called once per piece
      with offsets (one Rust call for a conversation without cut-out tags); a slow one (no offsets) gets
      the text cut at the trained spans' ends too.

    Tag runs are trained only when ``tag.trainable`` and inside a trained span. Any other token whose id
    is ``reserved`` (a modality's placeholder or generation id) raises InputError naming ``where``.
    """

    def __init__(self, tokenizer: Tokenizer, tags: dict[str, Tag], template: ChatTemplate | None = None,
                 reserved=frozenset()):
        self.tokenizer, self.tags = tokenizer, dict(tags)
        self.layout = resolve_template(template, tokenizer)
        self.reserved = frozenset(int(i) for i in reserved)
        self.jinja = isinstance(self.layout, str)
        self.hf = tokenizer.tok if self.jinja else None
        added = tokenizer.added_vocab if self.jinja else {}
        # tags that are added tokens of the tokenizer: their id -> the tag (tokenised in place, then expanded)
        self.inline = {added[t]: tag for t, tag in self.tags.items() if t in added}
        self.pattern = _alternation(t for t in self.tags if t not in added)  # tags cut out of the text
        self.markers = self.jinja and bool(GENERATION_MARK.search(self.layout))
        self.fast = self.jinja and getattr(tokenizer, "backend", None) is not None
        # the tokens that may end an assistant turn: special and added tokens other than tags
        self.stop = _alternation(t for t in list(added) + list(getattr(self.hf, "all_special_tokens", []))
                                 if t and t not in self.tags) if self.jinja else None
        self._glue: dict[tuple, list[str] | None] = {}

    def __call__(self, turns, *, add_generation_prompt: bool = False, where: str = "") -> EncodedConversation:
        for role, _ in turns:
            if role not in ROLES:
                raise InputError(f"unknown role {role!r}", path=where, hint="roles are user, assistant and system")
        if self.jinja:
            return self._encode_jinja(turns, add_generation_prompt, where)
        return self._encode_layout(turns, add_generation_prompt, where)

    # --------------------------------------------------------------- ChatTemplate (data.template) layout
    def _encode_layout(self, turns, add_generation_prompt: bool, where: str) -> EncodedConversation:
        t, tok = self.layout, self.tokenizer
        segments: list[tuple[str | int, bool]] = []  # (text to tokenise | a special id, trained)

        def text(s: str, train: bool) -> None:
            if s:
                segments.append((s, train))

        def special(token_id: int | None, train: bool) -> None:
            if token_id is not None:
                segments.append((int(token_id), train))

        special(tok.bos_id, False)
        text(t.system, False)
        for role, value in turns:
            if role == "user":
                text(t.user_prefix, False)
                text(value, False)
                text(t.user_suffix, False)
            elif role == "assistant":
                text(t.assistant_prefix, False)
                text(value, True)
                special(tok.eos_id, True)  # the model learns to stop
                text(t.assistant_suffix, False)
            else:  # system: plain untrained text
                text(value, False)
                text(t.user_suffix, False)
        if add_generation_prompt:
            text(t.assistant_prefix, False)

        plan: list[tuple[str, object, bool]] = []  # ("text", piece index, train) | ("id", id, _) | ("tag", Tag, _)
        pieces: list[str] = []
        for item, train in segments:
            if isinstance(item, int):
                plan.append(("id", item, train))
                continue
            pos = 0
            for m in self.pattern.finditer(item) if self.pattern else ():
                if m.start() > pos:
                    plan.append(("text", len(pieces), train))
                    pieces.append(item[pos:m.start()])
                plan.append(("tag", self.tags[m.group()], train))
                pos = m.end()
            if pos < len(item):
                plan.append(("text", len(pieces), train))
                pieces.append(item[pos:])
        encoded = encode_many(tok, pieces)

        ids: list[int] = []
        labels: list[int] = []
        runs: list[tuple[str, int, int]] = []
        for kind, what, train in plan:
            if kind == "text":
                toks = encoded[what]
                bad = self.reserved.intersection(toks)
                if bad:
                    raise InputError(f"text {pieces[what][:40]!r} tokenises to id {min(bad)}, a modality's "
                                     "placeholder id", path=where,
                                     hint="give the modality a token id the tokenizer never produces")
                ids.extend(toks)
                labels.extend(toks if train else [IGNORE_INDEX] * len(toks))
            elif kind == "id":
                ids.append(what)
                labels.append(what if train else IGNORE_INDEX)
            else:
                self._run(what, train, ids, labels, runs)
        return EncodedConversation(ids, labels, runs)

    @staticmethod
    def _run(tag: Tag, train: bool, ids: list[int], labels: list[int], runs: list) -> None:
        trained = train and tag.trainable
        if tag.begin_id is not None:
            ids.append(tag.begin_id)
            labels.append(tag.begin_id if trained else IGNORE_INDEX)
        runs.append((tag.modality, len(ids), tag.length))
        ids.extend([tag.token_id] * tag.length)
        labels.extend([tag.token_id if trained and not tag.codes else IGNORE_INDEX] * tag.length)
        if tag.end_id is not None:
            ids.append(tag.end_id)
            labels.append(tag.end_id if trained else IGNORE_INDEX)

    # --------------------------------------------------------------- the tokenizer's Jinja chat template
    def _render(self, messages, add_generation_prompt: bool, where: str, **kw):
        from jinja2.exceptions import TemplateError

        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)
        except TemplateError as e:  # e.g. raise_exception('Conversation roles must alternate ...')
            raise InputError(f"the tokenizer's chat template refuses this conversation: {e}", path=where,
                             hint="fix the conversation, or set data.template to lay it out") from None
        except TypeError:  # the tokenizer refuses what is not UTF-8 text: say UnicodeEncodeError, as elsewhere
            for m in messages:
                m["content"].encode("utf-8")
            raise

    def _encode_jinja(self, turns, add_generation_prompt: bool, where: str) -> EncodedConversation:
        messages = [{"role": r, "content": v} for r, v in turns]
        cut = self.pattern is not None and any(self.pattern.search(v) for _, v in turns)
        if self.markers:
            out = self._render(messages, add_generation_prompt, where, tokenize=True, return_dict=True,
                               return_assistant_tokens_mask=True, tokenizer_kwargs={"return_offsets_mapping": cut})
            if not cut:  # transformers' own ids and mask: only tags and reserved ids are left to handle
                return self._assemble([(list(out["input_ids"]), list(out["assistant_masks"]))], where)
            spans = []  # the marked tokens' characters, as (start, end) spans of the rendered text
            for (a, b), m in zip(out["offset_mapping"], out["assistant_masks"]):
                if m:
                    if spans and a <= spans[-1][1]:
                        spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
                    else:
                        spans.append((a, b))
            text = self._render(messages, add_generation_prompt, where, tokenize=False)
        else:
            text = self._render(messages, add_generation_prompt, where, tokenize=False)
            spans = self._answer_spans(text, turns, add_generation_prompt, where)
        return self._tokenize(text, spans, where)

    def _glue_for(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[str] | None:
        """The template's own text around the messages for this sequence of roles: len(roles) + 1 strings,
        or None when a stand-in message does not come out in order (the template drops or reorders them)."""
        key = (roles, add_generation_prompt)
        if key not in self._glue:
            if len(self._glue) > 256:
                self._glue.clear()
            glue = None
            marks = [SENTINEL.format(k) for k in range(len(roles))]
            try:
                out = self.hf.apply_chat_template([{"role": r, "content": m} for r, m in zip(roles, marks)],
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)
                glue, pos = [], 0
                for m in marks:
                    i = out.index(m, pos)
                    glue.append(out[pos:i])
                    pos = i + len(m)
                glue.append(out[pos:])
            except Exception:  # the template refuses stand-ins (or drops them): search the real text instead
                glue = None
            self._glue[key] = glue
        return self._glue[key]

    def _answer_spans(self, text: str, turns, add_generation_prompt: bool, where: str) -> list[tuple[int, int]]:
        """The trained character spans of ``text`` (see the class docstring)."""
        contents = [v for _, v in turns]
        glue = self._glue_for(tuple(r for r, _ in turns), add_generation_prompt)
        starts: list[int] = []
        ends: list[int] = []
        # the template's glue around the messages as written, or as it trims them (Llama 3's content|trim)
        for shown in ((contents, [c.strip() for c in contents]) if glue is not None else ()):
            if len(text) != sum(map(len, glue)) + sum(map(len, shown)) or \
                    "".join(x for pair in zip(glue, shown + [""]) for x in pair) != text:
                continue
            pos = 0
            for g, c in zip(glue, shown):
                starts.append(pos + len(g))
                pos = starts[-1] + len(c)
                ends.append(pos)
            break
        if not starts and contents:  # the template changes some text: find each message in order
            pos = 0
            for k, (role, c) in enumerate(turns):
                anchored = False
                if glue is not None and glue[k]:
                    i = text.find(glue[k], pos)
                    if i >= 0:
                        pos, anchored = i + len(glue[k]), True
                if anchored:  # right after its glue: as written, trimmed, or nothing (whitespace only)
                    c2 = c if text.startswith(c, pos) else c.strip()
                    i = pos if text.startswith(c2, pos) else -1
                else:
                    i, c2 = text.find(c, pos), c
                    if i < 0:
                        c2 = c.strip()
                        i = text.find(c2, pos) if c2 else pos
                if i < 0:
                    if role == "assistant":
                        raise InputError(f"the tokenizer's chat template does not show assistant message {k} as "
                                         "written, so its tokens cannot be told apart", path=where,
                                         hint="set data.template to lay conversations out")
                    i, c2 = pos, ""
                starts.append(i)
                ends.append(i + len(c2))
                pos = ends[-1]
        spans = []
        for k, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            end = ends[k]
            nxt = starts[k + 1] if k + 1 < len(turns) else len(text)
            m = self.stop.search(text, end, nxt) if self.stop else None
            if m is not None:
                end = m.end()
            if end > starts[k]:
                spans.append((starts[k], end))
        return spans

    def _tokenize(self, text: str, spans: list[tuple[int, int]], where: str) -> EncodedConversation:
        """Tokenise ``text`` cut at the tags it holds (and, for a tokenizer without offsets, at the spans'
        ends); a token is trained when it overlaps a span."""
        pieces: list[tuple[int, int, Tag | None]] = []  # text pieces and cut-out tags, in order
        pos = 0
        for m in self.pattern.finditer(text) if self.pattern else ():
            if m.start() > pos:
                pieces.append((pos, m.start(), None))
            pieces.append((m.start(), m.end(), self.tags[m.group()]))
            pos = m.end()
        if pos < len(text):
            pieces.append((pos, len(text), None))
        if not self.fast:  # no offsets: cut at the spans' ends too, so each piece is trained or not as a whole
            bounds = sorted({x for s in spans for x in s})
            split = []
            for a, b, tag in pieces:
                inner = [x for x in bounds if a < x < b] if tag is None else []
                split += [(x, y, tag) for x, y in zip([a] + inner, inner + [b])]
            pieces = split
        texts = [text[a:b] for a, b, tag in pieces if tag is None]
        if self.fast:
            encoded = iter(self.tokenizer.encode_offsets(texts))
        else:
            encoded = iter([(toks, None) for toks in encode_many(self.tokenizer, texts)])
        parts: list = []
        si = 0  # spans and tokens both run in order: one pass
        for a, b, tag in pieces:
            if tag is not None:
                parts.append((tag, any(s < b and a < e for s, e in spans)))
                continue
            toks, offsets = next(encoded)
            if offsets is None:
                offsets = [(0, b - a)] * len(toks)  # the whole piece
            mask = []
            for x, y in offsets:
                x, y = a + x, a + max(y, x + 1)
                while si < len(spans) and spans[si][1] <= x:
                    si += 1
                mask.append(si < len(spans) and spans[si][0] < y)
            parts.append((list(toks), mask))
        return self._assemble(parts, where)

    def _assemble(self, parts, where: str) -> EncodedConversation:
        """(token ids, trained 0/1 per token) pieces and (tag, trained) runs -> the encoded conversation;
        tags' own ids are expanded, reserved ids refused."""
        ids: list[int] = []
        labels: list[int] = []
        runs: list[tuple[str, int, int]] = []
        for first, second in parts:
            if isinstance(first, Tag):
                self._run(first, second, ids, labels, runs)
                continue
            for t, train in zip(first, second):
                tag = self.inline.get(t)
                if tag is not None:
                    self._run(tag, bool(train), ids, labels, runs)
                    continue
                if t in self.reserved:
                    raise InputError(f"text {self.tokenizer.decode([t], skip_special_tokens=False)!r} tokenises "
                                     f"to id {t}, a modality's placeholder id", path=where,
                                     hint="give the modality a token id the tokenizer never produces")
                ids.append(t)
                labels.append(t if train else IGNORE_INDEX)
        return EncodedConversation(ids, labels, runs)


def encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer.encode`` of each text, in one batched call where the tokenizer has one."""
    if not texts:
        return []
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def conversation_encoder(tokenizer: Tokenizer, tags: dict[str, Tag], template: ChatTemplate | None = None,
                         reserved=frozenset()) -> ConversationEncoder:
    """The ConversationEncoder for these arguments, kept on the tokenizer so later calls reuse it."""
    key = (tuple(sorted(tags.items())), template, frozenset(reserved))
    cache = getattr(tokenizer, "_conversation_encoders", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._conversation_encoders = cache
        except AttributeError:  # a tokenizer that takes no attributes: build one each time
            return ConversationEncoder(tokenizer, tags, template, reserved)
    encoder = cache.get(key)
    if encoder is None:
        if len(cache) > 32:
            cache.clear()
        encoder = cache[key] = ConversationEncoder(tokenizer, tags, template, reserved)
    return encoder


def encode_conversation(tokenizer: Tokenizer, turns: list[tuple[str, str]], tags: dict[str, Tag],
                        template: ChatTemplate | None = None, *, add_generation_prompt: bool = False,
                        reserved: set[int] | frozenset = frozenset(), where: str = "") -> EncodedConversation:
    """Lay out ``turns`` [(role, text)] and tokenise them (see ConversationEncoder for what is trained).

    role is "user", "assistant" or "system" (plain untrained text). ``template``: ``data.template``; None
    takes the tokenizer's own chat template when it has one, else ``ChatTemplate()``. Each tag in the
    text becomes ``tag.length`` copies of ``tag.token_id``. Labels equal the ids on assistant answers and
    their end-of-turn token, and are -100 elsewhere. ``add_generation_prompt`` ends with the assistant
    prefix (for generation). Text that tokenises to a ``reserved`` id raises InputError naming ``where``.
    """
    encoder = conversation_encoder(tokenizer, tags, template, reserved)
    return encoder(turns, add_generation_prompt=add_generation_prompt, where=where)


def stop_token_ids(tokenizer: Tokenizer, template: ChatTemplate | None = None) -> list[int]:
    """The ids that end a generated answer: eos, and the end-of-turn token the chat template trains after
    every answer (ChatML's ``<|im_end|>``, Llama-3's ``<|eot_id|>``) when it is another special token."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    try:
        enc = encode_conversation(tokenizer, [("user", "Hi"), ("assistant", "Yes")], {}, template)
    except Exception:  # a template refusing a plain two-turn chat: eos only
        return ids
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    special = set(getattr(tokenizer, "special_ids", ())) | set((getattr(tokenizer, "added_vocab", None) or {}).values())
    if trained and trained[-1] in special and trained[-1] not in ids:
        ids.append(int(trained[-1]))
    return ids

