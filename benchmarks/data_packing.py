"""Padding and loss tokens per second, packed (``data.packing: true``) vs padded rows, on variable-length data.

The data (``make_llava_data.py``: 1-4 turn conversations with answers from one word to ~100 words, most
short, 0-2 images) is trained with model=tiny + the vision modality, its LM widened to ``--hidden`` 512
(``--layers`` 2), ``--batch`` rows a step. The width matters: attention runs over whole packed rows (a
dense block-diagonal mask), so its cost grows with the row length squared, not with the samples' own
lengths; in tiny's 64-wide LM attention dominates and packing gains nothing per token, while in an LM
as wide as the rows are long or wider (LLaVA: 4096 wide, 2048-token rows) the linear layers dominate,
as here. Rows: packed, each row ``--seq-len`` tokens of whole samples (``document_ids``
keep them apart); padded, one sample a row, right-padded to the longest of the batch. Both read the
same sample order through ``TrainBatches`` and run the training loop's step (``forward_backward``,
gradient clipping, AdamW).

- padding: the share of the batches' positions that hold no token (``padding_fraction`` in metrics.csv);
- loss tokens/s: labels the loss counts (the batches' ``num_tokens``) per second of training steps
  (``step``: forward, backward, optimizer; ``+load``: also building the batch, in-process): the median
  of the steps' rates, and per CPU second of the steps (``--threads 1``: on a shared machine other
  processes lengthen wall time, not CPU time). The two cases step alternately, so load hits both alike.

Targets: padding < 5% packed, loss tokens/s >= 1.4x padded. With ``--loop``, the training loop itself is
run both ways too and its metrics.json figures printed (padding_fraction; tokens_per_s counts real
tokens over the run's wall time).

    .venv/bin/python benchmarks/data_packing.py
    .venv/bin/python benchmarks/data_packing.py --steps 10 --hidden 64 --batch 4 --loop   # the tiny LM itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def config_overrides(args, jsonl: str, index_dir: str, packing: bool) -> list[str]:
    h = args.hidden
    return ["model=tiny", "modality=[vision_clip]", "data=llava_json", f"data.path='{jsonl}'",
            f"++data.index_dir={index_dir}", f"++data.packing={str(packing).lower()}", "data.eval_fraction=0",
            f"model.params.max_seq_len={args.seq_len}", f"model.params.hidden_size={h}",
            f"model.params.num_layers={args.layers}", f"model.params.ffn_hidden_size={h * 11 // 4}",
            f"train.batch_size={args.batch}"]


class Case:
    """One way of batching: its model, optimizer and loader, stepped one training step at a time."""

    def __init__(self, args, jsonl: str, index_dir: str, packing: bool, seed: int):
        import torch

        from mimo_spec.builders import build_model
        from mimo_spec.config import compose_config
        from mimo_spec.data import build_dataset
        from mimo_spec.data.loader import TrainBatches
        from mimo_spec.data.tokenizer import build_tokenizer
        from mimo_spec.train.optim import build_optimizer
        from mimo_spec.train.schema import validate_train_config

        cfg = compose_config(config_overrides(args, jsonl, index_dir, packing))
        torch.manual_seed(0)
        self.model = build_model(cfg, seed=0)
        tok = build_tokenizer(cfg.data, self.model)
        data = build_dataset(cfg.data, self.model, tok, "train")
        self.opt = build_optimizer(self.model, validate_train_config(cfg.train))
        self.loader = TrainBatches(data, tok.pad_id, seed=seed, batch_size=args.batch,
                                   seq_len=args.seq_len if packing else None)
        self.steps: list[dict] = []

    def step(self) -> None:
        from mimo_spec.train.step import clip_grads, forward_backward

        t0 = time.perf_counter()
        batch = self.loader.next()
        t1, c1 = time.perf_counter(), time.process_time()
        n = int(batch["num_tokens"])
        forward_backward(self.model, batch, max(1, n), device="cpu")
        clip_grads(self.model, 1.0, None)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t2, c2 = time.perf_counter(), time.process_time()
        self.steps.append({"load": t1 - t0, "step": t2 - t1, "cpu": c2 - c1, "counted": n,
                           "positions": int(batch["input_ids"].numel()),
                           "real": int(batch["attention_mask"].sum()),
                           "samples": batch["planned"] - len(batch["skipped"])})

    def summary(self, rows: int) -> dict:
        s = self.steps[1:]  # the first step warms up
        total = {k: sum(x[k] for x in s) for k in s[0]}
        return {"padding": 1 - total["real"] / total["positions"],
                # per-step rates, median: robust to other processes' bursts on a shared machine
                "tps": statistics.median(x["counted"] / x["step"] for x in s),
                "tps_load": statistics.median(x["counted"] / (x["step"] + x["load"]) for x in s),
                # per CPU second of the steps: what other processes cannot inflate
                "tpcpu": total["counted"] / total["cpu"],
                "tokens_per_step": total["counted"] / len(s), "samples_per_step": total["samples"] / len(s),
                "step_ms": statistics.median(x["step"] for x in s) * 1e3, "seq": total["positions"] / len(s) / rows}


def planned_padding(args, jsonl: str, index_dir: str, rows: list[int], batches: int = 16) -> list[tuple]:
    """(rows, lookahead, padding) of the packer's plans alone (token lengths only, nothing decoded): the
    default lookahead (samples waiting before a batch closes: the Planner's own, max(16, 2 x rows)) and
    the old max(8, rows) and 4x that."""
    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset
    from mimo_spec.data.loader import SampleOrder
    from mimo_spec.data.packing import LoaderState, Planner
    from mimo_spec.data.tokenizer import build_tokenizer

    cfg = compose_config(config_overrides(args, jsonl, index_dir, True))
    model = build_model(cfg, seed=0)
    data = build_dataset(cfg.data, model, build_tokenizer(cfg.data, model), "train")
    out = []
    for n in rows:
        for lookahead in (max(8, n), None, 4 * max(8, n)):
            planner = Planner(data, SampleOrder(len(data), 0), n, args.seq_len, True, lookahead=lookahead)
            state, used = LoaderState(), 0
            for _ in range(batches):
                plan = planner.plan(state)
                state, used = plan.state, used + plan.tokens
            out.append((n, planner.lookahead, 1 - used / (batches * n * args.seq_len)))
    return out


LOOP_CHILD = """
import json, sys
from pathlib import Path
from mimo_spec.config import compose_config
from mimo_spec.train.loop import train
print(json.dumps(train(compose_config(json.loads(sys.argv[2])), Path(sys.argv[1]))))
"""


def loop(args, jsonl: str, index_dir: str, packing: bool) -> dict:
    ov = config_overrides(args, jsonl, index_dir, packing) + [
        f"train.steps={args.steps}", "train.eval_every=0", "train.checkpoint.every=0", "train.log_every=100000"]
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, "-c", LOOP_CHILD, out, json.dumps(ov)], capture_output=True, text=True,
                           cwd=out, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode != 0:
            raise SystemExit(f"training loop failed (packing={packing}):\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3000, help="dataset size")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per case and round (after a warm-up step)")
    ap.add_argument("--batch", type=int, default=8, help="rows a step")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512, help="LM hidden size (tiny: 64; see the module doc)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (round r reads seed r's order)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds are step seconds)")
    ap.add_argument("--loop", action="store_true", help="also run the training loop both ways (metrics.json)")
    ap.add_argument("--data-dir", help="where the dataset is written (kept, reused); default: a temp dir")
    args = ap.parse_args()
    import torch

    from make_llava_data import make_dataset

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = make_dataset(Path(args.data_dir or tmp) / f"packing_{args.samples}", args.samples)["jsonl"]
        index_dir = str(Path(tmp) / "index")
        res: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(args.rounds):  # round r reads seed r's order
            cases = {p: Case(args, jsonl, index_dir, p, seed=r) for p in (False, True)}
            for _ in range(args.steps + 1):  # step by step, alternating: load changes hit both alike
                for p in (False, True):
                    cases[p].step()
            for p in (False, True):
                res[p].append(cases[p].summary(args.batch))
        plans = planned_padding(args, jsonl, index_dir, [4, 8, 16, 32])
        loops = {p: loop(args, jsonl, index_dir, p) for p in (False, True)} if args.loop else {}

    def med(p, key):
        return statistics.median(x[key] for x in res[p])

    print(f"model=tiny + vision, LM hidden {args.hidden} x {args.layers} layers, {args.batch} rows a step, "
          f"max_seq_len {args.seq_len}, {args.steps} steps x {args.rounds} rounds, {args.threads} thread(s)")
    print(f"\n{'rows':<8}{'padding':>9}{'row len':>9}{'samples/step':>14}{'loss tok/step':>15}{'step ms':>9}"
          f"{'loss tok/s':>12}{'+load':>9}{'per CPU-s':>11}")
    for p, name in ((False, "padded"), (True, "packed")):
        print(f"{name:<8}{med(p, 'padding'):>9.1%}{med(p, 'seq'):>9.0f}{med(p, 'samples_per_step'):>14.1f}"
              f"{med(p, 'tokens_per_step'):>15.0f}{med(p, 'step_ms'):>9.0f}{med(p, 'tps'):>12.0f}"
              f"{med(p, 'tps_load'):>9.0f}{med(p, 'tpcpu'):>11.0f}")
    print(f"\npacked / padded loss tokens/s: {med(True, 'tps') / med(False, 'tps'):.2f}x (step), "
          f"{med(True, 'tps_load') / med(False, 'tps_load'):.2f}x (+load), "
          f"{med(True, 'tpcpu') / med(False, 'tpcpu'):.2f}x per CPU second (target >= 1.4x); "
          f"packed padding {med(True, 'padding'):.1%} (target < 5%)")
    print("\npacked padding as planned (token lengths only, 16 batches), by rows a batch and lookahead (samples "
          "waiting before a batch closes; the loader uses max(16, 2 x rows)):")
    print("  " + "   ".join(f"{n} rows, {la}: {pad:.1%}" for n, la, pad in plans))
    if loops:
        print(f"\ntraining loop, {args.steps} steps (metrics.json):")
        for p, name in ((False, "padded"), (True, "packed")):
            r = loops[p]
            print(f"  {name:<8} padding_fraction {r['padding_fraction']:.3f}  tokens_per_s {r['tokens_per_s']:.0f}  "
                  f"skipped {r['bad_samples'] + r['dropped_samples']}")


if __name__ == "__main__":
    main()
