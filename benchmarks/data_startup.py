"""Time to the first training step and peak RSS on a large LLaVA JSONL vs a small one.

Each case is a fresh process running ``mimo_spec.train.loop.train`` (model=tiny with the vision
modality, ``data.source=llava_json``, ``train.steps=1``) on a JSONL of ``--large`` samples (default
200,000) or ``--small`` samples (default 300), written by ``make_llava_data.py`` (both reference the
same small pool of real image files). Streaming data means the two should be alike: the target is a
large / small ratio within 1.5x and a peak RSS under 800 MB.

"cold" runs have no offset index yet (a fresh ``data.index_dir``: the JSONL is scanned once);
"warm" runs reuse it. With transformers installed, the cases are repeated with a Hugging Face
tokenizer built here (a byte-level BPE trained with the tokenizers library, saved with
``save_pretrained``, with a ChatML ``chat_template``: ``data.template=null``).

Time to first step = process start -> end of step 1 (imports, config, model, tokenizer, dataset,
loader, the step), from the metrics.csv row of step 1; the end-of-run eval and checkpoint are excluded.
On a shared machine other processes stretch wall times: the ratios use the best run of each case, and
the CPU seconds of the whole process (wait4's user + system time, eval and checkpoint included), which
other processes do not inflate.

    .venv/bin/python benchmarks/data_startup.py --repeats 2
    .venv/bin/python benchmarks/data_startup.py --large 1000000 --repeats 3 --data-dir /tmp/llava_startup
"""

from __future__ import annotations

import argparse
import csv
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

CHILD = """
import json, sys, time
from pathlib import Path
from mimo_spec.config import compose_config
from mimo_spec.train.loop import train
out = Path(sys.argv[1]); overrides = json.loads(sys.argv[2])
result = train(compose_config(overrides), out)
result["returned_at"] = time.time()
print(json.dumps(result))
"""

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_hf_tokenizer(directory: Path, corpus: list[str], vocab_size: int = 900) -> Path:
    """A byte-level BPE (ids < vocab_size, under the tiny model's placeholder ids 1000-1002) with a ChatML
    chat_template, trained on ``corpus`` and saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(str(directory))
    return directory


def overrides(jsonl: str, index_dir: str, tokenizer: str | None) -> list[str]:
    o = ["model=tiny", "modality=[vision_clip]", "data=llava_json", f"data.path='{jsonl}'",
         f"++data.index_dir={index_dir}",
         "model.params.max_seq_len=1024", "train.steps=1", "train.batch_size=8", "train.log_every=1",
         "train.eval_batches=1", "train.checkpoint.every=0", "train.checkpoint.keep_last=1"]
    if tokenizer:
        o += [f"data.tokenizer={tokenizer}", "data.template=null"]
    return o


def run_measured(ov: list[str], tmp: Path) -> dict:
    """{ttfs: time to first step s, rss: peak RSS MB (wait4's ru_maxrss), skipped} of one fresh process."""
    out = Path(tempfile.mkdtemp(dir=tmp))
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), json.dumps(ov)], cwd=out,
                            stdout=open(out / "stdout", "wb"), stderr=open(out / "stderr", "wb"),
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(ov)}\n{(out / 'stderr').read_text()[-3000:]}")
    result = json.loads((out / "stdout").read_text().strip().splitlines()[-1])
    with open(out / "metrics.csv") as f:
        first = next(csv.DictReader(f))
    after_step1 = result["wall_time_s"] - float(first["elapsed_s"])
    return {"ttfs": result["returned_at"] - started - after_step1, "rss": usage.ru_maxrss / 1024,
            "cpu": usage.ru_utime + usage.ru_stime,
            "skipped": result["bad_samples"] + result["dropped_samples"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=2, help="warm runs per case (one cold run each)")
    ap.add_argument("--data-dir", help="where the datasets are written (kept and reused); default: a temp dir")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face tokenizer cases")
    args = ap.parse_args()
    from make_llava_data import make_dataset

    hf = not args.no_hf
    if hf:
        try:
            import tokenizers  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("transformers / tokenizers not installed: byte tokenizer only")
            hf = False
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = Path(args.data_dir) if args.data_dir else tmp / "data"
        files = {}
        for label, n in (("small", args.small), ("large", args.large)):
            name = f"train_{n}.jsonl"
            if (data / name).exists():
                files[label] = str(data / name)
                continue
            t0 = time.perf_counter()
            files[label] = make_dataset(data, n, name=name)["jsonl"]
            print(f"wrote {n:,} samples ({os.path.getsize(files[label]) / 2**20:.0f} MB) in "
                  f"{time.perf_counter() - t0:.1f} s")
        tokenizers_ = {"byte": None}
        if hf:
            corpus = [line for line in open(files["small"])][:300]
            tokenizers_["HF BPE + chat_template"] = str(build_hf_tokenizer(tmp / "hf_tok", corpus))
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "mimo_spec")], check=True)
        rows: dict[tuple, list[dict]] = {}
        index_dirs = {(t, s): str(tmp / f"index_{t.split()[0]}_{s}") for t in tokenizers_ for s in files}
        imports = []  # the machine's pace: a fresh `import torch` each round
        for rep in range(args.repeats + 1):  # round 0: cold (no index yet); then warm; sizes interleaved
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            imports.append(time.perf_counter() - t0)
            for tname, tok in tokenizers_.items():
                for size, path in files.items():
                    r = run_measured(overrides(path, index_dirs[tname, size], tok), tmp)
                    rows.setdefault((tname, size, "cold" if rep == 0 else "warm"), []).append(r)
    print(f"\nimport torch alone: {statistics.median(imports):.2f} s (median of {len(imports)})")
    print(f"\n{'tokenizer':<24}{'samples':>9}{'index':>7}{'first step s: best':>20}{'median':>8}{'CPU s':>7}"
          f"{'peak RSS MB':>13}{'skipped':>9}")
    for (tname, size, kind), rs in rows.items():
        n = args.small if size == "small" else args.large
        print(f"{tname:<24}{n:>9,}{kind:>7}{min(r['ttfs'] for r in rs):>20.2f}"
              f"{statistics.median(r['ttfs'] for r in rs):>8.2f}{statistics.median(r['cpu'] for r in rs):>7.2f}"
              f"{max(r['rss'] for r in rs):>13.0f}{rs[0]['skipped']:>9}")
    print(f"\nlarge / small ({args.large:,} vs {args.small:,} samples; target: within 1.5x, peak RSS < 800 MB)")
    for tname in tokenizers_:
        for kind in ("cold", "warm"):
            if (tname, "large", kind) not in rows:
                continue
            big, small = rows[tname, "large", kind], rows[tname, "small", kind]
            t = min(r["ttfs"] for r in big) / min(r["ttfs"] for r in small)
            c = statistics.median(r["cpu"] for r in big) / statistics.median(r["cpu"] for r in small)
            m = max(r["rss"] for r in big) / max(r["rss"] for r in small)
            print(f"  {tname:<24}{kind:<6} first step {t:.2f}x (best), CPU {c:.2f}x, peak RSS {m:.2f}x "
                  f"({max(r['rss'] for r in big):.0f} MB)")


if __name__ == "__main__":
    main()
