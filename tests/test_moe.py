"""Mixture-of-experts feed-forward (mimo_spec/components/moe.py) and MoE language models: numerics against
transformers' Mixtral / Qwen2-MoE / Qwen3-MoE (the sparse blocks and whole causal LMs, same weights), the
router losses in the training loss, aux-loss-free bias balancing, bad parameters, and the summary."""

from __future__ import annotations

import pytest
import torch

from mimo_spec.components.language.gpt import GPT
from mimo_spec.components.moe import MoE, active_parameters
from mimo_spec.errors import ParamError
from mimo_spec.models.mimo import MimoModel

TOL = 1e-5

transformers = pytest.importorskip("transformers")


def _maxerr(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def _perturb(module: torch.nn.Module, std: float = 0.2) -> None:
    """Random values in every parameter (default inits hide bugs: unit norms, zero routers)."""
    for name, p in module.named_parameters():
        if "norm" in name or name.endswith("layernorm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        else:
            p.normal_(0.0, std)


@torch.no_grad()
def _copy_block(moe: MoE, block) -> None:
    moe.router.weight.copy_(block.gate.weight)
    moe.experts.gate_up.copy_(block.experts.gate_up_proj)
    moe.experts.down.copy_(block.experts.down_proj)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        moe.shared.fc1.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        moe.shared.fc2.weight.copy_(shared.down_proj.weight)
        moe.shared_gate.weight.copy_(block.shared_expert_gate.weight)


@torch.no_grad()
def _copy_lm(gpt: GPT, hf) -> None:
    """transformers' Mixtral / Qwen2-MoE / Qwen3-MoE causal LM weights into ``gpt``, by hand."""
    m = hf.model
    gpt.token_embedding.weight.copy_(m.embed_tokens.weight)
    gpt.lm_head.weight.copy_(hf.lm_head.weight)
    gpt.norm.weight.copy_(m.norm.weight)
    for ours, theirs in zip(gpt.layers, m.layers):
        a = theirs.self_attn
        ours.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        if a.q_proj.bias is not None:
            ours.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ours.attn.out.weight.copy_(a.o_proj.weight)
        if getattr(a, "q_norm", None) is not None:
            ours.attn.q_norm.weight.copy_(a.q_norm.weight)
            ours.attn.k_norm.weight.copy_(a.k_norm.weight)
        ours.attn_norm.weight.copy_(theirs.input_layernorm.weight)
        ours.mlp_norm.weight.copy_(theirs.post_attention_layernorm.weight)
        if isinstance(ours.mlp, MoE):
            _copy_block(ours.mlp, theirs.mlp)
        else:
            ours.mlp.fc1.weight.copy_(torch.cat([theirs.mlp.gate_proj.weight, theirs.mlp.up_proj.weight]))
            ours.mlp.fc2.weight.copy_(theirs.mlp.down_proj.weight)


def _blocks():
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    H = 32
    return [
        ("mixtral", MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=24, num_local_experts=6,
                                                        num_experts_per_tok=2)),
         MoE(H, 24, 6, 2)),
        ("qwen2_moe", Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=24, num_experts=6,
                                                            num_experts_per_tok=3, norm_topk_prob=False,
                                                            shared_expert_intermediate_size=40)),
         MoE(H, 24, 6, 3, norm_topk_prob=False, shared_ffn_hidden_size=40, shared_gate=True)),
        ("qwen3_moe", Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=24, num_experts=8,
                                                            num_experts_per_tok=3, norm_topk_prob=True)),
         MoE(H, 24, 8, 3)),
    ]


def test_moe_block_equals_transformers_every_dispatch():
    """Each sparse block of transformers and our MoE with its weights: the same outputs and router logits,
    through the grouped GEMM and the per-expert loop; gradients of both paths agree; the state-dict keys."""
    torch.manual_seed(0)
    for name, block, moe in _blocks():
        _perturb(block, 0.3)
        _copy_block(moe, block)
        x = torch.randn(2, 7, 32)
        with torch.no_grad():
            ref = block(x)
            logits = block.gate(x.reshape(-1, 32))[0]
        grads = {}
        for how in ("grouped_mm", "loop"):
            moe.experts.dispatch = how
            xg = x.clone().requires_grad_()
            out = moe(xg)
            assert _maxerr(out, ref) <= TOL, (name, how)
            assert _maxerr(moe.routing.logits, logits) <= TOL, (name, how)
            counts = torch.bincount(moe.routing.top_k.reshape(-1), minlength=moe.num_experts)
            assert moe.routing.counts.tolist() == counts.tolist() and int(counts.sum()) == 14 * moe.top_k
            moe.zero_grad()
            out.sum().backward()  # a stride-0 gradient: grouped_mm's backward needs it contiguous
            grads[how] = [xg.grad.clone(), moe.experts.gate_up.grad.clone(), moe.experts.down.grad.clone(),
                          moe.router.weight.grad.clone()]
        for a, b in zip(grads["grouped_mm"], grads["loop"]):
            assert _maxerr(a, b) <= 1e-5, name
    keys = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert keys == {"router.weight": (8, 32), "experts.gate_up": (8, 48, 32), "experts.down": (8, 32, 24)}
    keys = set(_blocks()[1][2].state_dict())
    assert keys == {"router.weight", "experts.gate_up", "experts.down", "shared.fc1.weight", "shared.fc2.weight",
                    "shared_gate.weight"}


def _lm_pair(kind: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, \
        Qwen3MoeForCausalLM

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, router_aux_loss_coef=0.05, output_router_logits=True,
                  attn_implementation="eager", tie_word_embeddings=False)
    ours = dict(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts_per_tok=2,
                router_aux_loss_weight=0.05, router_z_loss_weight=0.0)
    if kind == "mixtral":
        hf = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=40, num_local_experts=4,
                                              rope_theta=1e4, rms_norm_eps=1e-5))
        gpt = GPT(**ours, ffn_hidden_size=40, num_experts=4, norm_eps=1e-5, rope_theta=1e4)
    elif kind == "qwen2_moe":  # dense layer 1 (mlp_only_layers), shared expert with its gate, no renormalising
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                                shared_expert_intermediate_size=40, num_experts=5, mlp_only_layers=[1],
                                                decoder_sparse_step=1, norm_topk_prob=False, rms_norm_eps=1e-6,
                                                rope_theta=1e6, qkv_bias=True))
        gpt = GPT(**ours, ffn_hidden_size=48, moe_ffn_hidden_size=24, num_experts=5, mlp_only_layers=[1],
                  norm_topk_prob=False, shared_expert_ffn_hidden_size=40, shared_expert_gate=True,
                  attention_bias=True, attention_out_bias=False, norm_eps=1e-6, rope_theta=1e6)
    else:  # every second layer MoE (decoder_sparse_step 2), qk-norm, head_dim apart from hidden / heads
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                                num_experts=6, decoder_sparse_step=2, norm_topk_prob=True,
                                                head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6))
        gpt = GPT(**ours, ffn_hidden_size=48, moe_ffn_hidden_size=24, num_experts=6, decoder_sparse_step=2,
                  head_dim=16, qk_norm=True, norm_eps=1e-6, rope_theta=1e6)
    return hf, gpt


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_lm_equals_transformers(kind):
    """Whole causal LMs with the same weights: logits, the load-balancing loss (also over padded batches,
    with the attention mask) and the training loss (LM loss + coefficient x aux loss) equal transformers'."""
    torch.manual_seed(1)
    hf, gpt = _lm_pair(kind)
    expect_moe = {"mixtral": (0, 1, 2), "qwen2_moe": (0, 2), "qwen3_moe": (1,)}[kind]
    assert gpt.moe_layer_ids == expect_moe
    assert [i for i, layer in enumerate(hf.model.layers) if "Sparse" in type(layer.mlp).__name__] == list(expect_moe)
    _perturb(hf, 0.15)
    _copy_lm(gpt, hf)
    model = MimoModel(gpt).eval()
    hf.eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = model(ids, labels=ids)
    assert _maxerr(out.logits, ref.logits) <= TOL
    assert abs(float(out.router_aux_loss) - float(ref.aux_loss)) <= TOL
    assert abs(float(out.lm_loss) + 0.05 * float(ref.aux_loss) - float(ref.loss)) <= TOL
    assert abs(float(out.loss) - float(ref.loss)) <= TOL
    counts = out.router.counts
    assert counts.shape == (len(expect_moe), gpt.moe_modules()[0].num_experts)
    assert counts.sum(1).tolist() == [18.0 * 2] * len(expect_moe)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: masked out of the aux loss as in transformers
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask)
        out = model(ids, attention_mask=mask, labels=ids)
    assert _maxerr(out.logits[0], ref.logits[0]) <= TOL
    assert abs(float(out.router_aux_loss) - float(ref.aux_loss)) <= TOL


def test_router_losses_in_training_and_bias_balancing():
    """The training loss adds the weighted aux and z losses (with gradients into the router); sigmoid
    scoring; bias balancing: the bias only chooses the experts (outputs use the unbiased scores) and
    moves against the load; the buffer is in the state dict."""
    torch.manual_seed(2)
    gpt = GPT(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_experts=4, num_experts_per_tok=2,
              router_scoring="sigmoid", router_aux_loss_weight=0.1, router_z_loss_weight=0.01,
              router_bias_update_rate=0.5, shared_expert_ffn_hidden_size=16)
    _perturb(gpt, 0.1)
    model = MimoModel(gpt).train()
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    r = out.router
    # the z-loss: mean over both layers' tokens of logsumexp(logits)^2
    lse = torch.cat([torch.logsumexp(m.routing.logits, -1) for m in gpt.moe_modules()])
    assert abs(float(r.z_loss) - float(lse.square().mean())) <= 1e-5
    # aux loss with normalised sigmoid scores: E * sum(fraction routed * mean probability)
    probs = torch.cat([m.routing.scores / m.routing.scores.sum(-1, keepdim=True) for m in gpt.moe_modules()])
    frac = r.counts.sum(0) / probs.shape[0]
    assert abs(float(r.aux_loss) - float(4 * (frac * probs.mean(0)).sum())) <= 1e-5
    assert abs(float(out.loss) - float(out.lm_loss + 0.1 * r.aux_loss + 0.01 * r.z_loss)) <= 1e-5
    import copy

    from mimo_spec.parallel.parallelize import apply_activation_checkpointing

    recomputed = copy.deepcopy(model)
    apply_activation_checkpointing(recomputed, {"mode": "full"})  # the routers' losses still reach the routers
    recomputed(ids, labels=ids).loss.backward()
    out.loss.backward()
    assert all(_maxerr(p.grad, q.grad) <= 1e-6 for p, q in zip(model.parameters(), recomputed.parameters()))
    router_grad = gpt.layers[0].mlp.router.weight.grad
    gpt.zero_grad()
    model(ids, labels=ids).lm_loss.backward()  # the aux terms change the router's gradient
    assert _maxerr(router_grad, gpt.layers[0].mlp.router.weight.grad) > 1e-6

    moe = gpt.layers[0].mlp
    assert "layers.0.mlp.router_bias" in gpt.state_dict()
    x = torch.randn(10, 32)
    with torch.no_grad():
        plain = moe(x)
        moe.router_bias.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))  # forces experts 0 and 1
        forced = moe(x)
    assert (moe.routing.top_k.sort(-1).values == torch.tensor([0, 1])).all()
    scores = moe.routing.scores  # unbiased: the weights come from the scores, not the bias
    w = scores[:, :2] / scores[:, :2].sum(-1, keepdim=True)
    e = moe.experts
    h = torch.einsum("nh,efh->nef", x, e.gate_up[:2])
    y = torch.einsum("nef,ehf->neh", torch.nn.functional.silu(h[..., :e.ffn_hidden_size])
                     * h[..., e.ffn_hidden_size:], e.down[:2])
    expect = (y * w[..., None]).sum(1) + moe.shared(x)
    assert _maxerr(forced, expect) <= 1e-5 and _maxerr(forced, plain) > 1e-4
    moe.router_bias.zero_()
    gpt.update_router_bias(torch.tensor([[10.0, 2.0, 5.0, 3.0], [1.0, 1.0, 1.0, 1.0]]))
    assert moe.router_bias.tolist() == [-0.5, 0.5, 0.0, 0.5]
    assert gpt.layers[1].mlp.router_bias.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_moe_bad_parameters_and_summary():
    """ParamErrors naming the parameter and both numbers; summary shows total and active parameters."""
    base = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2)
    with pytest.raises(ParamError, match=r"num_experts_per_tok \(5\).*num_experts \(4\)") as e:
        GPT(**base, num_experts=4, num_experts_per_tok=5)
    assert e.value.param == ("num_experts_per_tok")
    with pytest.raises(ParamError, match=r"num_experts \(0\)"):
        GPT(**base, num_experts=0)
    with pytest.raises(ParamError, match=r"mlp_only_layers \(\[0, 2\]\).*2-layer.*2 is not in \[0, 2\)") as e:
        GPT(**base, num_experts=4, mlp_only_layers=[0, 2])
    assert e.value.param == ("mlp_only_layers")
    with pytest.raises(ParamError, match="shared_expert_gate"):
        GPT(**base, num_experts=4, shared_expert_gate=True)

    from mimo_spec.summary import render_summary

    gpt = GPT(**base, ffn_hidden_size=8, num_experts=4, num_experts_per_tok=1, shared_expert_ffn_hidden_size=4)
    total = sum(p.numel() for p in gpt.parameters())
    experts = 2 * 4 * 3 * 16 * 8  # 2 layers x 4 experts x (gate, up, down) 16 x 8
    assert active_parameters(gpt) == (total, total - experts * 3 // 4)
    text = render_summary(MimoModel(gpt))
    assert f"active per token: {total - experts * 3 // 4:,}" in text
    assert active_parameters(GPT(**base)) is None and "active" not in render_summary(MimoModel(GPT(**base)))


def test_moe_training_logs_router_numbers_and_moves_biases(tmp_path):
    """A training run of an MoE LM: metrics.csv holds the router losses and expert loads of every step, the
    log line shows them, the loss falls, and the aux-loss-free biases moved (saved in the checkpoint)."""
    from mimo_spec.config import compose_config
    from mimo_spec.train.checkpoint import list_checkpoints
    from mimo_spec.train.loop import MOE_FIELDS, train
    from mimo_spec.train.metrics import read_metrics
    from mimo_spec.train.progress import log_line

    c = compose_config(["model=tiny", "+model.params.num_experts=4", "+model.params.num_experts_per_tok=2",
                        "+model.params.moe_ffn_hidden_size=32", "+model.params.router_aux_loss_weight=0.01",
                        "+model.params.router_z_loss_weight=0.001", "+model.params.router_bias_update_rate=0.01",
                        "data.num_samples=64", "data.eval_samples=0", "train.steps=8", "train.log_every=1000",
                        "train.batch_size=4", "train.grad_accum=2", "train.checkpoint.every=8"])
    result = train(c, tmp_path)
    assert result["status"] == "completed"
    rows = read_metrics(tmp_path / "metrics.csv")
    assert len(rows) == 8 and all(f in rows[0] for f in MOE_FIELDS)
    assert list(rows[0]).index("router_aux_loss") == list(rows[0]).index("skipped_samples") + 1
    for r in rows:
        assert 2.0 * 0.5 < float(r["router_aux_loss"]) < 2.0 * 4  # k when balanced, E * k at worst
        assert float(r["router_z_loss"]) > 0
        assert float(r["expert_load_max"]) >= 1.0 >= float(r["expert_load_min"]) >= 0.0
    first, last = sum(float(r["loss"]) for r in rows[:3]), sum(float(r["loss"]) for r in rows[-3:])
    assert last < first
    line = log_line({k: (float(v) if k != "step" else int(v)) for k, v in rows[-1].items() if v != ""}, 8)
    assert f"aux {float(rows[-1]['router_aux_loss']):.4f}  load " in line
    from safetensors.torch import load_file

    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = load_file(ckpt / "model.safetensors")
    biases = [v for k, v in state.items() if k.endswith("mlp.router_bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)
    assert all(b.abs().max() <= 0.01 * 8 + 1e-6 for b in biases)  # rate x steps at most


def test_the_training_step_routes_no_padding_into_the_aux_loss():
    """A right-padded batch through the training step's loss: the router losses count the real tokens only
    (as transformers does with the attention mask), while attention runs unmasked (right padding)."""
    from mimo_spec.train.step import _loss_of

    torch.manual_seed(3)
    gpt = GPT(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_experts=4, num_experts_per_tok=2,
              router_aux_loss_weight=0.1, router_z_loss_weight=0.01)
    _perturb(gpt, 0.1)
    model = MimoModel(gpt).train()
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    _, losses = _loss_of(model, {"input_ids": ids, "labels": labels, "attention_mask": mask}, "cpu", "fp32")
    masked = model(ids, labels=labels, attention_mask=mask)
    unmasked = model(ids, labels=labels)
    torch.testing.assert_close(losses.router_aux_loss, masked.router_aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses.router_z_loss, masked.router_z_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses.lm_loss, unmasked.lm_loss, rtol=1e-6, atol=1e-7)
    assert abs(float(unmasked.router_z_loss) - float(masked.router_z_loss)) > 1e-4  # the padding would count


def test_grouped_gemm_only_where_torchs_kernel_takes_the_products(monkeypatch):
    """The "auto" dispatch picks torch's grouped GEMM only where torch takes the four products (two forward,
    the two weight gradients) on that device: on CUDA (checked by torch's own shape rules on fake CUDA
    tensors, no GPU needed) bf16 with 16-byte aligned rows, never fp32 or fp16; toy widths that run on the
    CPU go through the loop there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mimo_spec.components.moe import _grouped_mm, _grouped_mm_runs

    if _grouped_mm is None:
        pytest.skip("this torch has no grouped GEMM")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def torch_takes(dtype, hidden, ffn):
        with FakeTensorMode():
            x = torch.empty(10, hidden, dtype=dtype, device="cuda")
            w1 = torch.empty(2, 2 * ffn, hidden, dtype=dtype, device="cuda")
            w2 = torch.empty(2, hidden, ffn, dtype=dtype, device="cuda")
            a = torch.empty(10, ffn, dtype=dtype, device="cuda")
            offs = torch.empty(2, dtype=torch.int32, device="cuda")
            try:
                _grouped_mm(x, w1.transpose(1, 2), offs=offs)
                _grouped_mm(a, w2.transpose(1, 2), offs=offs)
                _grouped_mm(x.t(), a, offs=offs)  # the weight gradients' (K-grouped) products
                _grouped_mm(torch.empty(10, 2 * ffn, dtype=dtype, device="cuda").t(), x, offs=offs)
            except RuntimeError:
                return False
        return True

    cuda = torch.device("cuda")
    seen = set()
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for hidden, ffn in ((36, 20), (40, 24), (32, 12), (64, 96), (30, 16)):
            ours = _grouped_mm_runs(cuda, dtype, (hidden, ffn))
            assert ours == torch_takes(dtype, hidden, ffn), (dtype, hidden, ffn)
            seen.add(ours)
    assert seen == {True, False}  # both answers occur in the grid
    # the CPU runs every dtype eagerly
    assert _grouped_mm_runs(torch.device("cpu"), torch.float32, (36, 20))


def test_compiled_fp32_moe_equals_eager():
    """torch.compile refuses fp32 grouped GEMMs (its shape rules take bf16 only), so a compiled fp32 MoE
    takes the loop dispatch: the same loss and gradients as eager (it failed to compile before)."""
    torch.manual_seed(0)
    model = MimoModel(GPT(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=48, num_experts=4, num_experts_per_tok=2, max_seq_len=32))
    ids = torch.randint(0, 64, (2, 16))
    ref = model(ids, labels=ids).loss
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()])
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(ids, labels=ids).loss
    grads = torch.autograd.grad(out, [p for p in model.parameters()])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
