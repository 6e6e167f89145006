"""Media items each rank decodes under 2-rank DDP vs the items of the global batches: the target is 1/2.

The training loop (``mimo_spec.train.loop.train``) runs ``--steps`` steps of model=tiny with the vision
and audio modalities on LLaVA-format image + audio data (``make_llava_data.py``), once in one process
(``parallel=single``: it loads every global batch, so its counts are the global batches' items) and
under ``torchrun --nproc-per-node=2`` with ``parallel=ddp`` (gloo), with ``data.num_workers`` 0 and 2.
Every process wraps ``MediaProcessor.image`` / ``.audio`` and ``SampleBuilder.build`` and counts, per
rank (DataLoader workers included: each appends to its own file), the samples built and the items
decoded *by the training loader* (calls under ``loader.py``'s ``__getitem__``; the start-up memory
check's few samples are left out).

    .venv/bin/python benchmarks/data_ddp_decode.py --steps 6
    .venv/bin/python benchmarks/data_ddp_decode.py --steps 10 --batch 16 --nproc 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _from_loader() -> bool:
    """Whether the caller is the training loader (a ``__getitem__`` of mimo_spec/data/loader.py)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "__getitem__" and f.f_code.co_filename.endswith(os.path.join("data", "loader.py")):
            return True
        f = f.f_back
    return False


def install_counters(count_dir: Path) -> None:
    """Wrap the decoders so that each call from the loader appends ``kind items`` to this process's file."""
    from mimo_spec.data.media import MediaProcessor
    from mimo_spec.data.samples import SampleBuilder

    rank = os.environ.get("RANK", "0")

    def note(kind: str, n: int, where: str) -> None:
        with open(count_dir / f"rank{rank}_pid{os.getpid()}.txt", "a") as f:
            f.write(f"{kind}\t{n}\t{where}\n")

    def wrap(cls, name: str, kind: str):
        fn = getattr(cls, name)

        def counted(self, *a, **k):
            out = fn(self, *a, **k)
            if _from_loader():
                # a decoded item: {encoder: {kwarg: (n, ...)}}, where= names its sample; a built sample: one
                if kind == "sample":
                    n, where = 1, a[0].where
                else:
                    n, where = next(iter(next(iter(out.values())).values())).shape[0], k.get("where", a[-1])
                note(kind, int(n), where.replace("\t", " ").replace("\n", " "))
            return out
        setattr(cls, name, counted)

    wrap(MediaProcessor, "image", "image")
    wrap(MediaProcessor, "audio", "audio")
    wrap(SampleBuilder, "build", "sample")


def overrides(args, jsonl: str, layout: str, workers: int) -> list[str]:
    return ["model=tiny", "modality=[vision_clip,audio_whisper]", "data=llava_json", f"data.path='{jsonl}'",
            f"parallel={layout}", f"data.num_workers={workers}", "data.eval_fraction=0",
            "model.params.max_seq_len=1024", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            "train.checkpoint.every=0", "train.checkpoint.keep_last=1", "train.log_every=100000",
            "train.eval_every=0"]


def worker(args) -> None:
    import json

    import torch

    torch.set_num_threads(1)
    install_counters(Path(args.count_dir))
    from mimo_spec.config import compose_config
    from mimo_spec.train.loop import train

    train(compose_config(json.loads(args.worker)), Path(args.out))


def run(args, jsonl: str, layout: str, workers: int, nproc: int, tmp: Path) -> dict[str, list[tuple]]:
    """{rank: [(kind, count, sample)]} of one training run."""
    import json

    name = f"{layout}_w{workers}"
    count_dir, out = tmp / f"counts_{name}", tmp / f"run_{name}"
    count_dir.mkdir()
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                 if nproc > 1 else [])
    cmd = launch + [__file__, "--worker", json.dumps(overrides(args, jsonl, layout, workers)),
                    "--count-dir", str(count_dir), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    counts: dict[str, list[tuple]] = {}
    for f in sorted(count_dir.iterdir()):
        rank = f.name.split("_")[0][4:]
        for line in f.read_text().splitlines():
            kind, n, where = line.split("\t")
            counts.setdefault(rank, []).append((kind, int(n), where))
    return counts


def tally(entries: list[tuple], trained: set | None = None) -> Counter:
    """Counts per kind, of the entries whose sample is in ``trained`` (None: all)."""
    c: Counter = Counter()
    for kind, n, where in entries:
        if trained is None or where in trained:
            c[kind] += n
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="train.batch_size (packed rows of the global batch)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workers", default="0,2", help="data.num_workers values of the DDP runs")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--data-dir", help="where the dataset is written (kept, reused); default: a temp dir")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--count-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from make_llava_data import make_dataset

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        jsonl = make_dataset(Path(args.data_dir or tmp) / f"ddp_{args.samples}", args.samples,
                             audio_fraction=0.3)["jsonl"]
        single = run(args, jsonl, "single", 0, 1, tmp)["0"]
        cases = {f"ddp, {w} workers": run(args, jsonl, "ddp", int(w), args.nproc, tmp) for w in args.workers.split(",")}
    trained = {where for kind, _, where in single if kind == "sample"}  # the samples of the trained batches
    glob = tally(single)
    total = glob["image"] + glob["audio"]
    print(f"{args.steps} steps, global batch {args.batch} packed rows, {args.nproc} ranks; one process loads the "
          f"global batches: {glob['sample']} samples, {glob['image']} images, {glob['audio']} audio items")
    print("counts of the trained batches' samples; 'ahead': samples decoded for batches after the last step "
          "(prefetched by workers)")
    print(f"\n{'case':<18}{'rank':>5}{'samples':>9}{'images':>8}{'audio':>7}{'items':>7}{'of the global':>15}"
          f"{'ahead':>7}")
    print(f"{'single process':<18}{'0':>5}{glob['sample']:>9}{glob['image']:>8}{glob['audio']:>7}{total:>7}"
          f"{1.0:>14.2f}x{0:>7}")
    for name, per_rank in cases.items():
        summed = Counter()
        for rank in sorted(per_rank, key=int):
            c = tally(per_rank[rank], trained)
            ahead = tally(per_rank[rank])["sample"] - c["sample"]
            summed += c
            items = c["image"] + c["audio"]
            print(f"{name:<18}{rank:>5}{c['sample']:>9}{c['image']:>8}{c['audio']:>7}{items:>7}"
                  f"{items / max(total, 1):>14.2f}x{ahead:>7}")
        items = summed["image"] + summed["audio"]
        print(f"{'':<18}{'all':>5}{summed['sample']:>9}{summed['image']:>8}{summed['audio']:>7}{items:>7}"
              f"{items / max(total, 1):>14.2f}x")
    print(f"\ntarget: each rank decodes 1/{args.nproc} of the global batches' items "
          f"({1 / args.nproc:.2f}x; per step it follows how many items each rank's rows hold), all ranks 1.00x")


if __name__ == "__main__":
    main()
