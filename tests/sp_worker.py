"""Run by tests/test_parallel_sp.py under torchrun: sequence-parallel scenarios in one process group.

Usage: torchrun --nproc-per-node N tests/sp_worker.py OUT_DIR SCENARIO[,SCENARIO...]
``unit``: the language model's forward and backward under Ulysses SP (all ranks one SP group) against the
plain model on the same inputs (raises if not equal); ``packed:<layout>``: hand-packed rows through the
training step (tests/parallel_worker.py's packed_run); else ``<layout>``: the training loop, 3 steps.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import config, packed_run, settle  # noqa: E402


def unit() -> None:
    """A GQA language model with M-RoPE (3-D positions, random), packed documents and a padding mask, on a
    sequence the SP degree does not divide (13 tokens): the slice's output, the all-gathered eval output,
    and the gradients of the inputs and every parameter (summed over the SP ranks) equal one process's."""
    import torch.distributed as dist

    from mimo_spec.components.language.gpt import GPT
    from mimo_spec.parallel.env import init_distributed
    from mimo_spec.parallel.sequence import install_sequence_parallel, slice_bounds

    env = init_distributed()
    n, r = dist.get_world_size(), env.rank
    torch.manual_seed(0)
    heads = 2 * n
    ref = GPT(vocab_size=64, hidden_size=16 * heads // 2, num_layers=2, num_heads=heads, num_kv_heads=n,
              mrope_section=[2, 1, 1], attention_bias=True)
    with torch.no_grad():  # perturbed: biases and norm weights away from their initial values
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sp = GPT(vocab_size=64, hidden_size=16 * heads // 2, num_layers=2, num_heads=heads, num_kv_heads=n,
             mrope_section=[2, 1, 1], attention_bias=True)
    sp.load_state_dict(ref.state_dict())
    install_sequence_parallel(sp, dist.group.WORLD, n, r)
    B, S, H = 2, 13, ref.hidden_size
    x = torch.randn(B, S, H)
    pos = torch.randint(0, 20, (3, B, S))
    docs = torch.tensor([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 11:] = 0
    lo, hi, _ = slice_bounds(S, n, r)
    assert hi > lo
    for kw in ({"position_ids": pos, "document_ids": docs, "attention_mask": mask}, {}):
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref = ref(xr, **kw)
        out_sp = sp(xs, **kw)
        torch.testing.assert_close(out_sp[:, lo:hi], out_ref[:, lo:hi], atol=1e-5, rtol=1e-5)
        assert not out_sp[:, :lo].any() and not out_sp[:, hi:].any()  # only the slice in training
        g = torch.randn_like(out_ref)
        (out_ref * g).sum().backward()
        (out_sp[:, lo:hi] * g[:, lo:hi]).sum().backward()
        pairs = [(name, p, q) for (name, p), q in zip(ref.named_parameters(), sp.parameters()) if p.grad is not None]
        assert len(pairs) > 10 and all(q.grad is not None for _, _, q in pairs)
        for t in [xs.grad] + [q.grad for _, _, q in pairs]:
            dist.all_reduce(t)  # every rank's slice's share of the gradient
        torch.testing.assert_close(xs.grad, xr.grad, atol=1e-5, rtol=1e-4)
        for name, p, q in pairs:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        ref.zero_grad()
        sp.zero_grad()
        with torch.no_grad():  # evaluation: the whole sequence on every rank
            torch.testing.assert_close(sp(x, **kw), ref(x, **kw), atol=1e-5, rtol=1e-5)
    try:
        sp(x, kv_cache=ref.new_kv_cache(B, S))
        raise AssertionError("a KV cache under SP was not refused")
    except Exception as e:
        assert "kv_cache" in str(e), e


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    for sc in scenarios:
        if sc == "unit":
            unit()
            (out / f"unit_rank{os.environ['RANK']}.ok").write_text("ok")
        elif sc.startswith("packed:"):
            packed_run(out, sc.split(":")[1])
        else:
            from mimo_spec.train.loop import train

            train(config(sc), out / sc)
        settle()
    from mimo_spec.parallel.env import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    main()
