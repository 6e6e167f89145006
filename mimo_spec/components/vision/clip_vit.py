"""Vision transformer encoder in the CLIP / SigLIP / InternViT layout.

CLIP:      class token, pre-norm (``pre_layrnorm``), quick_gelu, conv without bias.
SigLIP:    no class token, no pre-norm, gelu_tanh, conv with bias, post-norm on the output.
InternViT: class token, no pre-norm, gelu, conv with bias, LayerScale on both residual branches
           (``layer_scale``); InternViT-6B: RMSNorm blocks, no q/k/v bias, RMSNorm over all heads'
           queries and keys (``norm: rmsnorm, qkv_bias: false, qk_norm: true``).

Only the blocks up to ``feature_layer`` are built: with 24 layers and
``feature_layer=-2`` (LLaVA) the model has 23 blocks and never runs the last.
``keep_unused_layers=True`` builds the later blocks and the post-norm too (never
run, frozen), so a checkpoint round-trips to Hugging Face tensor for tensor and
the parameter count matches HF's (LLaVA-1.5-7B: 7,063,427,072).

State-dict keys::

    patch_embed.{weight,bias}    conv (H, C, p, p); bias only with patch_bias
    class_embedding              (H,)                  class_token only
    registers                    (R, H)                register_tokens > 0 only
    pos_embed                    (num_positions, H)    class position first
    pre_norm.{weight,bias}       pre_norm only
    layers.{i}.attn_norm / attn.qkv / attn.out / mlp_norm / mlp.fc1 / mlp.fc2
    layers.{i}.attn_scale / mlp_scale                  layer_scale only
    layers.{i}.attn.q_norm / attn.k_norm               qk_norm only: (H,), over all heads
    post_norm.{weight,bias}      post_norm, or keep_unused_layers (then unused unless post_norm)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.components.encoder_inputs import the_only_input
from mimo_spec.components.layers import (
    ActivationName,
    Backend,
    NormKind,
    RMSNorm,
    TransformerBlock,
    check_backend,
    get_activation,
    init_transformer_weights,
)
from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register


class HeadsRMSNorm(RMSNorm):
    """RMSNorm over all heads of a (..., heads, head_dim) tensor at once: InternViT-6B's q/k norm, whose
    statistics span the full width (Qwen3's per-head q/k norm is ``Attention(qk_norm=...)``)."""

    qk_norm_all_heads = True  # a tensor-parallel share of the heads cannot compute it (parallel/checks.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] * x.shape[-1] != self.normalized_shape[0]:  # shapes only: no host sync
            raise RuntimeError(f"qk_norm spans all {self.normalized_shape[0]} channels of the heads, but this "
                               f"call holds {x.shape[-2]} heads of {x.shape[-1]}: a tensor-parallel share of the "
                               "heads cannot be normalised alone (do not shard this tower's attention)")
        return super().forward(x.flatten(-2)).view_as(x)


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """Hugging Face ``hidden_states`` index -> number of blocks to run (0 = embeddings)."""
    blocks = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= blocks <= num_layers:
        raise ParamError("feature_layer",
                         f"feature_layer ({feature_layer}) is out of range for num_layers ({num_layers}): "
                         f"use {-(num_layers + 1)}..{num_layers}")
    return blocks


@register("encoder", "clip_vit")
class ClipViT(nn.Module):
    """Image encoder: pixel_values (N, C, H, W) -> features (N, T, hidden_size).

    Args:
        image_size, patch_size, num_channels: input geometry (square images). The patch grid is
            ``image_size // patch_size`` per side: pixels past the last whole patch are not seen (as
            SigLIP-so400m at 384 px with 14-px patches: 27 x 27 patches, the last 6 pixels unused).
        hidden_size, num_layers, num_heads, ffn_hidden_size: transformer sizes
            (num_layers = the checkpoint's depth, even if fewer blocks are built).
        activation: "quick_gelu" (CLIP) or "gelu_tanh" (SigLIP), or any layers name.
        layer_norm_eps: epsilon of every LayerNorm.
        class_token: prepend a learned class token (CLIP).
        pre_norm: LayerNorm on the embeddings (CLIP's pre_layrnorm).
        post_norm: LayerNorm on the output features (SigLIP's last_hidden_state).
        patch_bias: bias on the patch conv (SigLIP).
        feature_layer: HF hidden_states index of the output (0 = embeddings,
            i = after block i, negative from the end; LLaVA uses -2).
        feature_select: "patch" drops the class token, "all" keeps it.
        dynamic_image_size: accept any H, W that are multiples of patch_size by
            bicubic interpolation of the patch position embeddings.
        layer_scale: LayerScale (InternViT's lambda_1 / lambda_2): per-channel learned gains on each
            block's attention and MLP outputs, initialised to this value; null: none (CLIP, SigLIP).
        norm: the blocks' norms, "layernorm" or "rmsnorm" (InternViT-6B); pre_norm / post_norm stay LayerNorm.
        mlp: "gelu" (fc1, activation, fc2) or "swiglu" (gated; use activation silu).
        qk_norm: RMSNorm (eps layer_norm_eps) over the queries and over the keys, all heads at once
            (InternViT-6B's qk_normalization).
        qkv_bias: bias on the q/k/v projections (InternViT-6B has none; the output projection keeps its bias).
        register_tokens: learned register tokens inserted after the class token (after the position
            embeddings are added; they have none), attended to by every block, and dropped from the
            output whatever feature_select says.
        keep_unused_layers: also build the blocks past ``feature_layer`` and a
            post-norm that forward does not use (CLIP's ``post_layernorm`` feeds
            only the pooled output), so every tensor of the HF checkpoint has a
            home. They are frozen and never run.
        backend: "local", "te" or "auto".
    """

    input_name = "pixel_values"

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_hidden_size: int,
        num_channels: int = 3,
        activation: ActivationName = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        class_token: bool = True,
        pre_norm: bool = True,
        post_norm: bool = False,
        patch_bias: bool = False,
        feature_layer: int = -1,
        feature_select: Literal["patch", "all"] = "patch",
        dynamic_image_size: bool = False,
        keep_unused_layers: bool = False,
        layer_scale: float | None = None,
        norm: NormKind = "layernorm",
        mlp: Literal["gelu", "swiglu"] = "gelu",
        qk_norm: bool = False,
        qkv_bias: bool = True,
        register_tokens: int = 0,
        backend: Backend = "local",
    ):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_hidden_size", ffn_hidden_size), ("num_channels", num_channels)):
            if value < 1:
                raise ParamError(name, f"{name} ({value}) must be >= 1")
        if image_size < patch_size:
            raise ParamError("image_size", f"image_size ({image_size}) must be at least patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ParamError("hidden_size", f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if feature_select not in ("patch", "all"):
            raise ParamError("feature_select", f"feature_select ({feature_select!r}) must be 'patch' or 'all'")
        if norm not in ("layernorm", "rmsnorm"):
            raise ParamError("norm", f"norm ({norm!r}) must be 'layernorm' or 'rmsnorm'")
        if mlp not in ("gelu", "swiglu"):
            raise ParamError("mlp", f"mlp ({mlp!r}) must be 'gelu' or 'swiglu'")
        if isinstance(register_tokens, bool) or not isinstance(register_tokens, int) \
                or register_tokens < 0:
            raise ParamError("register_tokens", f"register_tokens ({register_tokens!r}) must be an "
                             "integer >= 0")
        get_activation(activation)
        self.backend = check_backend(backend, activation=activation, gated=mlp == "swiglu")
        num_blocks = resolve_feature_layer(feature_layer, num_layers)

        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size = self.out_features = hidden_size
        self.num_layers, self.feature_layer, self.feature_select = num_layers, feature_layer, feature_select
        self.dynamic_image_size = dynamic_image_size
        self.num_blocks = num_blocks  # blocks forward runs; len(self.layers) may be larger
        self.keep_unused_layers = keep_unused_layers
        self.apply_post_norm = post_norm
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2

        self.patch_embed = nn.Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(hidden_size)) if class_token else None
        self.register_tokens = register_tokens
        self.registers = nn.Parameter(torch.zeros(register_tokens, hidden_size)) if register_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(self.num_patches + int(class_token), hidden_size))
        self.pre_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if pre_norm else None
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ffn_hidden_size, norm=norm, norm_eps=layer_norm_eps,
                             mlp=mlp, activation=activation, qkv_bias=qkv_bias, out_bias=True, mlp_bias=True,
                             layer_idx=i, backend=self.backend, layer_scale=layer_scale)
            for i in range(num_layers if keep_unused_layers else num_blocks)
        )
        if qk_norm:  # over the full width, not per head: replaces the attention's (absent) per-head norms
            for layer in self.layers:
                layer.attn.q_norm = HeadsRMSNorm(hidden_size, eps=layer_norm_eps)
                layer.attn.k_norm = HeadsRMSNorm(hidden_size, eps=layer_norm_eps)
        keep_norm = post_norm or keep_unused_layers
        self.post_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if keep_norm else None
        self.init_weights()
        # Never run, so never trained: frozen, which also keeps DDP's unused-parameter check quiet.
        for layer in self.layers[num_blocks:]:
            layer.requires_grad_(False)
        if self.post_norm is not None and not post_norm:
            self.post_norm.requires_grad_(False)

    def init_weights(self) -> None:
        init_transformer_weights(self, num_layers=max(self.num_blocks, 1))
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=0.02)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02)

    # -------------------------------------------------------- framework hooks

    def tokens_per_item(self, pixel_values_shape: tuple) -> int:
        """Output tokens per image for an input of this shape (only H, W are read)."""
        h, w = pixel_values_shape[-2:]
        if not self.dynamic_image_size:
            h = w = self.image_size
        cls = int(self.class_embedding is not None and self.feature_select == "all")
        return (h // self.patch_size) * (w // self.patch_size) + cls

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random images at the native size: {"pixel_values": (N, C, image_size, image_size)}."""
        shape = (num_items, self.num_channels, self.image_size, self.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """Raise InputError (naming ``path``) unless ``inputs`` is {"pixel_values": (N, C, H, W)}."""
        size = "H, W" if self.dynamic_image_size else f"{self.image_size}, {self.image_size}"
        expected = f"expected shape (N, {self.num_channels}, {size})"
        x, where = the_only_input(inputs, "pixel_values", path, expected,
                                  hint="pass images as float tensors, e.g. pixel_values.float() / 255")
        shape = tuple(x.shape)
        if x.dim() != 4 or shape[1] != self.num_channels:
            raise InputError(f"{expected}, got {shape}", path=where,
                             hint="images must be batched as (N, channels, height, width)")
        h, w = shape[2:]
        if self.dynamic_image_size:
            if h < self.patch_size or w < self.patch_size or h % self.patch_size or w % self.patch_size:
                raise InputError(f"{expected} with H and W multiples of patch_size {self.patch_size}, got {shape}",
                                 path=where, hint="resize or pad the images")
        elif (h, w) != (self.image_size, self.image_size):
            raise InputError(f"{expected}, got {shape}", path=where,
                             hint="resize the images, or set dynamic_image_size: true")

    # ----------------------------------------------------------------- model

    def _patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Patch position embeddings (h*w, H), bicubically resized when the grid differs."""
        pos = self.pos_embed[1:] if self.class_embedding is not None else self.pos_embed
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, H, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, H, W) -> (N, T, hidden_size); T = tokens_per_item."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, H, h, w)
        h, w = x.shape[-2:]
        if not self.dynamic_image_size and (h, w) != (self.grid, self.grid):
            raise InputError(f"expected images of {self.image_size}x{self.image_size}, got "
                             f"{tuple(pixel_values.shape)}", path="pixel_values",
                             hint="resize the images, or set dynamic_image_size: true")
        x = x.flatten(2).transpose(1, 2) + self._patch_pos_embed(h, w)  # (N, h*w, H)
        front = []  # tokens before the patches: the class token, then the registers
        if self.class_embedding is not None:
            front.append((self.class_embedding + self.pos_embed[0]).expand(x.shape[0], 1, -1))
        if self.registers is not None:
            front.append(self.registers.to(x.dtype).expand(x.shape[0], -1, -1))
        if front:
            x = torch.cat((*front, x), dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers[: self.num_blocks]:
            x = layer(x)
        if self.apply_post_norm:
            x = self.post_norm(x)
        cls, registers = int(self.class_embedding is not None), self.register_tokens
        if self.feature_select == "patch":
            return x[:, cls + registers:]
        return torch.cat((x[:, :cls], x[:, cls + registers:]), dim=1) if registers else x  # the registers go
