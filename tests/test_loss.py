"""The one loss (mimo_spec/loss.py) against independent references, and every path using it: the model's
``forward(labels=)`` convenience, the last pipeline stage (microbatches, padding, global token count),
and the TP plans kept in a registry outside the components."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from mimo_spec.builders import build_model
from mimo_spec.config import compose_config


def reference_lm_loss(logits, labels, loss_mask=None, document_ids=None) -> float:
    """Token by token, in float64: -log p(label[t+1] | logits[t]) over the counted positions."""
    logp = torch.log_softmax(logits.double(), -1)
    total, count = 0.0, 0.0
    b, s = labels.shape
    for i in range(b):
        for t in range(s - 1):
            y = int(labels[i, t + 1])
            if y == -100:
                continue
            w = 1.0 if loss_mask is None else float(loss_mask[i, t + 1])
            if document_ids is not None and document_ids[i, t + 1] != document_ids[i, t]:
                w = 0.0
            total += -float(logp[i, t, y]) * w
            count += w
    return total / max(count, 1.0)


@pytest.fixture(scope="module")
def model():
    return build_model(compose_config([]), seed=0)


def packed(model, seed=1):
    batch = model.example_inputs(batch_size=4, text_tokens=12, seed=seed)
    b, s = batch["input_ids"].shape
    batch["labels"][:, -2:] = -100
    batch["loss_mask"] = (torch.arange(s) % 5 != 0).long().expand(b, s).clone()
    batch["document_ids"] = (torch.arange(s) >= s // 2).long().expand(b, s).clone()
    return batch


def test_causal_lm_loss_against_a_token_by_token_reference(model):
    from mimo_spec.loss import causal_lm_loss

    batch = packed(model)
    with torch.no_grad():
        out = model(**batch)
    ref = reference_lm_loss(out.logits, batch["labels"], batch["loss_mask"], batch["document_ids"])
    assert float(out.lm_loss) == pytest.approx(ref, rel=1e-5)
    got = causal_lm_loss(out.logits, batch["labels"], batch["loss_mask"], batch["document_ids"])
    assert float(got) == pytest.approx(ref, rel=1e-5)
    # the global normalisation: the sum over counted tokens divided by the given count
    weight = float((batch["loss_mask"][:, 1:] * (batch["labels"][:, 1:] != -100)
                    * (batch["document_ids"][:, 1:] == batch["document_ids"][:, :-1])).sum())
    summed = causal_lm_loss(out.logits, batch["labels"], batch["loss_mask"], batch["document_ids"], num_tokens=1)
    assert float(summed) == pytest.approx(ref * weight, rel=1e-5)


def test_logits_only_at_counted_positions_give_the_same_loss_and_gradients(model):
    """forward(logits_at=counted_positions(...)), as the training step calls it: the LM head runs at the
    positions whose next-token label counts (not at placeholders, masked or padded positions, document
    ends); loss and every gradient equal the full-logits path and the token-by-token reference."""
    from mimo_spec.loss import counted_positions

    batch = packed(model)
    b, s = batch["input_ids"].shape
    at = counted_positions(batch["labels"], batch["loss_mask"], batch["document_ids"])
    expected = [i * s + t for i in range(b) for t in range(s - 1)
                if batch["labels"][i, t + 1] != -100 and batch["loss_mask"][i, t + 1]
                and batch["document_ids"][i, t + 1] == batch["document_ids"][i, t]]
    assert at.tolist() == expected and 0 < len(expected) < b * s // 2
    grads, losses = [], []
    # full logits; logits at the counted positions; and the default in training with labels: the head run by
    # the loss itself, chunk by chunk (linear_cross_entropy, no logits returned)
    for kwargs in ({}, {"logits_at": at, "skip_logits": False}, {"logits_at": at}):
        model.zero_grad()
        out = model(**batch, **kwargs)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        losses.append(float(out.lm_loss))
        if kwargs.get("skip_logits") is False:
            assert out.logits.shape == (len(expected), model.language_model.vocab_size)
            assert torch.equal(out.logits_at, at)
            kept = out.logits.detach()
        elif kwargs:
            assert out.logits is None and out.head_hidden.shape[0] == len(expected)
            torch.testing.assert_close(out.full_logits().detach(), kept)
        else:
            full = out.logits.detach()
    ref = reference_lm_loss(full, batch["labels"], batch["loss_mask"], batch["document_ids"])
    assert losses == pytest.approx([ref] * 3, rel=1e-5)
    for got in grads[1:]:
        assert got.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(got[name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    model.zero_grad()
    with pytest.raises(Exception, match=r"logits_at: expected flat int64 positions"):
        model(**batch, logits_at=at.int())


def test_output_modality_losses_come_from_the_loss_module():
    """forward(labels=, output_targets=) and mimo_loss on the model's outputs give the same numbers, and
    the output loss is the modality's own loss function on its decoded items."""
    from mimo_spec.loss import mimo_loss

    model = build_model(compose_config(["modality=[vision_clip,image_gen]"]), seed=0)
    batch = model.example_inputs(batch_size=2, seed=3)
    with torch.no_grad():
        out = model(**batch)
        bare = model(batch["input_ids"], batch["modality_inputs"], output_targets=batch["output_targets"])
    assert bare.loss is not None and bare.lm_loss is None  # no labels: the output modality's loss alone
    losses = mimo_loss(model.modalities, out, labels=batch["labels"], output_targets=batch["output_targets"])
    mod = model.modalities["image_out"]  # a discrete modality: cross entropy of its code logits on the codes
    codes = mod.tokenizer.encode(batch["output_targets"]["image_out"])
    torch.testing.assert_close(out.output_codes["image_out"], codes)
    want = mod.output_loss_fn(out.modality_outputs["image_out"], codes)
    torch.testing.assert_close(losses.modality_losses["image_out"], want)
    torch.testing.assert_close(losses.loss, out.loss)
    assert float(out.lm_loss) == pytest.approx(reference_lm_loss(out.logits, batch["labels"]), rel=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + mod.output_loss_weight * want)


def test_pipeline_last_stage_loss_equals_the_single_process_loss(model):
    """The last stage's loss of each microbatch (padded to the pipeline's length, cut along the batch as
    torch.distributed.pipelining cuts the target) summed over microbatches, with the step's token
    count, is the single-process loss of the whole batch, loss_mask included, packed documents too."""
    from mimo_spec.parallel.pipeline import PipelineRunner

    for with_documents in (False, True):
        batch = packed(model)
        if not with_documents:
            del batch["document_ids"]
        with torch.no_grad():
            single = model(**batch).lm_loss
        runner = PipelineRunner.__new__(PipelineRunner)  # the loss side only: no process group needed
        runner.seq_len, runner.pad_id, runner.rows = batch["input_ids"].shape[1] + 3, 0, 0
        counted = batch["loss_mask"][:, 1:] * (batch["labels"][:, 1:] != -100)
        if with_documents:  # no document's first token
            counted = counted * (batch["document_ids"][:, 1:] == batch["document_ids"][:, :-1])
        runner.total_tokens = float(counted.sum())
        padded = runner._padded(batch)
        ids, target = padded["input_ids"], runner._target(padded)
        assert ids.shape == target.shape[:2] and target.shape[-1] == 2 + with_documents
        with torch.no_grad():  # causal: padding on the right (a document of its own) changes nothing
            logits = model(ids, batch["modality_inputs"], document_ids=padded.get("document_ids")).logits
            parts = [runner._loss(lg, tg) for lg, tg in zip(torch.tensor_split(logits, 2), torch.tensor_split(target, 2))]
        assert float(sum(parts)) == pytest.approx(float(single), rel=1e-5)


def test_tp_plans_are_a_registry_keyed_by_class():
    """The shipped components carry no TP declarations (the plans live in mimo_spec/parallel/plans.py),
    a subclass without a plan of its own takes its base class's, and a plugin's class can register one."""
    from mimo_spec.components.language.gpt import GPT
    from mimo_spec.components.layers import MLP, Attention, TransformerBlock
    from mimo_spec.parallel.plans import TPPlan, register_tp_plan, tp_divisibility, tp_plan_for

    for cls in (Attention, MLP, GPT, TransformerBlock):
        assert not [a for a in vars(cls) if a.startswith("tp_")], cls
    attn = Attention(32, 4, 2)
    assert tp_plan_for(attn).styles == {"qkv": "colwise", "out": "rowwise"}
    assert tp_plan_for(attn).fused(attn) == {"qkv": [32, 16, 16]}

    class MyAttention(Attention):
        pass

    assert tp_plan_for(MyAttention(32, 4, 2)) is tp_plan_for(attn)

    class PluginLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.width = 6
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)

    layer = PluginLayer()
    assert tp_plan_for(layer) is None
    register_tp_plan(PluginLayer, TPPlan({"a": "colwise", "b": "rowwise"}, divides=("width",)))
    assert tp_plan_for(layer).styles == {"a": "colwise", "b": "rowwise"}
    assert list(tp_divisibility(nn.Sequential(layer))) == [("0", "width", 6)]
    with pytest.raises(ValueError, match="unknown TP style"):
        register_tp_plan(PluginLayer, {"a": "diagonal"})


def test_component_modules_import_nothing_from_parallel():
    """A static check of every module under mimo_spec/components and mimo_spec/models (imports anywhere,
    lazy ones included)."""
    offenders = []
    for folder in ("components", "models"):
        for f in sorted((ROOT / "mimo_spec" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{Path(f).relative_to(ROOT)}: {n}" for n in names
                              if n.startswith(("mimo_spec.parallel", "mimo_spec.train", "mimo_spec.config"))]
    assert not offenders, offenders


def test_attention_reads_its_heads_from_the_projection():
    """A qkv projection holding a share of the heads (what TP leaves on a rank) runs that share:
    half the heads of q, k and v give the matching half of the attention output, nothing mutated."""
    from mimo_spec.components.layers import Attention

    torch.manual_seed(0)

    full = Attention(32, 4, 2)
    x = torch.randn(2, 5, 32)
    d = full.head_dim
    q, k, v = full.qkv.weight.split([4 * d, 2 * d, 2 * d])
    half = Attention(32, 4, 2)
    half.qkv = nn.Linear(32, (2 + 2 * 1) * d, bias=False)
    half.out = nn.Identity()
    with torch.no_grad():
        half.qkv.weight.copy_(torch.cat([q[:2 * d], k[:d], v[:d]]))
        full.out = nn.Identity()
        want = full(x, is_causal=True)[..., :2 * d]
        got = half(x, is_causal=True)
    torch.testing.assert_close(got, want)
    assert (half.num_heads, half.num_kv_heads) == (4, 2)


@pytest.mark.parametrize("chunk_rows", [1000, 3])
def test_linear_cross_entropy_equals_the_head_then_cross_entropy(monkeypatch, chunk_rows):
    """linear_cross_entropy (the head and the loss in one pass, a chunk of rows at a time, gradients taken in
    the forward) against F.linear + F.cross_entropy: the weighted sum, ignored rows (-100), and the gradients
    of the hidden states and the weight; a frozen weight gets none; no rows at all gives 0 and a zero
    weight gradient; under bf16 autocast both agree to bf16's precision."""
    import mimo_spec.loss as L

    vocab = 37
    monkeypatch.setattr(L, "LINEAR_CE_CHUNK_ELEMENTS", chunk_rows * vocab)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (11,), generator=g)
    target[[2, 7]] = -100
    scale = torch.rand(11, generator=g)

    def reference(h, w):
        ce = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), target,
                                               ignore_index=-100, reduction="none")
        return (ce * scale).sum()

    ref = reference(hidden, weight)
    ref_h, ref_w = torch.autograd.grad(ref * 2.5, (hidden, weight))
    got = L.linear_cross_entropy(hidden, weight, target, scale)
    got_h, got_w = torch.autograd.grad(got * 2.5, (hidden, weight))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_h, ref_h)
    torch.testing.assert_close(got_w, ref_w)
    assert float(got_h[2].abs().sum()) == 0.0  # an ignored row

    frozen = weight.detach()
    out = L.linear_cross_entropy(hidden, frozen, target, scale)
    (h_only,) = torch.autograd.grad(out, (hidden,))
    torch.testing.assert_close(h_only, torch.autograd.grad(reference(hidden, frozen), (hidden,))[0])

    calls = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or real_mm(a, b))
    with torch.no_grad():  # evaluation: the head's product only, no gradient products
        torch.testing.assert_close(L.linear_cross_entropy(hidden, weight, target, scale), ref.detach())
    assert len(calls) == -(-11 // chunk_rows)
    monkeypatch.setattr(torch.Tensor, "__matmul__", real_mm)

    empty = L.linear_cross_entropy(hidden[:0], weight, target[:0], scale[:0])
    (w_empty,) = torch.autograd.grad(empty, (weight,))
    assert float(empty) == 0.0 and w_empty.shape == weight.shape and float(w_empty.abs().sum()) == 0.0

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf = reference(hidden, weight)
        got_bf = L.linear_cross_entropy(hidden, weight, target, scale)
    torch.testing.assert_close(got_bf, ref_bf, rtol=2e-2, atol=2e-2)
    gb = torch.autograd.grad(got_bf, (hidden, weight))
    rb = torch.autograd.grad(ref_bf, (hidden, weight))
    for a, b in zip(gb, rb):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
