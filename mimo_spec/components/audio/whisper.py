"""Whisper audio encoder: log-mel frames -> audio tokens (two frames per token, or 2 * pool_stride).

Unlike Hugging Face's encoder, any frame count up to 2 * max_source_positions is
accepted (HF insists on exactly 3000): positions are sliced to the output length.

Qwen2-Audio's audio tower is this encoder with ``pool_stride: 2``: the transformer's output is
average-pooled over time (``AvgPool1d(2, 2)``) before the final LayerNorm, 750 tokens per 30 s.

Items of different lengths (``feature_attention_mask``, WhisperFeatureExtractor's attention mask at
frame resolution, as Qwen2AudioProcessor returns it): an item of ``L`` real frames keeps
``((L - 1) // 2 + 1) // pool_stride`` tokens (the count Qwen2AudioProcessor writes placeholders for), its
attention skips the padded positions exactly as ``Qwen2AudioForConditionalGeneration`` masks them, and
forward returns the kept tokens FLAT, item after item: (sum of item tokens, hidden_size). The mask is
host data (a grid input: the data path keeps it on the CPU); positions past the batch's longest item are
not computed at all (no real position attends to them, so the result is the same).

Whisper's attention has no key bias. ``key_bias: false`` holds exactly Hugging Face's parameters: the fused
QKV has no bias and the queries and values have theirs (``attn.q_bias`` / ``attn.v_bias``). The default
(``key_bias: true``) keeps one bias for all three parts, the key part zero after conversion; that is exact
too, because a key bias adds the same q.b_k to every score of a query's row, which softmax ignores (its
gradient is identically zero, so it stays zero while training), but it holds hidden_size more parameters
per layer than Hugging Face's encoder.

State-dict keys::

    conv1.{weight,bias}     (H, num_mel_bins, 3)
    conv2.{weight,bias}     (H, H, 3), stride 2
    pos_embed               (max_source_positions, H)  sinusoids, a frozen parameter
    layers.{i}.attn_norm / attn.qkv / attn.out / mlp_norm / mlp.fc1 / mlp.fc2
                            (key_bias false: attn.qkv.weight only, with attn.q_bias / attn.v_bias)
    norm.{weight,bias}
"""

from __future__ import annotations

import math

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
from mimo_spec.errors import InputError, ParamError, join_path
from mimo_spec.registry import register


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table (length, channels): [sin | cos] halves."""
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    # computed on the CPU whatever the default device: on meta there is nothing to compute,
    # and meta arange goes through torch's slow reference kernels
    target = torch.empty(0).device
    cpu = torch.device("cpu")
    dtype = torch.get_default_dtype()  # the model's (built under dtype=bfloat16: bf16, as every other weight)
    if target.type == "meta":
        return torch.empty(length, channels, dtype=dtype, device=target)
    inv_timescales = torch.exp(-log_increment * torch.arange(half, dtype=torch.float32, device=cpu))
    scaled_time = torch.arange(length, dtype=torch.float32, device=cpu)[:, None] * inv_timescales[None, :]
    return torch.cat((scaled_time.sin(), scaled_time.cos()), dim=1).to(device=target, dtype=dtype)


@register("encoder", "whisper_encoder")
class WhisperEncoder(nn.Module):
    """Audio encoder: input_features (N, num_mel_bins, frames) -> (N, ceil(frames / 2) // pool_stride,
    hidden_size); with ``feature_attention_mask`` (N, frames) each item keeps its own length and the
    output is flat, (sum of item tokens, hidden_size).

    Args:
        num_mel_bins: mel channels of the input.
        hidden_size, num_layers, num_heads, ffn_hidden_size: transformer sizes.
        max_source_positions: output positions of the transformer (1500 = 30 s at 3000 frames).
        activation: of the MLP ("gelu" in Whisper; the conv front end always uses GELU).
        layer_norm_eps: epsilon of every LayerNorm.
        pool_stride: average pooling over time by this stride (window = stride) after the last block and
            before the final LayerNorm (Qwen2-Audio: 2, 750 tokens per 30 s); 1: none (Whisper).
        variable_length: items keep their real length: the data path passes the feature extractor's
            ``feature_attention_mask`` with every audio item (as Qwen2AudioProcessor does), so an item's
            token count follows its duration and attention skips the padding; examples carry the mask
            too. False: every item is a full window (no mask is taken).
        key_bias: the fused QKV carries a (zero, exact) key bias; false: biases on queries and values only,
            Hugging Face's exact parameter set (not on the te backend; "auto" then runs local).
        backend: "local", "te" or "auto".
    """

    input_name = "input_features"

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_hidden_size: int,
        num_mel_bins: int = 80,
        max_source_positions: int = 1500,
        activation: ActivationName = "gelu",
        layer_norm_eps: float = 1e-5,
        pool_stride: int = 1,
        variable_length: bool = False,
        key_bias: bool = True,
        backend: Backend = "local",
    ):
        super().__init__()
        for name, value in (("num_mel_bins", num_mel_bins), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_hidden_size", ffn_hidden_size), ("max_source_positions", max_source_positions),
                            ("pool_stride", pool_stride)):
            if value < 1:
                raise ParamError(name, f"{name} ({value}) must be >= 1")
        if hidden_size % num_heads:
            raise ParamError("hidden_size", f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 2 or hidden_size < 4:
            raise ParamError("hidden_size",
                             f"hidden_size ({hidden_size}) must be even and >= 4 for sinusoidal positions")
        get_activation(activation)
        if not key_bias and backend == "te":
            raise ParamError("key_bias", "key_bias: false (q and v biases only) has no transformer-engine "
                             "projection", hint="use backend: local (or auto), or key_bias: true")
        self.key_bias = bool(key_bias)
        # without a key bias the layers are local: "auto" never picks transformer-engine
        self.backend = check_backend(backend if key_bias else "local", activation=activation)
        self.num_mel_bins, self.max_source_positions = num_mel_bins, max_source_positions
        self.hidden_size = self.out_features = hidden_size
        self.num_layers = num_layers
        self.max_frames = 2 * max_source_positions
        if pool_stride > max_source_positions:
            raise ParamError("pool_stride", f"pool_stride ({pool_stride}) must be at most max_source_positions "
                             f"({max_source_positions}): a full window would make no token")
        self.pool_stride, self.variable_length = int(pool_stride), bool(variable_length)
        # variable_length: the mask is a grid input (host data, one row per item) packing no input, so
        # input_features stay items first; without it every item is a full window, as before
        self.grid_inputs = {"feature_attention_mask": ()} if self.variable_length else {}

        self.conv1 = nn.Conv1d(num_mel_bins, hidden_size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, stride=2, padding=1)
        # A frozen parameter, as Hugging Face's embed_positions (so parameter counts agree): checkpoints
        # carry it (HF: embed_positions.weight) and the optimizer never sees it.
        self.pos_embed = nn.Parameter(sinusoids(max_source_positions, hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, ffn_hidden_size, norm="layernorm", norm_eps=layer_norm_eps,
                             mlp="gelu", activation=activation, qkv_bias=True if key_bias else "qv",
                             out_bias=True, mlp_bias=True,
                             layer_idx=i, backend=self.backend)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        init_transformer_weights(self, num_layers=self.num_layers)
        with torch.no_grad():
            self.pos_embed.copy_(sinusoids(self.max_source_positions, self.hidden_size))

    # -------------------------------------------------------- framework hooks

    def tokens_for_frames(self, frames: int) -> int:
        """Tokens of an item of ``frames`` real frames: ((frames - 1) // 2 + 1) // pool_stride
        (Qwen2AudioProcessor's count for pool_stride 2)."""
        frames = int(frames)
        return ((frames - 1) // 2 + 1) // self.pool_stride if frames > 0 else 0

    def tokens_per_item(self, input_features_shape: tuple) -> int:
        """Output tokens for an input of this shape: ceil(frames / 2) // pool_stride."""
        return self.tokens_for_frames(int(input_features_shape[-1]))

    def rows_per_item(self, grid_name: str, grid: torch.Tensor) -> list[int]:
        """Real frames of each item (the mask packs no input: input_features stay items first)."""
        return [int(v) for v in _lengths(grid)]

    def item_tokens(self, inputs: dict) -> list[int]:
        """Tokens of each item: from its real frames in ``feature_attention_mask`` (read on the host; a
        variable_length encoder's grid), or the full window's count for every item without it."""
        mask = inputs.get("feature_attention_mask")
        if mask is None:
            x = inputs["input_features"]
            return [self.tokens_per_item(tuple(x.shape))] * int(x.shape[0])
        return [self.tokens_for_frames(n) for n in _lengths(mask)]

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random 30-second inputs: {"input_features": (N, num_mel_bins, 2 * max_source_positions)}; with
        ``variable_length`` also "feature_attention_mask" (N, frames) on the CPU, items of different lengths
        (the first full, then shorter ones)."""
        shape = (num_items, self.num_mel_bins, self.max_frames)
        out = {"input_features": torch.randn(shape, generator=generator)}
        if self.variable_length:
            full, least = self.max_frames, 2 * self.pool_stride + 1  # the least: one token
            lengths = [min(full, max(least, full - full * (i % 4) // 4)) for i in range(num_items)]
            mask = torch.arange(self.max_frames, device="cpu")[None, :] < torch.tensor(lengths, dtype=torch.long,
                                                                                        device="cpu")[:, None]
            out["feature_attention_mask"] = mask.to(torch.int32).reshape(num_items, self.max_frames)
        return out

    def validate_inputs(self, inputs: dict, path: str) -> None:
        """Raise InputError (naming ``path``) unless inputs is {"input_features": (N, mel, frames)}, optionally
        with "feature_attention_mask" (N, frames): integer, 1 for the real frames first, then 0 (its values
        are checked when it is on the CPU, as the framework keeps it)."""
        expected = f"expected shape (N, {self.num_mel_bins}, frames) with 1 <= frames <= {self.max_frames}"
        mask = inputs.get("feature_attention_mask") if isinstance(inputs, dict) else None
        rest = {k: v for k, v in inputs.items() if k != "feature_attention_mask"} if isinstance(inputs, dict) \
            else inputs
        x, where = the_only_input(rest, "input_features", path, expected,
                                  hint="pass log-mel features as a float tensor")
        shape = tuple(x.shape)
        if x.dim() != 3 or shape[1] != self.num_mel_bins or not 1 <= shape[2] <= self.max_frames:
            raise InputError(f"{expected}, got {shape}", path=where,
                             hint="log-mel features batched as (N, mel_bins, frames); split longer audio")
        if "feature_attention_mask" not in inputs:
            return
        mpath = join_path(path, "feature_attention_mask")
        if not self.variable_length:
            raise InputError("this encoder takes full windows only (variable_length: false), not a "
                             "feature_attention_mask", path=mpath,
                             hint="set variable_length: true on the whisper_encoder for items of their own length")
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex() \
                or tuple(mask.shape) != (shape[0], shape[2]):
            got = f"{tuple(mask.shape)} of {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputError(f"expected an integer tensor of shape ({shape[0]}, {shape[2]}) (items, frames of "
                             f"input_features), got {got}", path=mpath,
                             hint="pass the feature extractor's attention mask (Qwen2AudioProcessor's "
                                  "feature_attention_mask)")
        if mask.device.type == "cpu" and mask.numel():
            m = mask.ne(0)
            lengths = m.sum(1)
            prefix = torch.arange(shape[2])[None, :] < lengths[:, None]
            bad = (m != prefix).any(1).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise InputError(f"audio item {i}'s mask does not mark its first {int(lengths[i])} frames: the real "
                                 "frames must come first, padding last", path=f"{mpath}[{i}]",
                                 hint="WhisperFeatureExtractor pads at the end")

    # ----------------------------------------------------------------- model

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, H) -> (N, T // pool_stride, H): average of each window of pool_stride positions (AvgPool1d)."""
        s = self.pool_stride
        if s == 1:
            return x
        n, t, h = x.shape
        return x[:, : (t // s) * s].reshape(n, t // s, s, h).mean(2)

    @torch.compiler.disable  # host work on the mask: torch.compile runs it eagerly, outside the graph
    def _host_plan(self, mask: torch.Tensor, positions: int):
        """From the mask (host): positions to compute (the longest item's), the key mask (N, that) or None,
        and the flat index of each kept token in (N * pooled positions)."""
        frames = _lengths(mask)
        feats = [(f - 1) // 2 + 1 if f > 0 else 0 for f in frames]
        keep = min(positions, max(max(feats, default=1), 1))
        pooled = keep // self.pool_stride
        tokens = [min(f // self.pool_stride, pooled) for f in feats]
        index = torch.cat([torch.arange(t) + i * pooled for i, t in enumerate(tokens)]) if tokens else \
            torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor(feats, dtype=torch.long).clamp(min=1, max=keep)
        key_mask = None
        if bool((lengths < keep).any()):  # an item without frames keeps one key, so no row is empty (no NaN)
            key_mask = torch.arange(keep)[None, :] < lengths[:, None]
        return keep, key_mask, index.to(torch.long)

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_features (N, num_mel_bins, frames) -> (N, ceil(frames / 2) // pool_stride, hidden_size);
        with ``feature_attention_mask`` (N, frames), on the CPU: (sum of item tokens, hidden_size)."""
        if input_features.shape[-1] > self.max_frames:
            raise InputError(f"{input_features.shape[-1]} frames exceed the maximum {self.max_frames}",
                             path="input_features", hint="split longer audio into 30 s windows")
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))  # the front end is always exact GELU, whatever the MLP uses
        x = F.gelu(self.conv2(x))  # (N, H, T): over every frame given, padding included (as HF)
        x = x.transpose(1, 2)  # (N, T, H)
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        if feature_attention_mask is None:
            for layer in self.layers:
                x = layer(x)
            return self.norm(self._pool(x))
        keep, key_mask, index = self._host_plan(feature_attention_mask, x.shape[1])
        x = x[:, :keep]
        attn_mask = None if key_mask is None else key_mask.to(x.device, non_blocking=True)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask)
        x = self.norm(self._pool(x))
        return x.flatten(0, 1).index_select(0, index.to(x.device, non_blocking=True))


def _lengths(mask: torch.Tensor) -> list[int]:
    """Real frames of each item: the mask's nonzero count per row, read on the host."""
    return [int(v) for v in mask.detach().cpu().ne(0).sum(-1).reshape(-1).tolist()]
