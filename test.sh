#!/usr/bin/env bash
# Set up (first time only) and run the test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 "$@"
