"""Hugging Face checkpoint import: mimo-spec's ``import_hf`` vs transformers' ``from_pretrained``.

Two checkpoints are written to a temporary directory first: the tiny LLaVA of the
tests, and a synthetic multi-shard Llama (about 335M parameters, fp32, 1.3 GB in
~200 MB shards). Each load then runs in a fresh process, interleaved, and reports:

- load: wall seconds of the load call alone (imports excluded), and until every
  weight has been read once (transformers maps the files and reads lazily),
- peak RSS added by the load (peak minus the RSS right before it),
- the same after reading every weight once (safetensors maps files lazily, so a
  load alone may not have paged the weights in; this is the honest number).

The target is peak ~ model size + the largest shard.

    .venv/bin/python benchmarks/import_memory.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = """
import sys, torch, transformers
sys.path.insert(0, {tests!r})
from test_interop import _llava
_llava().save_pretrained({out!r} + "/tiny_llava")
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu")
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained({out!r} + "/llama_sharded", max_shard_size="200MB")
"""

# Run in a fresh process: prints one JSON line of measurements.
LOAD = """
import json, resource, sys, time, torch
def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
which, path = sys.argv[1], sys.argv[2]
import transformers  # both sides import it and resolve the config class; only the load is measured
transformers.AutoConfig.from_pretrained(path)
if which == "ours":
    import mimo_spec.builders, mimo_spec.interop.hf_import
    from mimo_spec.interop import import_hf
    load = lambda: import_hf(path)[1]
else:
    cls = getattr(transformers, json.load(open(path + "/config.json"))["architectures"][0])
    load = lambda: cls.from_pretrained(path, dtype=torch.float32)
before = rss_mb()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
after_load = peak_mb()
with torch.no_grad():  # touch every weight once
    total = sum(float(p.float().sum()) for p in model.parameters())
ready = time.perf_counter() - start
size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps(dict(seconds=seconds, ready=ready, load=after_load - before, touched=peak_mb() - before,
                      model_mb=size)))
"""


def run(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, which, str(path)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(f"{which} failed on {path}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", MAKE.format(tests=str(ROOT / "tests"), out=tmp)], check=True,
                       capture_output=True)
        cases = {"tiny LLaVA": Path(tmp) / "tiny_llava", "Llama 335M, sharded": Path(tmp) / "llama_sharded"}
        for f in Path(tmp).rglob("*.safetensors"):  # both loaders start from a warm page cache
            f.read_bytes()
        results: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
            for case, path in cases.items():
                for which in ("ours", "transformers"):
                    results.setdefault((case, which), []).append(run(which, path))
        shard = {c: max(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20 for c, p in cases.items()}
    print(f"{'case':<22}{'loader':<14}{'load s':>8}{'+read all s':>12}{'peak +MB load':>15}"
          f"{'peak +MB touched':>18}{'model MB':>10}{'largest shard MB':>18}")
    med = {}
    for (case, which), runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med[case, which] = m
        print(f"{case:<22}{which:<14}{m['seconds']:>8.2f}{m['ready']:>12.2f}{m['load']:>15.0f}{m['touched']:>18.0f}"
              f"{m['model_mb']:>10.0f}{shard[case]:>18.0f}")
    for case in cases:
        ours, hf = med[case, "ours"], med[case, "transformers"]
        print(f"{case}: ours / transformers = {ours['ready'] / hf['ready']:.2f}x time to read every weight, "
              f"{ours['touched'] / max(hf['touched'], 1e-9):.2f}x peak memory (touched)")


if __name__ == "__main__":
    main()
