#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA torch and no network (wheels for the
# project's other needs in .whl/, made with `pip download`; see docs or the session notes).
# Writes logs under ${OUT:-/tmp/gpu_check}.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
python3 -c "import transformer_engine.pytorch as te; print('transformer-engine', te.__version__)" 2>&1 | tail -1
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_te_backend.py 2>&1 | tee "$OUT/te_test.log" | tail -8
for args in "--precision bf16" "--precision fp32" "--precision bf16 --feature-layer -1" "--precision bf16 --compile" "--precision bf16 --backend te"; do
  echo "== train_step_vs_hf.py --device cuda $args"
  timeout 200 python3 benchmarks/train_step_vs_hf.py --device cuda --threads 8 --steps 30 --warmup 5 $args 2>&1 | tail -4 | tee -a "$OUT/bench.log"
done
