#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA torch and no network: the project's other needs travel
# as wheels in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime (built with `pip wheel`), pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions, transformers), fetched with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 ...`.
# Writes its log to ${OUT:-/tmp/gpu_check}/log.
# Each step has its own time limit, so one that hangs costs only its share; the whole runs in ~5 minutes.
# `bash benchmarks/gpu_check.sh [all|bench|cli]`: cli runs only the command-line jobs on the GPU (train with
# bf16 autocast, eval, generate; a native-resolution VLM; an MoE LM), bench only the test and the benchmarks.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
what=${1:-all}
{
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
python3 -c "import transformer_engine.pytorch as te; print('transformer-engine', te.__version__)" 2>&1 | tail -1
job() { local limit=$1; shift; echo "== cli.py $*"; timeout "$limit" python3 cli.py "$@" 2>&1 | grep -v Warning | tail -3; echo "(rc $?)"; }
if [ "$what" != bench ]; then
  job 90 train.steps=60 train.precision=bf16 hydra.run.dir=/tmp/gpu_run
  job 60 action=eval eval.checkpoint=/tmp/gpu_run
  job 60 action=generate generate.checkpoint=/tmp/gpu_run
  job 90 preset=qwen2_vl_tiny train.steps=30 train.precision=bf16 hydra.run.dir=/tmp/gpu_qwen2vl
  job 90 +model.params.num_experts=4 +model.params.num_experts_per_tok=2 train.steps=30 train.precision=bf16 \
    hydra.run.dir=/tmp/gpu_moe
  python3 -c "from PIL import Image; Image.new('RGB', (56, 84), (200, 30, 30)).save('/tmp/gpu_red.png')"
  job 60 action=generate generate.checkpoint=/tmp/gpu_qwen2vl "generate.images=[/tmp/gpu_red.png]" \
    'generate.prompt="<image> what colour?"' generate.max_new_tokens=4
  job 90 dtype=bfloat16 train.steps=30 hydra.run.dir=/tmp/gpu_bf16           # bf16 weights
  job 150 train.steps=30 train.precision=bf16 +parallel.default.compile=true hydra.run.dir=/tmp/gpu_compile
  echo "== torchrun --nproc-per-node 1 cli.py parallel=fsdp (NCCL)"
  timeout 120 python3 -m torch.distributed.run --nproc-per-node 1 cli.py parallel=fsdp train.steps=30 \
    train.precision=bf16 hydra.run.dir=/tmp/gpu_fsdp 2>&1 | grep -v Warning | tail -3; echo "(rc $?)"
  [ "$what" = cli ] && exit 0
fi
echo "== tests/test_te_backend.py"
timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:warnings -rs tests/test_te_backend.py 2>&1 | tail -6
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" python3 "$@" 2>&1 | grep -v Warning | tail -12; echo "(rc $?)"; }
run 120 benchmarks/train_step_vs_hf.py --device cuda --precision bf16 --shape 7b --steps 20 --warmup 5
run 45 benchmarks/train_step_vs_hf.py --device cuda --precision bf16 --shape 7b --backend te --steps 20 --warmup 5
run 45 benchmarks/train_step_vs_hf.py --device cuda --precision bf16 --steps 20 --warmup 5
run 120 benchmarks/train_step_vs_hf_qwen2vl.py --device cuda --precision bf16 --shape 2b-gpu --steps 20 --warmup 5
run 150 benchmarks/train_step_vs_hf_moe.py --device cuda --precision bf16 --shape gpu --steps 10 --warmup 3
} 2>&1 | tee "$OUT/log"
