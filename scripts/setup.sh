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
echo "setup: installing mimo-spec with its train, test, hf, slurm and sweep extras into $VENV" >&2
"${PIP[@]}" -e ".[train,test,hf,slurm,sweep]"
echo "$WANT" > "$STAMP"
