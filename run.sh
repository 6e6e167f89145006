#!/usr/bin/env bash
# Set up (first time only) and run the main job; arguments are Hydra overrides,
# e.g.  bash run.sh model=gpt2_small modality=[vision_clip,audio_whisper]
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/mimo-spec "$@"
