"""Training-loader throughput (samples/s) with 0 and 2 DataLoader workers on LLaVA-format image + audio data.

The data (``make_llava_data.py``: images of many sizes and modes, WAV / FLAC of many formats, 1-4 turn
conversations; ``--audio-fraction`` of the samples with audio) is read by ``TrainBatches`` -- the
training loop's loader -- for model=tiny with the vision and audio modalities, packed rows
(``data.packing``) of ``--seq-len`` tokens, ``--batch`` rows a batch. Nothing else runs, so the figures
are the loader's alone: time to the first batch (worker start-up included), the median time of a later
batch, and samples/s and items/s over all ``--batches`` batches (the first included: prefetching workers
fill their queue while the first batch is awaited, so short runs flatter them).
Each source is read as JSONL + image / audio files, and with ``--sources`` also as WebDataset shards
and Parquet (the same samples).

    .venv/bin/python benchmarks/data_loader.py --batches 16
    .venv/bin/python benchmarks/data_loader.py --workers 0,1,2,4 --sources llava_json,webdataset,parquet
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = ["model=tiny", "modality=[vision_clip,audio_whisper]"]


def build(source: str, paths: dict, seq_len: int, index_dir: str):
    """(dataset, pad id) of ``source`` over the written data, for model=tiny + vision + audio."""
    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset
    from mimo_spec.data.tokenizer import build_tokenizer

    path = paths[{"llava_json": "jsonl", "webdataset": "shards", "parquet": "parquet"}[source]]
    cfg = compose_config(MODEL + [f"data={source}", f"data.path='{path}'", f"++data.index_dir={index_dir}",
                                  f"model.params.max_seq_len={seq_len}", "data.eval_fraction=0"])
    model = build_model(cfg, seed=0)
    tok = build_tokenizer(cfg.data, model)
    return build_dataset(cfg.data, model, tok, "train"), tok.pad_id


def measure(dataset, pad_id: int, workers: int, batches: int, batch: int, seq_len: int, seed: int) -> dict:
    from mimo_spec.data.loader import TrainBatches

    loader = TrainBatches(dataset, pad_id, seed=seed, batch_size=batch, seq_len=seq_len, num_workers=workers)
    samples, items, times = 0, 0, []
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        b = loader.next()
        times.append(time.perf_counter() - t)
        samples += b["planned"] - len(b["skipped"])
        items += sum(sum(v) for v in (b.get("items_per_sample") or {}).values())
    total = time.perf_counter() - t0
    loader.close()
    return {"first": times[0], "sps": samples / total, "ips": items / total, "samples": samples,
            "batch_ms": statistics.median(times[1:] or times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="dataset size")
    ap.add_argument("--audio-fraction", type=float, default=0.3)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--sources", default="llava_json", help="comma list of llava_json, webdataset, parquet")
    ap.add_argument("--batches", type=int, default=16, help="batches timed (the first included)")
    ap.add_argument("--batch", type=int, default=4, help="packed rows a batch")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (other seeds: other samples)")
    ap.add_argument("--row-group", type=int, default=1000, help="Parquet rows a row group")
    ap.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's own; "
                    "workers use 1)")
    ap.add_argument("--data-dir", help="where the dataset is written (kept, reused); default: a temp dir")
    args = ap.parse_args()
    import torch

    from make_llava_data import make_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    sources = args.sources.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data_dir or tmp) / f"loader_{args.samples}"
        paths = make_dataset(data, args.samples, audio_fraction=args.audio_fraction, row_group=args.row_group,
                             webdataset=4 if "webdataset" in sources else 0, parquet="parquet" in sources)
        sets = {s: build(s, paths, args.seq_len, str(Path(tmp) / "index")) for s in sources}
        print(f"{args.samples} samples, packed rows of {args.seq_len} tokens, {args.batch} rows a batch; "
              f"torch threads in the main process: {torch.get_num_threads()}")
        results: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):  # alternating, so load changes hit all cases alike
            for s in sources:
                for w in workers:
                    results.setdefault((s, w), []).append(
                        measure(*sets[s], w, args.batches, args.batch, args.seq_len, seed=r))
    print(f"\n{'source':<12}{'workers':>8}{'first batch s':>15}{'batch ms':>10}{'samples/s':>11}{'items/s':>9}"
          f"{'vs 0 workers':>14}")
    for (s, w), rs in results.items():
        sps = statistics.median(x["sps"] for x in rs)
        base = statistics.median(x["sps"] for x in results[s, workers[0]])
        print(f"{s:<12}{w:>8}{statistics.median(x['first'] for x in rs):>15.2f}"
              f"{statistics.median(x['batch_ms'] for x in rs):>10.0f}{sps:>11.1f}"
              f"{statistics.median(x['ips'] for x in rs):>9.1f}{sps / base:>13.2f}x")


if __name__ == "__main__":
    main()
