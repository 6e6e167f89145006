"""The ``data`` config: one pydantic model per source, validated once into a typed object.

The lowest layer of ``mimo_spec.data`` besides ``batch`` and ``preprocess``: the other data
modules import it, it imports none of them (``preprocess`` only, for the CLIP statistics).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator

from mimo_spec.data.drawings import COLORS, SHAPES
from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD
from mimo_spec.errors import ConfigError, Problem, did_you_mean

SOURCES = ("synthetic", "llava_json", "webdataset", "parquet", "mixture")


class ChatTemplate(BaseModel):
    """How turns are laid out (``data.template``). The defaults are LLaVA-1.5's (Vicuna v1) minus its
    system prompt: ``USER: <image>\\nWhat is this? ASSISTANT: a cat</s>``.

    Set, it always wins; unset (null), a Hugging Face tokenizer's own ``chat_template`` is used
    (``apply_chat_template``) and these defaults only for a tokenizer without one (the byte tokenizer).
    Each prefix, suffix and text is tokenised on its own; the tokenizer's eos closes every answer and is
    trained with it. Both the validated config and what ``encode_conversation`` reads (frozen, so it can
    be a default and a cache key).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
    system: str = ""
    user_prefix: str = "USER: "
    user_suffix: str = " "
    assistant_prefix: str = "ASSISTANT: "
    assistant_suffix: str = ""  # after the eos token


class CommonDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan are refused in every float
    source: str = "synthetic"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    # "byte" (built in) or a local Hugging Face tokenizer directory
    tokenizer: str = "byte"
    # byte tokenizer: bos/eos/pad ids are special_tokens_start .. special_tokens_start + 2
    special_tokens_start: int = Field(256, ge=256)
    # longest sample in tokens; null = the language model's max_seq_len
    max_seq_len: int | None = Field(None, ge=8)
    # null: the tokenizer's own chat_template when it has one, else the LLaVA-1.5 layout below
    template: ChatTemplate | None = None
    image_mean: list[float] = Field(default_factory=lambda: list(CLIP_MEAN), min_length=1)
    image_std: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: list(CLIP_STD), min_length=1)
    # how a fixed-size image encoder's image reaches its size (file sources): pad (LLaVA-1.5: centred on a square
    # of the mean colour, then resized), crop (CLIP: shortest side to the size, centre crop), squash (resized to
    # the square), fit (Janus: longest side to the size, then centred on a square of the mean colour)
    image_resize: Literal["pad", "crop", "squash", "fit"] = "pad"
    # the filter of those resizes (Chameleon's processor: lanczos; CLIP's, LLaVA's, Janus's: bicubic)
    image_resample: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"
    # DataLoader worker processes that build and collate training batches (0: in the training process);
    # the samples and their order do not depend on it
    num_workers: int = Field(0, ge=0)
    # batches each worker builds ahead (DataLoader prefetch_factor; workers only)
    prefetch: int = Field(2, ge=1)
    # training rows are packed with whole samples up to max_seq_len tokens (document_ids keep them apart);
    # false: one sample per row, right-padded
    packing: bool = True
    # a sample that cannot be read (bad JSON record, missing or undecodable media): skip it (logged to
    # bad_samples.jsonl in the run dir) or stop with a data error
    on_bad_sample: Literal["skip", "error"] = "skip"
    # skipped bad samples above this share of the samples read stop the run (checked once 100 were read)
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    # share of training samples with an item to generate whose condition (every token before the item but
    # the first) becomes pad tokens: the unconditional branch classifier-free guidance asks for (Janus: 0.1)
    condition_dropout: float = Field(0.0, ge=0.0, le=1.0)
    # the text tags that place an item (each becomes the modality's placeholder run); a tag that is one of
    # the tokenizer's own special tokens must be the modality's special_token_id
    image_token: str = Field("<image>", min_length=1)
    audio_token: str = Field("<audio>", min_length=1)
    # audio longer than the encoder's window: split into several items, or cut (counted in a warning)
    audio_overflow: Literal["split", "truncate"] = "split"
    # a local Hugging Face image processor folder (preprocessor_config.json); null: built from the
    # encoder's image size and image_mean / image_std (a native-resolution encoder: Qwen2-VL's processor)
    image_processor: str | None = None
    # tiled images (mimo_spec.data.tiling): internvl (dynamic tiles + thumbnail, each tile an item, inside
    # <img> ... </img>), idefics3 (Idefics3 / SmolVLM splitting: row/column tokens, then the global image),
    # llava_next (anyres: one item per image, its base image and crops), none (one fixed-size item), or auto:
    # llava_next for an encoder taking image_sizes, else the scheme of image_processor's class, else none
    image_tiling: Literal["auto", "none", "llava_next", "internvl", "idefics3"] = "auto"
    # internvl: the tile grid has image_min_tiles..image_max_tiles tiles (null: 1 and 12, or the processor's
    # min_patches / max_patches); image_thumbnail: the whole image as one more tile after a split
    image_min_tiles: int | None = Field(None, ge=1)
    image_max_tiles: int | None = Field(None, ge=1)
    image_thumbnail: bool = True
    # idefics3: the image's longest side is resized to this before splitting (null: 4 tiles, or the processor's
    # size.longest_edge); image_split: false keeps the global image alone (null: true, or the processor's)
    image_longest_edge: int | None = Field(None, ge=1)
    image_split: bool | None = None
    # the text tag placing a video (each becomes the video modality's placeholder run, one per video)
    video_token: str = Field("<video>", min_length=1)
    # native-resolution encoders (Qwen's processors): an image is resized, keeping its aspect ratio, to
    # sides divisible by patch_size * merge and between min_pixels and max_pixels pixels in all; null: the
    # processor's default (Qwen2-VL: 3136 / 1003520; Qwen3-VL: 65536 / 16777216)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    # the same bounds for each video frame (Qwen2-VL: 100352 / 602112), or under qwen_vl qwen3_vl for the whole
    # clip, sampled frames x height x width (Qwen3-VL: 4096 / 25165824); null: those defaults
    video_min_pixels: int | None = Field(None, ge=1)
    video_max_pixels: int | None = Field(None, ge=1)
    # which Qwen processing a grid encoder (qwen_vit) gets: qwen2_vl (Qwen2-VL, Qwen2.5-VL: one placeholder run
    # per video), qwen3_vl (Qwen3-VL: its pixel defaults and 0.5 / 0.5 normalisation when image_mean / image_std
    # are left at CLIP's, its frame sampling and whole-clip resize, and each video laid out as its frame groups,
    # each after its "<1.5 seconds>" timestamp text and inside video_wrap), or auto: qwen3_vl for a language
    # model with mrope_frames_as_items (Qwen3-VL's M-RoPE), else qwen2_vl
    qwen_vl: Literal["auto", "qwen2_vl", "qwen3_vl"] = "auto"
    # video files are sampled at this many frames per second (a frame folder's frames are all taken), then
    # at least video_min_frames and at most video_max_frames of them, spread evenly over the video
    video_fps: float = Field(2.0, gt=0.0)
    video_min_frames: int = Field(4, ge=1)
    video_max_frames: int = Field(768, ge=1)
    # videos through an anyres encoder (LLaVA-NeXT-Video, LLaVA-OneVision): every video gives exactly this many
    # frames, spread evenly (transformers' uniform sampling; a shorter video repeats frames), so videos batch
    video_num_frames: int = Field(8, ge=1)


class SyntheticDataConfig(CommonDataConfig):
    """``data.source: synthetic``: see ``mimo_spec.data.synthetic``."""

    source: Literal["synthetic"] = "synthetic"
    num_samples: int = Field(4096, ge=1)
    eval_samples: int = Field(64, ge=0)
    max_items_per_sample: int = Field(2, ge=1)
    text_only_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # share of samples that ask for an output modality (when the model has one)
    generation_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # "colour shape" drawings never asked for in training (e.g. ["red ring", "blue circle"]): a held-out test
    # of whether a model composes a colour and a shape it has only seen apart
    generation_holdout: list[str] = Field(default_factory=list)
    # std of Gaussian noise added to synthetic images and audio features
    noise: float = Field(0.05, ge=0.0)
    # synthetic samples are short and alike: one per row keeps train.batch_size a sample count (packing
    # them into max_seq_len rows multiplies the tokens of a step); set true to train packed rows
    packing: bool = False

    @field_validator("generation_holdout")
    @classmethod
    def _known_drawings(cls, v: list[str]) -> list[str]:
        for entry in v:
            parts = entry.split()
            if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
                raise ValueError(f"expected 'colour shape' with a colour of {list(COLORS)} and a shape of "
                                 f"{list(SHAPES)}, got {entry!r}")
        if len(set(v)) == len(COLORS) * len(SHAPES):
            raise ValueError("every drawing is held out: nothing is left to train on")
        return v


class FileDataConfig(CommonDataConfig):
    """What every source reading samples from files shares (``llava_json``, ``webdataset``, ``parquet``)."""

    # a file, a glob, a folder or a list of them (each source says which files it reads)
    path: str | list[str]
    eval_path: str | list[str] | None = None
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    truncation: Literal["drop", "truncate"] = "drop"
    image_modality: str | None = None
    video_modality: str | None = None
    audio_modality: str | None = None
    max_samples: int | None = Field(None, ge=1)
    # where offset indexes of the data files are cached; null: beside the data when writable, else
    # in ~/.cache/mimo-spec/index
    index_dir: str | None = None
    # [before, after]: text put around every image's / video's / audio item's placeholder run (Qwen2-VL, Qwen2.5-VL,
    # Qwen3-VL: ["<|vision_start|>", "<|vision_end|>"]), tokenised alone with the data's tokenizer, never trained
    # (label -100); not added again where the text already has them right around the tag; null: nothing
    image_wrap: tuple[str, str] | None = None
    video_wrap: tuple[str, str] | None = None
    audio_wrap: tuple[str, str] | None = None


class LlavaJsonDataConfig(FileDataConfig):
    """``data.source: llava_json``: see ``mimo_spec.data.sources``."""

    source: Literal["llava_json"] = "llava_json"
    image_folder: str | None = None
    audio_folder: str | None = None
    # relative video paths (files, or folders of frame images) resolve here (null: the JSON file's folder)
    video_folder: str | None = None
    check_files: bool = True


class WebDatasetDataConfig(FileDataConfig):
    """``data.source: webdataset``: tar shards in the WebDataset layout, see ``mimo_spec.data.sources``."""

    source: Literal["webdataset"] = "webdataset"
    # media paths written in a sample's json (a sample without media members) resolve here (null: the shard's folder)
    image_folder: str | None = None
    audio_folder: str | None = None
    video_folder: str | None = None


class ParquetDataConfig(FileDataConfig):
    """``data.source: parquet``: Parquet (or Arrow IPC) files, one sample a row, see ``mimo_spec.data.sources``."""

    source: Literal["parquet"] = "parquet"
    # a JSON string or a list of {from, value} structs
    conversations_column: str = Field("conversations", min_length=1)
    # binary, a path string, a Hugging Face Image / Audio struct {bytes, path}, or a list of them; a column the
    # files lack gives no items; null: none read
    image_column: str | None = "images"
    audio_column: str | None = "audios"
    # video files: binary, a path (a file or a folder of frame images), a {bytes, path} struct, or a list
    video_column: str | None = "videos"
    id_column: str | None = "id"
    # preference pairs (train.objective: dpo): the chosen / rejected answers, each a text or a list of turns (or
    # a JSON string of one); the prompt is then conversations_column (turns, or a plain text: one user turn,
    # e.g. conversations_column: question); a column the files lack gives no pair
    chosen_column: str | None = "chosen"
    rejected_column: str | None = "rejected"
    # path-only cells resolve here (null: the Parquet file's folder)
    image_folder: str | None = None
    audio_folder: str | None = None
    video_folder: str | None = None


# what a mixture entry sets besides its source's own keys: where its data is; the other FileDataConfig keys
# (truncation, image_resize, ...) are shared, set once in ``data`` like every CommonDataConfig key
_MIXTURE_ENTRY_FILE_KEYS = ("path", "eval_path", "eval_fraction", "max_samples", "index_dir")
_MIXED_CLASSES = (LlavaJsonDataConfig, WebDatasetDataConfig, ParquetDataConfig)


def _mixture_entry(cls: type[FileDataConfig]) -> type[BaseModel]:
    """The model of one ``data.mixture`` entry of source ``cls``: ``weight`` plus the keys of ``cls`` that are
    not shared."""
    own = {k: (f.annotation, f) for k, f in cls.model_fields.items()
           if k == "source" or (k not in CommonDataConfig.model_fields
                                and (k not in FileDataConfig.model_fields or k in _MIXTURE_ENTRY_FILE_KEYS))}
    return create_model(cls.__name__.replace("DataConfig", "MixtureEntry"), __module__=__name__,
                        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
                        weight=(float, Field(gt=0.0)), **own)


_MIXTURE_ENTRIES = {cls.model_fields["source"].default: _mixture_entry(cls) for cls in _MIXED_CLASSES}
# module-level names, so that configs holding entries pickle (DataLoader workers)
LlavaJsonMixtureEntry = _MIXTURE_ENTRIES["llava_json"]
WebDatasetMixtureEntry = _MIXTURE_ENTRIES["webdataset"]
ParquetMixtureEntry = _MIXTURE_ENTRIES["parquet"]
MixtureEntry = Annotated[Union[tuple(_MIXTURE_ENTRIES.values())], Field(discriminator="source")]


class _MixtureBase(CommonDataConfig):
    source: Literal["mixture"] = "mixture"
    # [{weight: 0.7, source: llava_json, path: ...}, {weight: 0.3, source: webdataset, path: ...}]
    mixture: list[MixtureEntry] = Field(min_length=1)
    _sources: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _build_sources(self):
        shared = self.model_dump(exclude={"source", "mixture"})
        self._sources = [
            (entry.weight, _CONFIG_CLASSES[entry.source](**shared, **entry.model_dump(exclude={"weight"})))
            for entry in self.mixture]
        return self

    def sources(self) -> list[tuple[float, FileDataConfig]]:
        """(weight, the entry's full config: its own keys plus the shared ones from ``data``) per entry."""
        return list(self._sources)


# ``data.source: mixture``: weighted sources, see ``mimo_spec.data.sources.MixtureSource``; it also holds
# FileDataConfig's shared keys (truncation, image_resize, image_modality, audio_modality, ...)
MixtureDataConfig = create_model(
    "MixtureDataConfig", __base__=_MixtureBase, __module__=__name__,
    **{k: (f.annotation, f) for k, f in FileDataConfig.model_fields.items()
       if k not in CommonDataConfig.model_fields and k not in _MIXTURE_ENTRY_FILE_KEYS})

DataConfig = Union[SyntheticDataConfig, LlavaJsonDataConfig, WebDatasetDataConfig, ParquetDataConfig,
                   MixtureDataConfig]
_CONFIG_CLASSES = {"synthetic": SyntheticDataConfig, "llava_json": LlavaJsonDataConfig,
                   "webdataset": WebDatasetDataConfig, "parquet": ParquetDataConfig, "mixture": MixtureDataConfig}


def _plain(cfg) -> dict:
    if isinstance(cfg, BaseModel):
        return cfg.model_dump()
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a mapping, got {type(cfg).__name__}", path="data")
    return dict(cfg)


def validate_data_config(data_cfg) -> DataConfig:
    """A ``data`` config (dict / DictConfig / model) -> its pydantic model.

    Raises one ConfigError listing every problem as ``data.<key>``, with a
    did-you-mean hint for misspelt keys.
    """
    if isinstance(data_cfg, (SyntheticDataConfig, LlavaJsonDataConfig, WebDatasetDataConfig, ParquetDataConfig,
                             MixtureDataConfig)):
        return data_cfg
    # a mandatory value left unset in YAML (``???``) counts as missing
    raw = {k: v for k, v in _plain(data_cfg).items() if not (isinstance(v, str) and v == "???")}
    source = raw.get("source", "synthetic")
    if source not in _CONFIG_CLASSES:
        raise ConfigError(f"unknown data source {source!r}", path="data.source", hint=did_you_mean(source, SOURCES))
    cls = _CONFIG_CLASSES[source]
    try:
        return cls(**raw)
    except pydantic.ValidationError as e:
        raise ConfigError([_problem(err, cls) for err in e.errors()]) from None


def _problem(err: dict, cls: type[BaseModel]) -> Problem:
    loc = [str(p) for p in err["loc"]]
    if cls is MixtureDataConfig and len(loc) >= 2 and loc[0] == "mixture" and loc[1].isdigit():
        return _mixture_problem(err, loc)
    path = "data." + ".".join(loc)
    if err["type"] == "extra_forbidden":
        fields = cls.model_fields if len(loc) == 1 else ChatTemplate.model_fields
        return Problem(path, f"unknown key for source {cls.model_fields['source'].default!r}",
                       did_you_mean(loc[-1], fields))
    if err["type"] == "missing":
        return Problem(path, f"required for source {cls.model_fields['source'].default!r}", f"set {path}=...")
    return Problem(path, f"{err['msg'].lower()}, got {err.get('input')!r}",
                   f"see conf/data/{cls.model_fields['source'].default}.yaml for the expected values")


def _mixture_problem(err: dict, loc: list[str]) -> Problem:
    """A problem in entry ``i`` of ``data.mixture``, named ``data.mixture[i].<key>``."""
    rest = loc[2:]
    source = rest.pop(0) if rest and rest[0] in _MIXTURE_ENTRIES else None  # the union's tag
    rest = [p for p in rest if "[" not in p and p not in ("str", "int", "float", "bool")]  # other unions' members
    path = f"data.mixture[{loc[1]}]" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in rest)
    what = f"a {source} mixture entry" if source else "a mixture entry"
    if err["type"] == "extra_forbidden":
        if rest[-1] in MixtureDataConfig.model_fields and rest[-1] != "mixture":
            return Problem(path, "shared by every source of the mixture: not set in an entry",
                           f"set data.{rest[-1]} instead")
        return Problem(path, f"unknown key for {what}", did_you_mean(rest[-1], _MIXTURE_ENTRIES[source].model_fields))
    if err["type"] == "missing":
        return Problem(path, f"required in {what}", f"set {path}=..." if rest[-1:] != ["weight"]
                       else "give every entry a weight > 0: its share is weight / the sum of the weights")
    if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        given = err.get("input")
        return Problem(path + ".source", f"must be one of {', '.join(_MIXTURE_ENTRIES)}, got "
                       f"{given.get('source') if isinstance(given, dict) else None!r}",
                       "each entry names its source, e.g. {weight: 1, source: llava_json, path: data.jsonl}")
    return Problem(path, f"{err['msg'].lower()}, got {err.get('input')!r}",
                   "see conf/data/mixture.yaml for the expected values")


def max_length(cfg: DataConfig, model) -> int:
    """The sample length limit: ``data.max_seq_len``, which may not exceed the LM's ``max_seq_len``."""
    lm_max = getattr(model.language_model, "max_seq_len", None)
    if cfg.max_seq_len is None:
        if lm_max is None:
            raise ConfigError("the language model has no max_seq_len", path="data.max_seq_len",
                              hint="set data.max_seq_len")
        return int(lm_max)
    if lm_max is not None and cfg.max_seq_len > lm_max:
        raise ConfigError(f"{cfg.max_seq_len} exceeds the language model's max_seq_len {lm_max}",
                          path="data.max_seq_len", hint="lower it, or raise model.params.max_seq_len")
    return int(cfg.max_seq_len)
