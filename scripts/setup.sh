#!/usr/bin/env bash
# Create .venv and install mimo-spec with its test, Hugging Face and sweep (submitit, Optuna) extras.
# Re-runs are cheap: nothing is reinstalled unless pyproject.toml changed.
#
# torch: on a machine without an NVIDIA GPU this installs the pinned CPU build
# (MIMO_TORCH, default torch==2.13.0) before the package, so pip never pulls a
# multi-GB CUDA build; with a GPU, pip installs torch normally from the
# package's own requirement. Set MIMO_TORCH to choose another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=".venv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.mimo-spec-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${MIMO_TORCH:-}" ]; then
        echo "setup: NVIDIA GPU found; torch comes from the normal install" >&2
    else
        echo "setup: installing ${MIMO_TORCH:-torch==2.13.0}" >&2
        "${PIP[@]}" "${MIMO_TORCH:-torch==2.13.0}"
    fi
fi
# the torch already installed is pinned for every later install: a dependency (or a companion such as
# torchvision / torchaudio made for another torch) can never replace it, e.g. with a multi-GB CUDA build
CONSTRAINTS="$VENV/.torch-constraint.txt"
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
    PIP+=(-c "$CONSTRAINTS")
fi
echo "setup: installing mimo-spec with its train, test, hf, data, slurm and sweep extras into $VENV" >&2
"${PIP[@]}" -e ".[train,test,hf,data,slurm,sweep]"
if [ -f "$CONSTRAINTS" ] && ! "$VENV/bin/python" -c "
import sys, torch
want = open('$CONSTRAINTS').read().strip().split('==', 1)[1]
sys.exit(torch.__version__ != want)"; then
    echo "setup: error: the install replaced $(cat "$CONSTRAINTS")" >&2
    exit 1
fi
echo "$WANT" > "$STAMP"
