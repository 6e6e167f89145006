"""Decoder-only language model covering GPT-2, Llama/Vicuna/Mistral and Qwen2 layouts.

The model takes *embeddings* (the framework splices modality tokens into the text
embeddings before calling ``forward``), so the token lookup is a separate method.

State-dict keys::

    token_embedding.weight            (V, H)
    position_embedding.weight         (max_seq_len, H)       position_embedding="learned" only
    layers.{i}.attn_norm.{weight,bias}
    layers.{i}.attn.qkv.{weight,bias} rows [q; k; v]
    layers.{i}.attn.out.{weight,bias}
    layers.{i}.attn.{q,k}_norm.weight (D,)                  qk_norm (rmsnorm) only; (heads * D,) / (kv_heads * D,)
                                                            with qk_norm_kind="rmsnorm_all_heads"
    layers.{i}.attn.{q,k}_norm_{weight,bias} (heads, D)     qk_norm_kind="layernorm_per_head" only
    layers.{i}.mlp_norm.{weight,bias}
    layers.{i}.mlp.fc1.{weight,bias}  swiglu: rows [gate; up]
    layers.{i}.mlp.fc2.{weight,bias}
    norm.{weight,bias}
    lm_head.weight                    (V, H)                 absent when tie_embeddings

A mixture-of-experts layer (``num_experts``; see :mod:`mimo_spec.components.moe`) holds instead of ``mlp.fc1/fc2``::

    layers.{i}.mlp.router.weight      (E, H)
    layers.{i}.mlp.experts.gate_up    (E, 2F, H)             rows [gate; up] per expert
    layers.{i}.mlp.experts.down       (E, H, F)
    layers.{i}.mlp.shared.fc1.weight  (2Fs, H)               shared expert, rows [gate; up]
    layers.{i}.mlp.shared.fc2.weight  (H, Fs)
    layers.{i}.mlp.shared_gate.weight (1, H)                 shared_expert_gate
    layers.{i}.mlp.router_bias        (E,)                   a buffer, with router_bias_update_rate
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.components.layers import (
    ActivationName,
    Backend,
    KVCache,
    QK_NORM_KINDS,
    RotaryEmbedding,
    TransformerBlock,
    build_attention_mask,
    build_norm,
    check_backend,
    get_activation,
    init_transformer_weights,
)
from mimo_spec.components.moe import MoE, RouterLosses, router_losses
from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register


@register("language_model", "gpt")
class GPT(nn.Module):
    """Causal transformer LM.

    Args:
        vocab_size, hidden_size, num_layers, num_heads: the usual sizes.
        num_kv_heads: key/value heads for GQA/MQA (None = num_heads).
        ffn_hidden_size: MLP inner size (None = 4 * hidden_size).
        norm, norm_eps: "rmsnorm" (no bias) or "layernorm" (with bias).
        position_embedding: "rope", "learned" (GPT-2) or "none".
        rope_theta: RoPE base. max_seq_len: table size for learned positions.
        rope_scaling: RoPE frequency scaling, as Hugging Face's ``rope_parameters``: ``{rope_type: llama3,
            factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}`` (Llama 3.1 / 3.2,
            e.g. Idefics3-8B's LM) or ``{rope_type: linear, factor}``; None: plain RoPE.
        mlp: "swiglu" (gated, fused gate/up) or "gelu" (2-layer).
        activation: MLP activation (None = silu for swiglu, gelu for gelu).
        attention_bias: bias on q/k/v. attention_out_bias: bias on the output
            projection (None = attention_bias; Qwen2 has True/False).
        mlp_bias: bias on the MLP linears. tie_embeddings: lm head = token embedding.
        dropout: embedding, attention and residual dropout.
        head_dim: per-head size (None = hidden_size / num_heads).
        backend: "local", "te" or "auto" (see layers.check_backend).
        mrope_section: multimodal RoPE (Qwen2-VL's ``rope_scaling.mrope_section``): how many of the
            head_dim // 2 rotary frequencies take the temporal, height and width position (e.g.
            [16, 24, 24] for head_dim 128; must sum to head_dim // 2). ``forward`` then also takes
            (3, B, S) ``position_ids`` (see :func:`mimo_spec.models.mrope.mrope_position_ids`);
            (B, S) positions are text (one position on all axes). None = plain RoPE.
        mrope_interleaved: Qwen3-VL's interleaved sections (frequency j reads height when
            j % 3 == 1, width when j % 3 == 2, within 3 x their section; else temporal) instead of
            Qwen2-VL's contiguous ones. Needs mrope_section.
        mrope_tokens_per_second: Qwen2.5-VL: a video's temporal positions step by
            ``tokens_per_second * second_per_grid_ts`` per frame group (None: by 1, Qwen2-VL).
        qk_norm: an RMSNorm (norm_eps) over each head's queries and keys before RoPE (Qwen3).
        qk_norm_kind: with qk_norm, "rmsnorm" (Qwen3: one (head_dim,) weight shared by the heads) or
            "layernorm_per_head" (Chameleon: a LayerNorm over each head's queries / keys with that head's own
            weight and bias, keys ``layers.{i}.attn.{q,k}_norm_{weight,bias}`` of shape (heads, head_dim)) or
            "rmsnorm_all_heads" (OLMoE: one RMSNorm over all heads' queries, (heads * head_dim,), and one over
            all keys, (kv_heads * head_dim,); not under tensor parallelism).
        qk_norm_eps: the q/k norms' epsilon (None = norm_eps; Chameleon's LayerNorms use 1e-5).
        swin_norm: normalise each sublayer's output before the residual add (``x + attn_norm(attn(x))``, then
            ``x + mlp_norm(mlp(x))``; Chameleon's ``swin_norm``) instead of its input (pre-norm). Local backend.
        mrope_frames_as_items: Qwen3-VL: each frame group of a video is its own item for positions
            (its placeholder runs are separated by timestamp text).
        num_experts: mixture-of-experts layers with this many routed SwiGLU experts (None: a dense MLP in
            every layer). Which layers: see decoder_sparse_step and mlp_only_layers.
        num_experts_per_tok: experts each token is routed to (top-k).
        moe_ffn_hidden_size: each expert's inner width (None: ffn_hidden_size, Mixtral's layout).
        decoder_sparse_step: layer i is MoE when (i + 1) % decoder_sparse_step == 0 (1: every layer).
        mlp_only_layers: layers that keep the dense MLP (Qwen's rule, with decoder_sparse_step).
        router_scoring: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3) scores of the router logits.
        norm_topk_prob: renormalise the chosen experts' scores to sum to 1 (Mixtral, Qwen3-MoE: true;
            Qwen2-MoE: false).
        shared_expert_ffn_hidden_size: a shared SwiGLU expert of this width beside the routed ones (Qwen2-MoE).
        shared_expert_gate: Qwen2-MoE's sigmoid gate on the shared expert's output.
        router_aux_loss_weight: weight of the load-balancing loss (transformers' load_balancing_loss_func,
            Mixtral's router_aux_loss_coef) added to the training loss.
        router_z_loss_weight: weight of the router z-loss (mean squared logsumexp of the router logits).
        router_bias_update_rate: DeepSeek-V3's aux-loss-free balancing: a per-expert bias added to the scores
            to choose the experts, moved by rate * sign(mean load - load) after each optimizer step
            (None: off).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        ffn_hidden_size: int | None = None,
        norm: Literal["layernorm", "rmsnorm"] = "rmsnorm",
        norm_eps: float = 1e-5,
        position_embedding: Literal["rope", "learned", "none"] = "rope",
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        max_seq_len: int = 2048,
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        activation: ActivationName | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        mlp_bias: bool = False,
        tie_embeddings: bool = False,
        dropout: float = 0.0,
        head_dim: int | None = None,
        backend: Backend = "local",
        mrope_section: list[int] | None = None,
        mrope_interleaved: bool = False,
        mrope_tokens_per_second: float | None = None,
        mrope_frames_as_items: bool = False,
        qk_norm: bool = False,
        qk_norm_kind: Literal["rmsnorm", "layernorm_per_head", "rmsnorm_all_heads"] = "rmsnorm",
        qk_norm_eps: float | None = None,
        swin_norm: bool = False,
        num_experts: int | None = None,
        num_experts_per_tok: int = 2,
        moe_ffn_hidden_size: int | None = None,
        decoder_sparse_step: int = 1,
        mlp_only_layers: list[int] | None = None,
        router_scoring: Literal["softmax", "sigmoid"] = "softmax",
        norm_topk_prob: bool = True,
        shared_expert_ffn_hidden_size: int | None = None,
        shared_expert_gate: bool = False,
        router_aux_loss_weight: float = 0.0,
        router_z_loss_weight: float = 0.0,
        router_bias_update_rate: float | None = None,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("max_seq_len", max_seq_len)):
            if value < 1:
                raise ParamError(name, f"{name} ({value}) must be >= 1")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ParamError("num_heads", f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ParamError("hidden_size",
                                 f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
                                 "(or set head_dim)")
            head_dim = hidden_size // num_heads
        if position_embedding == "rope" and head_dim % 2:
            raise ParamError("head_dim", f"head_dim ({head_dim}) must be even for position_embedding 'rope'")
        if position_embedding not in ("rope", "learned", "none"):
            raise ParamError("position_embedding",
                             f"position_embedding ({position_embedding!r}) must be 'rope', 'learned' or 'none'")
        if rope_scaling is not None and position_embedding != "rope":
            raise ParamError("rope_scaling", f"rope_scaling needs position_embedding 'rope', got {position_embedding!r}")
        if mrope_section is not None and position_embedding != "rope":
            raise ParamError("mrope_section", f"mrope_section needs position_embedding 'rope', "
                             f"not {position_embedding!r}")
        if mrope_interleaved and mrope_section is None:
            raise ParamError("mrope_interleaved", "mrope_interleaved needs mrope_section "
                             "(e.g. [24, 20, 20] for Qwen3-VL's head_dim 128)")
        if qk_norm_kind not in QK_NORM_KINDS:
            raise ParamError("qk_norm_kind", f"qk_norm_kind ({qk_norm_kind!r}) must be one of "
                             f"{', '.join(map(repr, QK_NORM_KINDS))}")
        if (qk_norm_kind != "rmsnorm" or qk_norm_eps is not None) and not qk_norm:
            raise ParamError("qk_norm_kind" if qk_norm_kind != "rmsnorm" else "qk_norm_eps",
                             "needs qk_norm: true", hint="set qk_norm: true (or leave the q/k norm options out)")
        if qk_norm_eps is not None and not qk_norm_eps > 0:
            raise ParamError("qk_norm_eps", f"qk_norm_eps ({qk_norm_eps}) must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise ParamError("dropout", f"dropout ({dropout}) must be in [0, 1)")
        activation = activation or ("silu" if mlp == "swiglu" else "gelu")
        get_activation(activation)  # fail early on a bad name
        self.backend = check_backend(backend, activation=activation, gated=mlp == "swiglu")

        self.vocab_size, self.hidden_size, self.max_seq_len = vocab_size, hidden_size, max_seq_len
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = num_layers, num_heads, num_kv_heads, head_dim
        self.position_embedding_kind = position_embedding
        self.tie_embeddings = tie_embeddings

        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        if position_embedding == "learned":
            self.position_embedding = nn.Embedding(max_seq_len, hidden_size)
        self.mrope_section = None if mrope_section is None else list(mrope_section)
        if (mrope_tokens_per_second is not None or mrope_frames_as_items) and mrope_section is None:
            raise ParamError("mrope_tokens_per_second" if mrope_tokens_per_second is not None
                             else "mrope_frames_as_items", "needs mrope_section (M-RoPE)")
        self.mrope_tokens_per_second = mrope_tokens_per_second
        self.mrope_frames_as_items = mrope_frames_as_items
        self.rope = (RotaryEmbedding(head_dim, rope_theta, mrope_section, mrope_interleaved, rope_scaling)
                     if position_embedding == "rope" else None)
        self.embed_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        ffn_hidden_size = ffn_hidden_size or 4 * hidden_size
        moe_layers = self._moe_layers(num_layers, num_experts, num_experts_per_tok, decoder_sparse_step,
                                      mlp_only_layers, mlp, mlp_bias, router_bias_update_rate)
        self.moe_layer_ids = moe_layers
        self.router_aux_loss_weight = float(router_aux_loss_weight)
        self.router_z_loss_weight = float(router_z_loss_weight)
        self.router_bias_update_rate = router_bias_update_rate

        def moe() -> MoE:
            return MoE(hidden_size, moe_ffn_hidden_size or ffn_hidden_size, num_experts, num_experts_per_tok,
                       scoring=router_scoring, norm_topk_prob=norm_topk_prob, activation=activation,
                       shared_ffn_hidden_size=shared_expert_ffn_hidden_size, shared_gate=shared_expert_gate,
                       bias_balancing=router_bias_update_rate is not None)

        self.layers = nn.ModuleList(
            TransformerBlock(
                hidden_size, num_heads, ffn_hidden_size,
                num_kv_heads=num_kv_heads, head_dim=head_dim, norm=norm, norm_eps=norm_eps,
                mlp=mlp, activation=activation, qkv_bias=attention_bias, out_bias=out_bias,
                mlp_bias=mlp_bias, dropout=dropout, layer_idx=i, backend=self.backend, qk_norm=qk_norm,
                qk_norm_kind=qk_norm_kind, qk_norm_eps=qk_norm_eps, swin_norm=swin_norm,
                mlp_module=moe() if i in moe_layers else None,
            )
            for i in range(num_layers)
        )
        self.norm = build_norm(norm, hidden_size, norm_eps)
        self.lm_head = None if tie_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)
        self.init_weights()

    @staticmethod
    def _moe_layers(num_layers, num_experts, top_k, sparse_step, mlp_only_layers, mlp, mlp_bias,
                    bias_rate) -> tuple[int, ...]:
        """The indices of the mixture-of-experts layers (Qwen's rule), the MoE parameters checked."""
        if num_experts is None:
            return ()
        if num_experts < 1:
            raise ParamError("num_experts", f"num_experts ({num_experts}) must be >= 1 (or null for dense layers)")
        if not 1 <= top_k <= num_experts:
            raise ParamError("num_experts_per_tok", f"num_experts_per_tok ({top_k}) must be between 1 and "
                             f"num_experts ({num_experts})")
        if sparse_step < 1:
            raise ParamError("decoder_sparse_step", f"decoder_sparse_step ({sparse_step}) must be >= 1")
        dense = list(mlp_only_layers or [])
        bad = [i for i in dense if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise ParamError("mlp_only_layers", f"mlp_only_layers ({dense}) must be layers of the "
                             f"{num_layers}-layer model: {bad[0]} is not in [0, {num_layers})")
        if mlp != "swiglu" or mlp_bias:
            raise ParamError("mlp" if mlp != "swiglu" else "mlp_bias",
                             f"mixture-of-experts layers are SwiGLU without biases; got mlp {mlp!r}, "
                             f"mlp_bias {mlp_bias}", hint="set mlp: swiglu and mlp_bias: false")
        if bias_rate is not None and not (bias_rate >= 0 and math.isfinite(bias_rate)):
            raise ParamError("router_bias_update_rate", f"router_bias_update_rate ({bias_rate}) must be >= 0")
        return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % sparse_step == 0)

    def moe_modules(self) -> list[MoE]:
        """The MoE feed-forwards, layer by layer."""
        return [m for m in (layer.mlp for layer in self.layers) if isinstance(m, MoE)]

    def router_losses(self, token_mask: torch.Tensor | None = None) -> RouterLosses | None:
        """The routers' losses of the last forward (None for a dense model): see
        :func:`mimo_spec.components.moe.router_losses`; ``loss`` holds them weighted by
        router_aux_loss_weight and router_z_loss_weight."""
        return router_losses(self.moe_modules(), self.router_aux_loss_weight, self.router_z_loss_weight, token_mask)

    def update_router_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing after an optimizer step: ``counts`` (MoE layers, E) tokens per expert over
        the step (no-op unless router_bias_update_rate is set)."""
        if self.router_bias_update_rate is None:
            return
        for m, c in zip(self.moe_modules(), counts):
            m.update_bias(c, self.router_bias_update_rate)

    def init_weights(self) -> None:
        """Random init for training from scratch (checkpoints overwrite it)."""
        init_transformer_weights(self, num_layers=self.num_layers)

    # ------------------------------------------------------------------ API

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, S) int -> (B, S, H). Token embedding only (positions are added in forward)."""
        return self.token_embedding(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, H) -> logits (B, S, V); a vocabulary-sharded head (tensor parallelism) returns them
        sharded on V (a DTensor)."""
        if self.lm_head is None:
            return _tied_logits(hidden, self.token_embedding.weight)
        return self.lm_head(hidden)  # a module call, so FSDP/TP hooks see it

    def fusable_head_weight(self) -> torch.Tensor | None:
        """The head's (V, H) weight when ``logits(h)`` is exactly ``h @ weight.T`` on one device (no bias, hooks,
        adapters or sharding): then a loss may run the head itself, a chunk at a time
        (:func:`mimo_spec.loss.linear_cross_entropy`). None otherwise."""
        head = self.lm_head if self.lm_head is not None else self.token_embedding
        if head._forward_hooks or head._forward_pre_hooks or any(True for _ in head.children()):
            return None
        if getattr(head, "bias", None) is not None:
            return None
        weight = head.weight
        return None if hasattr(weight, "device_mesh") or type(weight) not in (torch.Tensor, nn.Parameter) else weight

    def new_kv_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for up to ``max_len`` positions; pass it to every ``forward`` call.

        ``dtype`` must be the dtype attention computes in (default: the weights'; pass
        torch.bfloat16 when decoding under bf16 autocast with fp32 weights).
        """
        if dtype is None:
            dtype = self.token_embedding.weight.dtype
        if device is None:
            device = self.token_embedding.weight.device
        return KVCache(self.num_layers, batch_size, max_len, self.num_kv_heads, self.head_dim, device, dtype)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_additions: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, S, H) -> hidden states (B, S, H) after the final norm.

        position_ids (B, S): default arange, offset by the cache length. With ``mrope_section``
            also (3, B, S): temporal, height and width positions (M-RoPE); with a KV cache the
            positions of new text tokens are (B, S) ones (see ``mimo_spec.models.mrope``).
        attention_mask (B, S): 1 = real token, 0 = padding (masks keys).
        document_ids (B, S): packed sequences; attention never crosses documents.
        kv_cache: from :meth:`new_kv_cache`; filled and advanced by this call.
        layer_additions: {layer index: (B, S, H)} added to the hidden states after that layer
            (DeepStack: a modality's deeper features at its placeholders, zeros elsewhere).

        Any mask forces SDPA's memory-efficient kernel instead of flash. An all-ones
        mask is dropped (one host sync in eager mode), so pass ``attention_mask=None``
        when there is no padding, and for right-padded training batches (exact for
        every real token: causal attention never looks right).
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.hidden_size:
            raise InputError(f"expected shape (B, S, {self.hidden_size}), got {tuple(inputs_embeds.shape)}",
                             path="inputs_embeds")
        B, S, _ = inputs_embeds.shape
        if position_ids is not None:
            self._check_position_ids(position_ids, B, S)
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            # No padding after all: drop the mask to keep the flash kernel (as HF does).
            # Costs one host sync in eager mode; callers that know avoid it by passing None.
            attention_mask = None
        past = 0 if kv_cache is None else kv_cache.length
        if self.position_embedding_kind == "learned" and past + S > self.max_seq_len:
            raise InputError(f"sequence length {past + S} exceeds max_seq_len {self.max_seq_len}",
                             path="inputs_embeds", hint="truncate the input or raise max_seq_len")
        if kv_cache is not None:
            if past + S > kv_cache.max_len:
                raise InputError(f"sequence length {past + S} exceeds the KV cache size {kv_cache.max_len}",
                                 path="kv_cache", hint="create the cache with a larger max_len")
            if document_ids is not None:
                raise InputError("document_ids (sequence packing) cannot be combined with a KV cache",
                                 path="document_ids")

        if position_ids is None and self.position_embedding_kind != "none":
            position_ids = torch.arange(past, past + S, device=inputs_embeds.device)[None].expand(B, S)
        x = self.add_positions(inputs_embeds, position_ids)
        rope, attn_mask, is_causal = self.attention_inputs(x, position_ids, attention_mask, document_ids, kv_cache)
        if layer_additions:
            bad = [i for i in layer_additions if not 0 <= i < len(self.layers)]
            if bad:
                raise InputError(f"layer {bad[0]} is not a layer of this {len(self.layers)}-layer model",
                                 path="layer_additions", hint="check the modality's deepstack_lm_layers")
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache)
            if layer_additions and i in layer_additions:
                x = x + layer_additions[i].to(x.dtype)
        if kv_cache is not None:
            kv_cache.advance(S)
        return self.norm(x)

    def _check_position_ids(self, position_ids: torch.Tensor, B: int, S: int) -> None:
        """Shapes only (no host sync). Without M-RoPE only 3-D positions are refused (any other shape
        behaves as it always has); with it, (B|1, S) or (3, B|1, S)."""
        if self.mrope_section is None:
            if position_ids.dim() == 3:
                raise InputError(f"expected shape ({B}, {S}), got {tuple(position_ids.shape)}", path="position_ids",
                                 hint="3-D (temporal, height, width) positions need the LM's mrope_section")
            return
        if position_ids.dim() == 3:
            ok = position_ids.shape[0] == 3 and position_ids.shape[1] in (1, B) and position_ids.shape[2] == S
        else:
            ok = position_ids.dim() == 2 and position_ids.shape[0] in (1, B) and position_ids.shape[1] == S
        if not ok:
            raise InputError(f"expected shape ({B}, {S}) or (3, {B}, {S}), got {tuple(position_ids.shape)}",
                             path="position_ids", hint="M-RoPE positions are (temporal, height, width) x (B, S)")

    # The two halves of ``forward`` before the layers, public so that pipeline stages (which
    # run a slice of ``layers`` each) compute exactly what one process computes.
    def add_positions(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Learned position embeddings (when configured) and embedding dropout: (B, S, H) -> (B, S, H)."""
        x = inputs_embeds
        if self.position_embedding_kind == "learned":
            x = x + self.position_embedding(position_ids)
        return self.embed_dropout(x)

    def attention_inputs(self, x: torch.Tensor, position_ids: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                         kv_cache: KVCache | None = None):
        """(rope, attn_mask, is_causal) every layer takes, from shapes and Python state only (compile-friendly)."""
        S = x.shape[1]
        past = 0 if kv_cache is None else kv_cache.length
        rope = self.rope(position_ids, x.dtype) if self.rope is not None else None
        key_mask = attention_mask
        if kv_cache is not None:
            if attention_mask is not None:
                kv_cache.key_mask[:, past : past + S] = attention_mask.to(torch.bool)
                kv_cache.has_padding = True
            key_mask = kv_cache.key_mask[:, : past + S] if kv_cache.has_padding else None
        attn_mask = None
        if key_mask is not None or document_ids is not None or (past > 0 and S > 1):
            attn_mask = build_attention_mask(S, past + S, device=x.device, offset=past,
                                             key_mask=key_mask, document_ids=document_ids)
        is_causal = attn_mask is None and past == 0  # one new token after a cache sees every key
        return rope, attn_mask, is_causal


def _tied_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (..., H) @ weight (V, H).T for a head tied to the token embedding. A weight sharded on the
    vocabulary (a DTensor: tensor parallelism shards the embedding by rows) takes the hidden states as
    replicated, so each rank computes its vocabulary slice of the logits, and both uses of the one
    parameter add their gradients to it."""
    mesh = getattr(weight, "device_mesh", None)
    if mesh is not None and getattr(hidden, "device_mesh", None) is None:
        from torch.distributed.tensor import DTensor, Replicate

        hidden = DTensor.from_local(hidden, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return F.linear(hidden, weight)
