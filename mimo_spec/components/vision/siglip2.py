"""SigLIP2 NaFlex vision encoder: each image at its own patch grid (native aspect ratio).

The Hugging Face ``Siglip2ImageProcessor`` resizes each image so its patch grid (h, w) keeps the
aspect ratio within a patch budget (``max_num_patches``), cuts it into patches and pads every image
to the budget. The encoder takes that output as is, items first, with Hugging Face's names:

    pixel_values          (N, max_patches, C*p*p)  float, real patches first, then padding
    pixel_attention_mask  (N, max_patches)         1 for the h*w real patches, 0 for padding
    spatial_shapes        (N, 2)                   each image's (h, w) patch grid: host data

and returns the features of the real patches only, FLAT and image after image:
(sum of h*w, hidden_size), row-major within an image, as ``Siglip2VisionModel.last_hidden_state``
at the rows where the mask is 1.

Per image, the learned (g x g) position table (g = sqrt(num_patches), 16 for the 256 variants) is
resized to the image's (h, w) grid by bilinear interpolation with antialiasing (the weights of
``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``, as transformers'
``Siglip2VisionEmbeddings.resize_positional_embeddings``). Attention is masked to each image's
real patches. ``spatial_shapes`` is host data: the resize weights, the attention mask and the
gather indices are built from it on the CPU and moved to the device, so forward never reads a
device tensor back (``pixel_attention_mask`` is checked by ``validate_inputs`` when it is on the
CPU; forward derives the mask from ``spatial_shapes``).

SigLIP's attention-pooling head (``head``: a probe token attending over the patches) gives one
vector per image for contrastive training; a language model reads the patch features, so forward
never runs it. With ``keep_unused_layers`` its parameters are held (frozen) so that the parameter
count and the state dict match ``Siglip2VisionModel`` one to one.

State-dict keys (Hugging Face key in brackets)::

    patch_embed.{weight,bias}     Linear (H, C*p*p)        [embeddings.patch_embedding]
    pos_embed                     (num_patches, H)         [embeddings.position_embedding.weight]
    layers.{i}.attn_norm / attn.qkv (q;k;v fused) / attn.out / mlp_norm / mlp.fc1 / mlp.fc2
                                  [encoder.layers.{i}.layer_norm1 / self_attn.{q,k,v}_proj /
                                   self_attn.out_proj / layer_norm2 / mlp.fc1 / mlp.fc2]
    post_norm.{weight,bias}       post_norm, or keep_unused_layers   [post_layernorm]
    head.probe, head.attention.{in_proj_weight,in_proj_bias,out_proj.*}, head.layernorm.*,
    head.mlp.fc1.*, head.mlp.fc2.*    keep_unused_layers and pooling_head only   [head.* alike]
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from mimo_spec.components.layers import (
    MLP,
    ActivationName,
    Backend,
    TransformerBlock,
    check_backend,
    get_activation,
    init_transformer_weights,
)
from mimo_spec.components.vision.clip_vit import resolve_feature_layer
from mimo_spec.errors import InputError, ParamError, join_path
from mimo_spec.registry import register

INPUT_NAMES = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


@lru_cache(maxsize=1024)
def _resize_weights(out_size: int, in_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 weights of a 1-D bilinear resize with antialiasing, as
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` applies along one axis:
    a triangle filter as wide as the scale when shrinking (1 when growing), rows normalised to 1."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5
    source = torch.arange(in_size, dtype=torch.float64)
    w = (1 - (source[None, :] - center[:, None]).abs() / support).clamp(min=0)
    return w / w.sum(-1, keepdim=True)


def _grid_list(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    """The (h, w) of every image, read on the host (a CPU tensor: no device sync)."""
    return [(int(h), int(w)) for h, w in spatial_shapes.detach().cpu().tolist()]


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head, held for the checkpoint only (never run by forward): the same
    parameters and names as transformers' ``Siglip2MultiheadAttentionPoolingHead``."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden_size: int, activation: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, ffn_hidden_size, "gelu", activation, bias=True)


def example_grids(num_items: int, budget: int) -> list[tuple[int, int]]:
    """(h, w) patch grids of different aspect ratios, each within ``budget`` patches (example items)."""
    ratios = ((1, 1), (1, 2), (3, 2), (2, 5), (4, 3), (3, 1))
    grids = []
    for i in range(num_items):
        a, b = ratios[i % len(ratios)]
        k = max(1, math.isqrt(budget // (a * b))) - i // len(ratios)
        h, w = (max(1, k) * a, max(1, k) * b) if a * b <= budget else (1, 1)
        grids.append((h, w) if h * w <= budget else (1, 1))
    return grids


def example_naflex_inputs(num_items: int, budget: int, patch_dim: int,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random images of :func:`example_grids`, padded to ``budget`` patches: {"pixel_values": (N, budget,
    patch_dim), "pixel_attention_mask": (N, budget), "spatial_shapes": (N, 2)}; spatial_shapes is on the CPU
    even under a ``torch.device`` context (grids are host data)."""
    grids = example_grids(num_items, budget)
    lengths = torch.tensor([h * w for h, w in grids], dtype=torch.long).reshape(num_items)
    mask = (torch.arange(budget)[None, :] < lengths[:, None]).to(torch.int32)
    pixels = torch.randn((num_items, budget, patch_dim), generator=generator) * mask[..., None]
    shapes = torch.tensor(grids, dtype=torch.long, device="cpu").reshape(num_items, 2)  # host data, always
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def validate_naflex_inputs(inputs: dict, path: str, patch_dim: int, num_channels: int, patch_size: int,
                           max_num_patches: int | None) -> None:
    """Raise InputError (naming ``path``, the image and both numbers) unless ``inputs`` are
    Siglip2ImageProcessor's {"pixel_values", "pixel_attention_mask", "spatial_shapes"} for an encoder of
    ``patch_size`` and ``num_channels`` (rows of ``patch_dim`` values, at most ``max_num_patches`` of them).
    The mask's values are checked only when it is on the CPU (no device sync)."""
    for key in inputs:
        if key not in INPUT_NAMES:
            raise InputError(f"unexpected input {key!r}", path=join_path(path, key),
                             hint=f"this encoder takes {', '.join(INPUT_NAMES)}")
    for key in INPUT_NAMES:
        if key not in inputs:
            raise InputError(f"missing input {key!r}", path=join_path(path, key),
                             hint="pass Siglip2ImageProcessor's output: " + ", ".join(INPUT_NAMES))
        if not isinstance(inputs[key], torch.Tensor):
            raise InputError(f"expected a tensor, got {type(inputs[key]).__name__}", path=join_path(path, key))
    x, mask, shapes = (inputs[k] for k in INPUT_NAMES)
    px, pm, ps = (join_path(path, k) for k in INPUT_NAMES)
    expected = f"expected shape (N, max_patches, {patch_dim})"
    if not x.is_floating_point():
        raise InputError(f"{expected} as a floating-point tensor, got {x.dtype}", path=px,
                         hint="pass the processor's normalised pixel values")
    if x.dim() != 3:
        raise InputError(f"{expected}, got {tuple(x.shape)}", path=px,
                         hint="patches as Siglip2ImageProcessor returns them: items first, padded")
    n, rows, dim = x.shape
    if dim != patch_dim:
        raise InputError(f"each patch holds {dim} values but this encoder takes num_channels x patch_size^2 = "
                         f"{num_channels} x {patch_size}^2 = {patch_dim}", path=px,
                         hint="process the images with this encoder's patch_size and num_channels")
    if max_num_patches is not None and rows > max_num_patches:
        raise InputError(f"images are padded to {rows} patches, more than max_num_patches "
                         f"({max_num_patches})", path=px,
                         hint=f"process the images with max_num_patches={max_num_patches}")
    if mask.is_floating_point() or mask.is_complex() or tuple(mask.shape) != (n, rows):
        raise InputError(f"expected an integer or bool tensor of shape ({n}, {rows}) (pixel_values' first two "
                         f"dims), got {tuple(mask.shape)} of {mask.dtype}", path=pm)
    if shapes.is_floating_point() or shapes.is_complex() or shapes.dtype == torch.bool \
            or tuple(shapes.shape) != (n, 2):
        raise InputError(f"expected an integer tensor of shape ({n}, 2) (h, w patches per image), got "
                         f"{tuple(shapes.shape)} of {shapes.dtype}", path=ps)
    grids = _grid_list(shapes)
    for i, (h, w) in enumerate(grids):
        if h < 1 or w < 1:
            raise InputError(f"image {i}'s grid ({h}, {w}) is empty: h and w must be >= 1",
                             path=f"{ps}[{i}]")
        if h * w > rows:
            raise InputError(f"image {i}'s grid ({h}, {w}) makes {h * w} patches but pixel_values holds "
                             f"{rows} rows for it", path=f"{ps}[{i}]",
                             hint="pass spatial_shapes and pixel_values from the same processor call")
    if mask.device.type == "cpu":
        counts = mask.ne(0).sum(1).tolist()
        for i, ((h, w), count) in enumerate(zip(grids, counts)):
            if count != h * w:
                raise InputError(f"image {i}'s pixel_attention_mask marks {count} real patches but its grid "
                                 f"({h}, {w}) makes {h * w}", path=f"{pm}[{i}]",
                                 hint="pass spatial_shapes and pixel_attention_mask from the same processor call")
            if count and not bool(mask[i, :count].ne(0).all()):
                raise InputError(f"image {i}'s pixel_attention_mask does not mark its first {count} rows: the "
                                 "real patches must come first, padding last", path=f"{pm}[{i}]",
                                 hint="Siglip2ImageProcessor pads at the end")


@register("encoder", "siglip2_naflex")
class Siglip2NaFlex(nn.Module):
    """SigLIP2 NaFlex image encoder: images at their own patch grids -> flat patch features.

    Inputs (as ``Siglip2ImageProcessor`` returns them, items first): ``pixel_values`` (N, max_patches,
    C*p*p), ``pixel_attention_mask`` (N, max_patches), ``spatial_shapes`` (N, 2) = (h, w) per image,
    on the CPU. Output: (sum of h*w, hidden_size), each image's real patches in order.

    Args:
        patch_size: side of a square patch in pixels (pixel_values rows hold num_channels*patch_size**2 values).
        num_patches: size of the learned position table, a square number (256 = a 16x16 grid),
            resized to each image's grid.
        hidden_size, num_layers, num_heads, ffn_hidden_size: transformer sizes
            (num_layers = the checkpoint's depth, even if fewer blocks are built).
        num_channels: image channels.
        activation: MLP activation ("gelu_tanh" for SigLIP2), or any layers name.
        layer_norm_eps: epsilon of every LayerNorm.
        post_norm: LayerNorm on the output features (SigLIP2's last_hidden_state); set false when
            reading an earlier layer as transformers' hidden_states[k] (no post-norm there).
        feature_layer: HF hidden_states index of the output (0 = embeddings, i = after block i,
            negative from the end; -1 = the last block).
        max_num_patches: the patch budget per image: inputs padded to more rows are refused, and
            example_inputs pads to it (None: any padded length; examples use num_patches).
        pooling_head: the checkpoint has SigLIP's attention-pooling head (HF vision_use_head); only
            held with keep_unused_layers, never run (a language model reads the patch features).
        keep_unused_layers: also build the blocks past ``feature_layer``, the post-norm and the pooling
            head that forward does not use, so every tensor of the HF checkpoint has a home and the
            parameter count matches Siglip2VisionModel. They are frozen and never run.
        backend: "local", "te" or "auto".
    """

    siglip_normalisation = True  # the data path's default mean / std: SigLIP's 0.5 / 0.5

    input_name = "pixel_values"
    grid_inputs = {"spatial_shapes": ()}

    def __init__(
        self,
        patch_size: int,
        num_patches: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_hidden_size: int,
        num_channels: int = 3,
        activation: ActivationName = "gelu_tanh",
        layer_norm_eps: float = 1e-6,
        post_norm: bool = True,
        feature_layer: int = -1,
        max_num_patches: int | None = None,
        pooling_head: bool = True,
        keep_unused_layers: bool = False,
        backend: Backend = "local",
    ):
        super().__init__()
        for name, value in (("patch_size", patch_size), ("num_patches", num_patches),
                            ("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_hidden_size", ffn_hidden_size), ("num_channels", num_channels)):
            if value < 1:
                raise ParamError(name, f"{name} ({value}) must be >= 1")
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ParamError("num_patches", f"num_patches ({num_patches}) must be a square number "
                             "(the position table is a square grid, e.g. 256 = 16x16)")
        if hidden_size % num_heads:
            raise ParamError("hidden_size", f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if max_num_patches is not None and max_num_patches < 1:
            raise ParamError("max_num_patches", f"max_num_patches ({max_num_patches}) must be >= 1 or null")
        get_activation(activation)
        self.backend = check_backend(backend, activation=activation)
        num_blocks = resolve_feature_layer(feature_layer, num_layers)

        self.patch_size, self.num_channels, self.num_patches = patch_size, num_channels, num_patches
        self.grid = grid
        self.patch_dim = num_channels * patch_size * patch_size
        self.hidden_size = self.out_features = hidden_size
        self.num_layers, self.feature_layer, self.num_blocks = num_layers, feature_layer, num_blocks
        self.max_num_patches = max_num_patches
        self.keep_unused_layers = keep_unused_layers
        self.apply_post_norm = post_norm

        self.patch_embed = nn.Linear(self.patch_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, hidden_size))
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ffn_hidden_size, norm="layernorm", norm_eps=layer_norm_eps,
                             mlp="gelu", activation=activation, qkv_bias=True, out_bias=True, mlp_bias=True,
                             layer_idx=i, backend=self.backend)
            for i in range(num_layers if keep_unused_layers else num_blocks)
        )
        keep_norm = post_norm or keep_unused_layers
        self.post_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if keep_norm else None
        self.head = (PoolingHead(hidden_size, num_heads, ffn_hidden_size, activation, layer_norm_eps)
                     if keep_unused_layers and pooling_head else None)
        self.init_weights()
        # Never run, so never trained: frozen (also keeps DDP's unused-parameter check quiet).
        for layer in self.layers[num_blocks:]:
            layer.requires_grad_(False)
        if self.post_norm is not None and not post_norm:
            self.post_norm.requires_grad_(False)
        if self.head is not None:
            self.head.requires_grad_(False)

    def init_weights(self) -> None:
        init_transformer_weights(self, num_layers=max(self.num_blocks, 1))
        nn.init.normal_(self.pos_embed, std=self.hidden_size ** -0.5)
        if self.head is not None:
            nn.init.normal_(self.head.probe, std=0.02)
            self.head.attention._reset_parameters()

    # -------------------------------------------------------- framework hooks

    def tokens_per_item(self, pixel_values_shape: tuple) -> int:
        """At most this many tokens per image: the padded length (max_patches) of ``pixel_values``
        (N, max_patches, C*p*p); an image's exact count is h*w (``item_tokens``)."""
        return int(pixel_values_shape[1])

    def rows_per_item(self, grid_name: str, grid: torch.Tensor) -> list[int]:
        """h*w per image (the inputs are items first and padded, so no input is packed by the grid)."""
        return [h * w for h, w in _grid_list(grid)]

    def item_tokens(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Output tokens per image: h*w from ``spatial_shapes`` (read on the host)."""
        return [h * w for h, w in _grid_list(inputs["spatial_shapes"])]

    def example_grids(self, num_items: int, budget: int | None = None) -> list[tuple[int, int]]:
        """(h, w) patch grids of different aspect ratios, each within ``budget`` patches."""
        return example_grids(num_items, budget or self.max_num_patches or self.num_patches)

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random images of different grids, padded to max_num_patches (or num_patches):
        {"pixel_values": (N, S, C*p*p), "pixel_attention_mask": (N, S), "spatial_shapes": (N, 2)};
        spatial_shapes is on the CPU even under a ``torch.device`` context (grids are host data)."""
        return example_naflex_inputs(num_items, self.max_num_patches or self.num_patches, self.patch_dim, generator)

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """Raise InputError (naming ``path``, the image and both numbers) unless ``inputs`` are
        Siglip2ImageProcessor's {"pixel_values", "pixel_attention_mask", "spatial_shapes"} for this
        encoder. The mask's values are checked only when it is on the CPU (no device sync)."""
        validate_naflex_inputs(inputs, path, self.patch_dim, self.num_channels, self.patch_size, self.max_num_patches)

    # ----------------------------------------------------------------- model

    @torch.compiler.disable  # host work on the grids: torch.compile runs it eagerly, outside the graph
    def _host_plan(self, grids: list[tuple[int, int]] | torch.Tensor, rows: int):
        """From the grids (host): the flat index (T,) of each real patch in (N*rows), the row- and
        column-resize weights (T, g) of each real patch, and the key mask (N, rows) (None: no padding).
        ``grids``: (h, w) pairs, or the spatial_shapes tensor."""
        if isinstance(grids, torch.Tensor):
            grids = _grid_list(grids)
        index, row_w, col_w = [], [], []
        for i, (h, w) in enumerate(grids):
            if h * w == 0:
                continue
            index.append(torch.arange(h * w) + i * rows)
            row_w.append(_resize_weights(h, self.grid).repeat_interleave(w, 0))
            col_w.append(_resize_weights(w, self.grid).repeat(h, 1))
        lengths = torch.tensor([h * w for h, w in grids], dtype=torch.long)
        if index:
            dtype = self._pos_dtype()
            index_t, row_t, col_t = torch.cat(index), torch.cat(row_w).to(dtype), torch.cat(col_w).to(dtype)
        else:
            index_t = torch.zeros(0, dtype=torch.long)
            row_t = col_t = torch.zeros(0, self.grid)
        key_mask = None
        if bool((lengths != rows).any()):
            # an image without patches keeps one key, so no attention row is empty (no NaN)
            key_mask = torch.arange(rows)[None, :] < lengths.clamp(min=1)[:, None]
        return index_t, row_t, col_t, key_mask

    def _pos_dtype(self) -> torch.dtype:
        """The resize runs in fp32 (fp64 for an fp64 table), whatever the table's dtype."""
        return torch.promote_types(self.pos_embed.dtype, torch.float32)

    def resized_pos_embed(self, row_w: torch.Tensor, col_w: torch.Tensor) -> torch.Tensor:
        """Position embeddings (T, H) of patches whose row/column resize weights are (T, g) each:
        bilinear + antialias resizing of the (g, g) table, computed in fp32 (see ``_pos_dtype``)."""
        dtype = self._pos_dtype()
        weights = (row_w[:, :, None].to(dtype) * col_w[:, None, :].to(dtype)).flatten(1)  # (T, g*g)
        return (weights @ self.pos_embed.to(dtype)).to(self.pos_embed.dtype)

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                spatial_shapes: torch.Tensor) -> torch.Tensor:
        """-> (sum of h*w, hidden_size): each image's real patches, image after image.

        ``spatial_shapes`` should be on the CPU (the framework keeps grids there); a device tensor
        is read back once. ``pixel_attention_mask`` is not read: the mask comes from the grids."""
        n, rows, _ = pixel_values.shape
        device = pixel_values.device
        index, row_w, col_w, key_mask = self._host_plan(spatial_shapes, rows)
        index = index.to(device, non_blocking=True)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, rows, H)
        pos = self.resized_pos_embed(row_w.to(device, non_blocking=True), col_w.to(device, non_blocking=True))
        x = x.flatten(0, 1).index_add(0, index, pos.to(x.dtype)).view(n, rows, x.shape[-1])
        attn_mask = None if key_mask is None else key_mask.to(device, non_blocking=True)[:, None, None, :]
        for layer in self.layers[: self.num_blocks]:
            x = layer(x, attn_mask=attn_mask)
        if self.apply_post_norm:
            x = self.post_norm(x)
        x = x.flatten(0, 1)
        return x if key_mask is None else x.index_select(0, index)


# ------------------------------------------------------------------ Hugging Face interop


def siglip2_params_from_hf(vision_config: Any, feature_layer: int = -1, post_norm: bool = True,
                           keep_unused_layers: bool = False) -> dict[str, Any]:
    """Siglip2NaFlex kwargs from a Siglip2VisionConfig (or a Siglip2Config: its vision_config).

    ``post_norm=True`` is ``last_hidden_state``; a VLM reading ``hidden_states[k]`` sets it False
    (transformers applies no post-norm there)."""
    from mimo_spec.interop.hf_weights import _activation

    config = getattr(vision_config, "vision_config", None) or vision_config
    if getattr(config, "model_type", None) not in ("siglip2_vision_model", "siglip2"):
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} is not supported: use a "
                         "Siglip2VisionConfig")
    patch = config.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"patch_size {list(patch)} is not supported: patches must be square")
        patch = patch[0]
    return dict(
        patch_size=int(patch), num_patches=config.num_patches, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        ffn_hidden_size=config.intermediate_size, num_channels=config.num_channels,
        activation=_activation(config.hidden_act), layer_norm_eps=config.layer_norm_eps,
        post_norm=post_norm, feature_layer=feature_layer, pooling_head=bool(config.vision_use_head),
        keep_unused_layers=keep_unused_layers,
    )


_ANCHOR = "embeddings.patch_embedding.weight"
_HEAD_LEAVES = ("probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
                "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")


def _table(p: Mapping[str, Any]) -> dict[str, list[tuple[str, int | None]]]:
    """our key -> [(HF key without prefix, rows)] for the model ``p`` (constructor kwargs) describes."""
    h = p["hidden_size"]
    keep = p.get("keep_unused_layers", False)
    table: dict[str, list[tuple[str, int | None]]] = {
        "patch_embed.weight": [("embeddings.patch_embedding.weight", None)],
        "patch_embed.bias": [("embeddings.patch_embedding.bias", None)],
        "pos_embed": [("embeddings.position_embedding.weight", None)],
    }
    blocks = p["num_layers"] if keep else resolve_feature_layer(p.get("feature_layer", -1), p["num_layers"])
    for i in range(blocks):
        ours, hf = f"layers.{i}.", f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            table[f"{ours}attn_norm.{leaf}"] = [(f"{hf}layer_norm1.{leaf}", None)]
            table[f"{ours}attn.qkv.{leaf}"] = [(f"{hf}self_attn.{x}_proj.{leaf}", h) for x in "qkv"]
            table[f"{ours}attn.out.{leaf}"] = [(f"{hf}self_attn.out_proj.{leaf}", None)]
            table[f"{ours}mlp_norm.{leaf}"] = [(f"{hf}layer_norm2.{leaf}", None)]
            table[f"{ours}mlp.fc1.{leaf}"] = [(f"{hf}mlp.fc1.{leaf}", None)]
            table[f"{ours}mlp.fc2.{leaf}"] = [(f"{hf}mlp.fc2.{leaf}", None)]
    if p.get("post_norm", True) or keep:
        for leaf in ("weight", "bias"):
            table[f"post_norm.{leaf}"] = [(f"post_layernorm.{leaf}", None)]
    if keep and p.get("pooling_head", True):
        for leaf in _HEAD_LEAVES:
            table[f"head.{leaf}"] = [(f"head.{leaf}", None)]
    return table


def _find_prefix(keys: Iterable[str], prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    found = sorted({k[: -len(_ANCHOR)] for k in keys if k == _ANCHOR or k.endswith("." + _ANCHOR)})
    if len(found) != 1:
        raise KeyError(f"cannot locate the SigLIP2 vision model: keys ending in {_ANCHOR!r} have prefixes {found}; "
                       "pass prefix=")
    return found[0]


def _layer_count(keys: Iterable[str], layers: str) -> int:
    ids = {int(k[len(layers):].split(".", 1)[0]) for k in keys
           if k.startswith(layers) and k[len(layers):].split(".", 1)[0].isdigit()}
    return max(ids) + 1 if ids else 0


def siglip2_import_plan(hf_keys: Iterable[str], params: Mapping[str, Any] | None = None,
                        prefix: str | None = None) -> dict[str, list[tuple[str, int | None, bool]]]:
    """Which HF tensors make each Siglip2NaFlex tensor, from key names alone: our key ->
    [(full HF key, rows, transposed)] (the ``Plan`` of ``mimo_spec.interop.hf_weights``)."""
    keys = list(hf_keys)
    prefix = _find_prefix(keys, prefix)
    if params is None:
        params = _params_from_keys([k[len(prefix):] for k in keys if k.startswith(prefix)], "encoder.layers.",
                                   "post_layernorm.weight", None)
    return {ours: [(prefix + hf, rows, False) for hf, rows in parts] for ours, parts in _table(params).items()}


def _params_from_keys(keys: list[str], layers: str, post_norm_key: str, hidden_size: int | None) -> dict[str, Any]:
    """The kwargs ``_table`` needs to convert everything a state dict holds (keys without prefix)."""
    has_head = any(k.startswith("head.") for k in keys)
    return {"hidden_size": hidden_size, "num_layers": _layer_count(keys, layers), "feature_layer": -1,
            "post_norm": post_norm_key in keys, "keep_unused_layers": has_head, "pooling_head": has_head}


def siglip2_state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], params: Mapping[str, Any] | None = None,
                               prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Siglip2VisionModel / Siglip2Model (or a VLM holding one) -> Siglip2NaFlex's state dict.

    ``params`` (our constructor kwargs, e.g. from ``siglip2_params_from_hf``) say which tensors the
    model holds: blocks past ``feature_layer``, the post-norm and the pooling head only with
    ``keep_unused_layers``. ``params=None`` converts every vision tensor found (a model built with
    keep_unused_layers). ``prefix`` is found from the keys unless given (``""`` for a
    Siglip2VisionModel, ``"vision_model."`` for a Siglip2Model). Raises KeyError naming a missing key.
    """
    from mimo_spec.interop.hf_weights import _import

    keys = list(hf_sd.keys())
    prefix = _find_prefix(keys, prefix)
    if params is None:
        ours_keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        params = _params_from_keys(ours_keys, "encoder.layers.", "post_layernorm.weight",
                                   hf_sd[prefix + _ANCHOR].shape[0])
    return _import(hf_sd, siglip2_import_plan(keys, params, prefix))


def siglip2_state_dict_to_hf(sd: Mapping[str, torch.Tensor], params: Mapping[str, Any] | None = None,
                             prefix: str = "") -> dict[str, torch.Tensor]:
    """Siglip2NaFlex's state dict -> HF keys (``prefix=""``: Siglip2VisionModel; ``"vision_model."``:
    inside a Siglip2Model). Only the tensors ours holds: all of them with keep_unused_layers.
    ``params=None`` reads what to convert from ``sd``'s keys."""
    from mimo_spec.interop.hf_weights import _export

    if params is None:
        params = _params_from_keys(list(sd), "layers.", "post_norm.weight", sd["patch_embed.weight"].shape[0])
    return _export(sd, _table(params), prefix)
