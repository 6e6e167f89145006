"""RADIO vision encoder (NVIDIA C-RADIO / RADIO-H, as in Megatron-Core's ``RADIOViTModel``).

A plain pre-norm ViT whose embeddings are what sets it apart:

* patches are flattened channel-major, ``(C, p, p)``, and projected by a Linear (no bias by default);
* **conditional position embeddings (CPE)**: one learned table over the *maximum* grid
  (``max_img_size // patch_size`` squared). For an image of ``rows x cols`` patches the table is
  resized to ``max(rows, cols)`` squared and the top-left ``rows x cols`` window is kept (eval,
  deterministic), so a non-square image sees the same position scale as a square one. In training
  each item samples a random crop of the table instead (scale in [sqrt(0.1), 1] of the table, aspect
  in [3/4, 4/3], random offset, bilinear ``grid_sample``), as RADIO trains; ``cpe_random_crop: false``
  keeps the eval path in training too (Megatron's ``force_cpe_eval_mode``);
* ``class_token_len`` learned prefix tokens (RADIO's class *and* register tokens; Hugging Face
  splits them as ``num_cls_tokens + num_registers``) with no position embedding;
* any resolution: H and W multiples of ``patch_size`` (the items of one call share a size);
* an optional temporal patch for video (``video_temporal_patch_size`` = T): an item is T frames
  stacked along the channels, ``(N, T*C, H, W)`` frame after frame (or ``(N, T, C, H, W)``),
  projected by a second Linear over ``T*C*p*p`` values (``separate_video_embedder``, Hugging Face's
  layout) or by one shared Linear that images reach by repeating their patch T times (Megatron's
  default ``separate_video_embedder=False``).

The blocks are :class:`~mimo_spec.components.layers.TransformerBlock` (LayerNorm, GELU MLP or SwiGLU).
Optional LayerScale (``layer_scale``) multiplies each branch's output by a learned per-channel vector;
C-RADIO has none (Hugging Face builds it at 1.0, :func:`radio_state_dict_from_hf` folds it into
``attn.out`` / ``mlp.fc2`` when the encoder has no LayerScale).

The input is normalised pixels (the data path applies the mean / std; Hugging Face's
``RadioInputConditioner`` with the CLIP mean / std, RADIO's default, is the same step).

State-dict keys::

    patch_embed.{weight,bias}        (hidden, C*p*p); bias only with patch_bias
    video_patch_embed.{weight,bias}  (hidden, T*C*p*p); video with separate_video_embedder only
    class_token                      (class_token_len, hidden)
    pos_embed                        (max_rows * max_cols, hidden), row-major over the max grid
    pre_norm.{weight,bias}           pre_norm only
    layers.{i}.attn_norm / attn.qkv / attn.out / mlp_norm / mlp.fc1 / mlp.fc2
    layers.{i}.attn_scale, layers.{i}.mlp_scale                  layer_scale only (TransformerBlock's LayerScale)
    post_norm.{weight,bias}          post_norm only
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.components.encoder_inputs import the_only_input
from mimo_spec.components.layers import (
    ActivationName,
    Backend,
    TransformerBlock,
    check_backend,
    get_activation,
    init_transformer_weights,
)
from mimo_spec.errors import CheckpointError, InputError, ParamError
from mimo_spec.registry import register

CPE_MIN_SCALE = math.sqrt(0.1)  # smallest side of a training crop, as a fraction of the table
CPE_MAX_ASPECT = 4 / 3  # training crops have aspect ratios in [3/4, 4/3]


@register("encoder", "radio")
class RadioViT(nn.Module):
    """RADIO image/video encoder: pixel_values (N, C, H, W) -> features (N, T, hidden_size).

    Args:
        hidden_size, num_layers, num_heads, ffn_hidden_size: transformer sizes (RADIO-H: 1280, 32,
            16, 5120).
        patch_size: side of a square patch in pixels (16).
        image_size: the image side the data path resizes to and example_inputs use; any H, W that
            are multiples of patch_size run.
        max_img_size: side in pixels of the largest grid the position table covers (2048: a
            128 x 128 table at patch 16).
        class_token_len: learned prefix tokens, class and register tokens together (Megatron's
            RADIO-H: 8; Hugging Face's C-RADIOv4-H: num_cls_tokens 3 + num_registers 7 = 10).
        num_channels: image channels (3).
        activation: MLP activation ("gelu" as RADIO was trained and Hugging Face runs it;
            Megatron runs RADIO-H with the tanh approximation, "gelu_tanh"; "silu" with mlp swiglu).
        mlp: "gelu" (fc1, activation, fc2) or "swiglu" (gated; ffn_hidden_size is the gate width).
        layer_norm_eps: epsilon of every LayerNorm (1e-6).
        qkv_bias: bias on the query/key/value projection.
        layer_scale: initial value of a learned LayerScale on both residual branches of every block,
            or null for none (C-RADIO, Megatron).
        patch_bias: bias on the patch projection (Megatron's embedder_bias; RADIO-g).
        pre_norm: LayerNorm on the embeddings before the blocks (Megatron's ln_pre).
        post_norm: LayerNorm on the output (Megatron's ln_post; RADIO-g).
        has_cpe: conditional position embeddings (resize then crop, random crops in training);
            false: the top-left window of the table, resized only when the grid is larger.
        cpe_random_crop: random crops of the position table in training mode (RADIO's training);
            false: the deterministic eval-mode crop in training too.
        video_temporal_patch_size: frames per temporal patch for video items (>= 2), or null for
            images only.
        separate_video_embedder: video patches get their own projection (Hugging Face's layout);
            false: one projection over T frames, an image's patch repeated T times (Megatron's).
        feature_select: "patch" drops the class_token_len prefix tokens, "all" keeps them first.
        max_num_patches: null: items are (N, C, H, W) images of one size per call. A number: the encoder
            also takes images at their own sizes, SigLIP2 NaFlex's way (the data path's native resolution):
            ``{"pixel_values": (N, S, C*p*p), "pixel_attention_mask": (N, S), "spatial_shapes": (N, 2)}``,
            each image's patches (p, p, C each, row-major) padded to S <= max_num_patches rows, its (h, w)
            grid in spatial_shapes (host data); each image gets its own CPE crop and class tokens, attention
            stays inside it, and the output is flat: (sum of h*w (+ class_token_len with "all"), hidden).
        backend: "local", "te" or "auto".
    """

    input_name = "pixel_values"

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_hidden_size: int,
        patch_size: int = 16,
        image_size: int = 224,
        max_img_size: int = 2048,
        class_token_len: int = 8,
        num_channels: int = 3,
        activation: ActivationName = "gelu",
        mlp: Literal["gelu", "swiglu"] = "gelu",
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        patch_bias: bool = False,
        pre_norm: bool = False,
        post_norm: bool = False,
        has_cpe: bool = True,
        cpe_random_crop: bool = True,
        video_temporal_patch_size: int | None = None,
        separate_video_embedder: bool = True,
        feature_select: Literal["patch", "all"] = "patch",
        max_num_patches: int | None = None,
        backend: Backend = "local",
    ):
        super().__init__()
        if max_num_patches is not None and (isinstance(max_num_patches, bool) or not isinstance(max_num_patches, int)
                                            or max_num_patches < 1):
            raise ParamError("max_num_patches", f"max_num_patches ({max_num_patches!r}) must be an integer >= 1 or "
                             "null (images of one size per call)")
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_hidden_size", ffn_hidden_size), ("patch_size", patch_size),
                            ("image_size", image_size), ("max_img_size", max_img_size),
                            ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(name, f"{name} ({value!r}) must be an integer >= 1")
        if isinstance(class_token_len, bool) or not isinstance(class_token_len, int) or class_token_len < 0:
            raise ParamError("class_token_len", f"class_token_len ({class_token_len!r}) must be an integer >= 0")
        if image_size % patch_size:
            raise ParamError("image_size", f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if max_img_size < patch_size:
            raise ParamError("max_img_size",
                             f"max_img_size ({max_img_size}) must be at least patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ParamError("hidden_size", f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if mlp not in ("gelu", "swiglu"):
            raise ParamError("mlp", f"mlp ({mlp!r}) must be 'gelu' or 'swiglu'")
        if feature_select not in ("patch", "all"):
            raise ParamError("feature_select", f"feature_select ({feature_select!r}) must be 'patch' or 'all'")
        if video_temporal_patch_size is not None and (
                isinstance(video_temporal_patch_size, bool) or not isinstance(video_temporal_patch_size, int)
                or video_temporal_patch_size < 2):
            raise ParamError("video_temporal_patch_size",
                             f"video_temporal_patch_size ({video_temporal_patch_size!r}) must be an integer >= 2 "
                             "or null (images only)",
                             hint="a video item is that many frames stacked along the channels")
        get_activation(activation)
        self.backend = check_backend(backend, activation=activation, gated=mlp == "swiglu")

        self.hidden_size = self.out_features = hidden_size
        self.num_layers, self.num_heads = num_layers, num_heads
        self.patch_size, self.image_size, self.num_channels = patch_size, image_size, num_channels
        self.max_img_size = max_img_size
        self.max_grid = max_img_size // patch_size  # rows = cols of the position table
        self.class_token_len = class_token_len
        self.has_cpe, self.cpe_random_crop = has_cpe, cpe_random_crop
        self.temporal_patch = video_temporal_patch_size
        self.separate_video_embedder = separate_video_embedder
        self.feature_select = feature_select
        self.max_num_patches = max_num_patches
        self.patch_dim = num_channels * patch_size**2
        # images at their own sizes (NaFlex inputs): spatial_shapes is the items' grid, kept on the host
        self.grid_inputs = {"spatial_shapes": ()} if max_num_patches is not None else {}

        patch_dim = num_channels * patch_size**2
        frames = video_temporal_patch_size or 1
        shared_video = video_temporal_patch_size is not None and not separate_video_embedder
        self.patch_embed = nn.Linear(patch_dim * (frames if shared_video else 1), hidden_size, bias=patch_bias)
        self.video_patch_embed = (nn.Linear(patch_dim * frames, hidden_size, bias=patch_bias)
                                  if video_temporal_patch_size is not None and separate_video_embedder else None)
        self.class_token = nn.Parameter(torch.zeros(class_token_len, hidden_size)) if class_token_len else None
        self.pos_embed = nn.Parameter(torch.zeros(self.max_grid**2, hidden_size))
        self.pre_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if pre_norm else None
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ffn_hidden_size, norm="layernorm", norm_eps=layer_norm_eps,
                             mlp=mlp, activation=activation, qkv_bias=qkv_bias, out_bias=True, mlp_bias=True,
                             layer_idx=i, backend=self.backend, layer_scale=layer_scale)
            for i in range(num_layers)
        )
        self.layer_scale = layer_scale
        self.post_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if post_norm else None
        self.init_weights()

    def init_weights(self) -> None:
        """Blocks and projections GPT-2 style (N(0, 0.02), scaled residual outputs); the position table
        N(0, hidden^-1/2) as Megatron; class tokens N(0, 0.02); LayerScale at its initial value."""
        init_transformer_weights(self, num_layers=self.num_layers)
        nn.init.normal_(self.pos_embed, std=self.hidden_size**-0.5)
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=0.02)
        if self.layer_scale is not None:
            for block in self.layers:
                nn.init.constant_(block.attn_scale, self.layer_scale)
                nn.init.constant_(block.mlp_scale, self.layer_scale)

    # -------------------------------------------------------- framework hooks

    @property
    def prefix_tokens(self) -> int:
        """Class and register tokens each item's output starts with (feature_select "all"), else 0."""
        return self.class_token_len if self.feature_select == "all" else 0

    def tokens_per_item(self, pixel_values_shape: tuple) -> int:
        """Output tokens per item for an input of this shape: (N, C, H, W) images (H and W read), or NaFlex
        patches (N, S, C*p*p), at most S (+ the prefix) per item (the exact count: :meth:`item_tokens`)."""
        if len(pixel_values_shape) == 3:
            return int(pixel_values_shape[1]) + self.prefix_tokens
        h, w = pixel_values_shape[-2:]
        return (h // self.patch_size) * (w // self.patch_size) + self.prefix_tokens

    def rows_per_item(self, grid_name: str, grid: torch.Tensor) -> list[int]:
        """h*w per image of NaFlex inputs (items first and padded: no input is packed by the grid)."""
        from mimo_spec.components.vision.siglip2 import _grid_list

        return [h * w for h, w in _grid_list(grid)]

    def item_tokens(self, inputs) -> list[int]:
        """Output tokens per image of NaFlex inputs: h*w from ``spatial_shapes`` (host), + the prefix."""
        from mimo_spec.components.vision.siglip2 import _grid_list

        return [h * w + self.prefix_tokens for h, w in _grid_list(inputs["spatial_shapes"])]

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random images at image_size: {"pixel_values": (N, C, image_size, image_size)}; with max_num_patches,
        images of different grids as NaFlex inputs padded to max_num_patches."""
        if self.max_num_patches is not None:
            from mimo_spec.components.vision.siglip2 import example_naflex_inputs

            return example_naflex_inputs(num_items, self.max_num_patches, self.patch_dim, generator)
        shape = (num_items, self.num_channels, self.image_size, self.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def _expected(self) -> str:
        video = (f", or (N, {self.temporal_patch * self.num_channels}, H, W) / (N, {self.temporal_patch}, "
                 f"{self.num_channels}, H, W) for video of {self.temporal_patch} frames per item"
                 if self.temporal_patch else "")
        return f"expected shape (N, {self.num_channels}, H, W){video}, H and W multiples of {self.patch_size}"

    def _channel_problem(self, shape: tuple) -> str | None:
        """Why ``shape`` is not an image or video batch this encoder takes, or None."""
        c, t = self.num_channels, self.temporal_patch
        if len(shape) == 5:
            if t is None:
                return "5-D input is video, but this encoder has no video_temporal_patch_size"
            if shape[1:3] != (t, c):
                return f"video items must be (N, {t}, {c}, H, W), got {shape}"
            return None
        if len(shape) != 4:
            return f"got {len(shape)}-D input {shape}"
        if shape[1] == c or (t is not None and shape[1] == t * c):
            return None
        video = f" (an image) or {t * c} (a video item of {t} frames)" if t is not None else ""
        return f"got {shape[1]} channels, expected {c}{video}"

    def _size_problem(self, h: int, w: int) -> str | None:
        p = self.patch_size
        for side, n in (("height", h), ("width", w)):
            if n < p or n % p:
                return (f"{side} {n} is not a multiple of patch_size {p}"
                        f" (nearest: {max(p, n // p * p)} or {(n // p + 1) * p})")
        return None

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """Raise InputError (naming ``path``) unless ``inputs`` is {"pixel_values": (N, C, H, W)}
        (or a video batch) with H and W multiples of patch_size, or (with max_num_patches) NaFlex inputs."""
        if self.max_num_patches is not None and "spatial_shapes" in inputs:
            from mimo_spec.components.vision.siglip2 import validate_naflex_inputs

            validate_naflex_inputs(inputs, path, self.patch_dim, self.num_channels, self.patch_size,
                                   self.max_num_patches)
            return
        expected = self._expected()
        x, where = the_only_input(inputs, "pixel_values", path, expected,
                                  hint="pass images as float tensors, e.g. pixel_values.float() / 255")
        shape = tuple(x.shape)
        problem = self._channel_problem(shape)
        if problem is not None:
            raise InputError(f"{expected}: {problem}", path=where,
                             hint="images must be batched as (N, channels, height, width)")
        problem = self._size_problem(*shape[-2:])
        if problem is not None:
            raise InputError(f"pixel_values {shape}: {problem}", path=where,
                             hint=f"resize or pad the images to multiples of {self.patch_size}")

    # ----------------------------------------------------------------- model

    def position_embeddings(self, rows: int, cols: int, batch: int = 1) -> torch.Tensor:
        """The position embeddings of a ``rows x cols`` patch grid: (1, rows*cols, hidden), or
        (batch, rows*cols, hidden) for the per-item random crops of training mode."""
        g = self.max_grid
        if (rows, cols) == (g, g):
            return self.pos_embed[None]
        table = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, hidden, g, g)
        if not self.has_cpe:
            table = table[..., :rows, :cols]
        elif self.training and self.cpe_random_crop and batch > 0:
            table = self._random_crop(table, rows, cols, batch)
        else:
            side = max(rows, cols)
            table = F.interpolate(table.float(), size=(side, side), mode="bilinear",
                                  align_corners=False).to(table.dtype)
            table = table[..., :rows, :cols]
        if table.shape[-2:] != (rows, cols):
            table = F.interpolate(table.float(), size=(rows, cols), mode="bilinear",
                                  align_corners=False).to(table.dtype)
        return table.flatten(2).transpose(1, 2)

    @staticmethod
    def _random_crop(table: torch.Tensor, rows: int, cols: int, batch: int) -> torch.Tensor:
        """One random window of ``table`` (1, hidden, g, g) per item, resampled to rows x cols:
        (batch, hidden, rows, cols). Side scale in [sqrt(0.1), 1], aspect in [3/4, 4/3]."""
        dev = table.device
        scale = torch.rand(batch, 1, 1, device=dev) * (1 - CPE_MIN_SCALE) + CPE_MIN_SCALE
        log_aspect = math.log(CPE_MAX_ASPECT)
        aspect = torch.exp(torch.rand(batch, 1, 1, device=dev) * 2 * log_aspect - log_aspect)
        scale_xy = torch.stack((scale * aspect, scale / aspect), dim=-1).clamp(0, 1)  # (B, 1, 1, 2)
        offset_xy = torch.rand(batch, 1, 1, 2, device=dev) * (1 - scale_xy)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, rows, device=dev), torch.linspace(0, 1, cols, device=dev),
                                indexing="ij")
        unit = torch.stack((xs, ys), dim=-1)[None]  # (1, rows, cols, 2), x first as grid_sample reads it
        grid = (unit * scale_xy + offset_xy) * 2 - 1  # (B, rows, cols, 2) in [-1, 1]
        return F.grid_sample(table.float().expand(batch, -1, -1, -1), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=True).to(table.dtype)

    def _patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C', H, W) -> (N, rows*cols, C'*p*p), each patch channel-major (C', p, p)."""
        n, c, h, w = pixel_values.shape
        p = self.patch_size
        x = pixel_values.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (N, C, H, W), or a video batch (N, T*C, H, W) / (N, T, C, H, W) ->
        (N, tokens_per_item, hidden_size); with ``spatial_shapes`` (max_num_patches): NaFlex inputs ->
        (sum of item_tokens, hidden_size), see the class docstring."""
        if spatial_shapes is not None:
            return self._forward_naflex(pixel_values, spatial_shapes)
        shape = tuple(pixel_values.shape)
        problem = self._channel_problem(shape)
        if problem is not None:
            raise InputError(f"{self._expected()}: {problem}", path="pixel_values",
                             hint="images must be batched as (N, channels, height, width)")
        problem = self._size_problem(*shape[-2:])
        if problem is not None:
            raise InputError(f"pixel_values {shape}: {problem}", path="pixel_values",
                             hint=f"resize or pad the images to multiples of {self.patch_size}")
        if pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(1, 2)  # frame after frame along the channels
        n, c, h, w = pixel_values.shape
        rows, cols = h // self.patch_size, w // self.patch_size
        proj = self.patch_embed
        patches = self._patches(pixel_values.to(proj.weight.dtype))
        if c != self.num_channels and self.video_patch_embed is not None:
            proj = self.video_patch_embed
        elif c == self.num_channels and self.temporal_patch and not self.separate_video_embedder:
            patches = patches.repeat(1, 1, self.temporal_patch)  # an image is T equal frames
        x = proj(patches)
        x = x + self.position_embeddings(rows, cols, n).to(x.dtype)
        if self.class_token is not None:
            x = torch.cat((self.class_token.to(x.dtype).expand(n, -1, -1), x), dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        if self.post_norm is not None:
            x = self.post_norm(x)
        if self.feature_select == "patch" and self.class_token_len:
            x = x[:, self.class_token_len:]
        return x

    def _forward_naflex(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """Images at their own (h, w) grids, padded to S patches each -> flat features of their real patches
        (with the prefix tokens first under feature_select "all"), image after image."""
        from mimo_spec.components.vision.siglip2 import _grid_list

        if self.max_num_patches is None:
            raise InputError("spatial_shapes given, but this encoder takes images of one size per call",
                             path="spatial_shapes", hint="set max_num_patches to take images at their own sizes")
        grids = _grid_list(spatial_shapes)  # host data
        n, rows, dim = pixel_values.shape
        p, c, prefix = self.patch_size, self.num_channels, self.class_token_len
        if dim != self.patch_dim or len(grids) != n:
            raise InputError(f"pixel_values {tuple(pixel_values.shape)} with {len(grids)} grids: expected (N, S, "
                             f"{self.patch_dim}) and one (h, w) per image", path="pixel_values")
        proj = self.patch_embed
        # the processor's patches are (p, p, C) each; ours are channel-major (C, p, p) as the conv's weight
        patches = pixel_values.to(proj.weight.dtype).unflatten(-1, (p, p, c)).permute(0, 1, 4, 2, 3).flatten(2)
        if self.temporal_patch and not self.separate_video_embedder:
            patches = patches.repeat(1, 1, self.temporal_patch)  # an image is T equal frames
        x = proj(patches)  # (N, S, H)
        pos = [F.pad(self.position_embeddings(h, w, 1)[0], (0, 0, 0, rows - h * w)) for h, w in grids]
        x = x + torch.stack(pos).to(x.dtype)
        lengths = [h * w for h, w in grids]
        if self.class_token is not None:
            x = torch.cat((self.class_token.to(x.dtype).expand(n, -1, -1), x), dim=1)
        attn_mask = None
        if any(length != rows for length in lengths):  # padding: each image attends to its prefix and real patches
            keys = torch.arange(prefix + rows)[None, :] < (torch.tensor(lengths)[:, None] + prefix)
            attn_mask = keys.to(x.device, non_blocking=True)[:, None, None, :]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask)
        if self.post_norm is not None:
            x = self.post_norm(x)
        start = 0 if self.feature_select == "all" else prefix
        index = torch.cat([torch.arange(start, prefix + length) + i * (prefix + rows)
                           for i, length in enumerate(lengths)]).to(x.device, non_blocking=True)
        return x.flatten(0, 1).index_select(0, index)


# --------------------------------------------------------------------------- Hugging Face


# transformers' activation names -> layers.py's (an unknown name is passed on for the ParamError)
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                   "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}


def radio_params_from_hf(config) -> dict:
    """Constructor params of :class:`RadioViT` for a transformers ``RadioConfig`` (an object or dict).

    LayerScale is left out (C-RADIO's is 1.0; :func:`radio_state_dict_from_hf` folds any value into
    the output projections); pass ``layer_scale`` yourself to keep it as a parameter.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    hidden = get("hidden_size")
    ffn = int(hidden * get("mlp_ratio", 4.0))
    swiglu = bool(get("use_swiglu_ffn", False))
    if swiglu:  # two thirds of the ratio's width, rounded up to a multiple of 8 (HF's SwiGLU FFN)
        ffn = (int(ffn * 2 / 3) + 7) // 8 * 8
    return dict(
        hidden_size=hidden, num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        ffn_hidden_size=ffn, patch_size=get("patch_size"), image_size=get("image_size"),
        max_img_size=get("max_img_size"), class_token_len=get("num_cls_tokens") + get("num_registers"),
        num_channels=get("num_channels", 3),
        activation="silu" if swiglu else _HF_ACTIVATIONS.get(get("hidden_act", "gelu"), get("hidden_act")),
        mlp="swiglu" if swiglu else "gelu", layer_norm_eps=get("layer_norm_eps"), qkv_bias=get("qkv_bias", True),
        video_temporal_patch_size=get("video_temporal_patch_size"), separate_video_embedder=True,
    )


_HF_IGNORED = ("input_conditioner.norm_mean", "input_conditioner.norm_std", "summary_idxs")


def radio_state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], *, layer_scale: bool = False,
                             prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers ``RadioModel`` state dict -> :class:`RadioViT` keys.

    ``prefix``: the RadioModel's prefix in ``hf_state_dict`` (e.g. ``"vision_model."``); keys outside it
    are skipped. Separate q/k/v projections are fused into ``attn.qkv``; SwiGLU's gate and up into
    ``mlp.fc1``. ``layer_scale``: the target encoder has LayerScale parameters (copied); else each
    ``lambda1`` is folded into the projection before it (``attn.out`` / ``mlp.fc2``), exact for C-RADIO's
    1.0. The input conditioner's mean / std and ``summary_idxs`` are not weights of the encoder (the data
    path normalises). Any other key is a CheckpointError.
    """
    sd = {k[len(prefix):]: v for k, v in hf_state_dict.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"missing {prefix}{key} in the RADIO state dict", path=prefix + key,
                                  hint="is this a transformers RadioModel checkpoint (and the right prefix)?")
        used.add(key)
        return sd[key]

    def maybe(key: str) -> torch.Tensor | None:
        return take(key) if key in sd else None

    out["patch_embed.weight"] = take("embeddings.patch_projection.weight")
    if "embeddings.video_patch_projection.weight" in sd:
        out["video_patch_embed.weight"] = take("embeddings.video_patch_projection.weight")
    pos = take("embeddings.position_embedding")
    out["pos_embed"] = pos.reshape(-1, pos.shape[-1])
    out["class_token"] = take("embeddings.cls_register_token")

    num_layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for a, b in (("norm1", "attn_norm"), ("norm2", "mlp_norm")):
            out[dst + b + ".weight"] = take(src + a + ".weight")
            out[dst + b + ".bias"] = take(src + a + ".bias")
        att = src + "attention."
        out[dst + "attn.qkv.weight"] = torch.cat([take(f"{att}{n}_proj.weight") for n in "qkv"])
        biases = [maybe(f"{att}{n}_proj.bias") for n in "qkv"]
        if any(b is not None for b in biases):
            out[dst + "attn.qkv.bias"] = torch.cat(biases)
        lam1, lam2 = take(src + "layer_scale1.lambda1"), take(src + "layer_scale2.lambda1")
        if src + "mlp.gate_proj.weight" in sd:  # SwiGLU
            fc1 = [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]
            fc1_b = [take(src + "mlp.gate_proj.bias"), take(src + "mlp.up_proj.bias")]
            out[dst + "mlp.fc1.weight"], out[dst + "mlp.fc1.bias"] = torch.cat(fc1), torch.cat(fc1_b)
            fc2_w, fc2_b = take(src + "mlp.down_proj.weight"), take(src + "mlp.down_proj.bias")
        else:
            out[dst + "mlp.fc1.weight"], out[dst + "mlp.fc1.bias"] = take(src + "mlp.fc1.weight"), take(
                src + "mlp.fc1.bias")
            fc2_w, fc2_b = take(src + "mlp.fc2.weight"), take(src + "mlp.fc2.bias")
        out_w, out_b = take(att + "o_proj.weight"), take(att + "o_proj.bias")
        if layer_scale:
            out[dst + "attn_scale"], out[dst + "mlp_scale"] = lam1, lam2
        else:  # lambda * (W x + b) == (lambda[:, None] * W) x + lambda * b
            out_w, out_b = out_w * lam1[:, None], out_b * lam1
            fc2_w, fc2_b = fc2_w * lam2[:, None], fc2_b * lam2
        out[dst + "attn.out.weight"], out[dst + "attn.out.bias"] = out_w, out_b
        out[dst + "mlp.fc2.weight"], out[dst + "mlp.fc2.bias"] = fc2_w, fc2_b

    left = sorted(k for k in sd if k not in used and k not in _HF_IGNORED)
    if left:
        raise CheckpointError(f"{len(left)} RADIO tensors have no place in the radio encoder: "
                              f"{', '.join(prefix + k for k in left[:5])}{' ...' if len(left) > 5 else ''}",
                              path=prefix + left[0], hint="this converter knows transformers' RadioModel layout")
    return out
