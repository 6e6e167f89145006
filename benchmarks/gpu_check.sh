#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA torch and no network: the project's other needs travel
# as wheels in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime (built with `pip wheel`), pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions, transformers), fetched with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 ...`.
# Writes its log to ${OUT:-/tmp/gpu_check}/log.
# Each step has its own time limit, so one that hangs costs only its share; the whole runs in ~5 minutes.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
python3 -c "import transformer_engine.pytorch as te; print('transformer-engine', te.__version__)" 2>&1 | tail -1
echo "== tests/test_te_backend.py"
timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:warnings -rs tests/test_te_backend.py 2>&1 | tail -6
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" python3 "$@" 2>&1 | grep -v Warning | tail -12; echo "(rc $?)"; }
run 120 benchmarks/train_step_vs_hf.py --device cuda --precision bf16 --shape 7b --steps 20 --warmup 5
run 45 benchmarks/train_step_vs_hf.py --device cuda --precision bf16 --shape 7b --backend te --steps 20 --warmup 5
run 45 benchmarks/train_step_vs_hf.py --device cuda --precision bf16 --steps 20 --warmup 5
run 120 benchmarks/train_step_vs_hf_qwen2vl.py --device cuda --precision bf16 --shape 2b-gpu --steps 20 --warmup 5
run 150 benchmarks/train_step_vs_hf_moe.py --device cuda --precision bf16 --shape gpu --steps 10 --warmup 3
} 2>&1 | tee "$OUT/log"
