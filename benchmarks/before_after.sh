#!/usr/bin/env bash
# Run benchmarks against two checkouts in one run, alternating, so machine noise hits both alike.
#
#   git worktree add --detach /tmp/before <commit>          # the revision to compare against
#   bash benchmarks/before_after.sh /tmp/before [ROUNDS] -- benchmarks/parallel_step.py --layouts single,ddp
#
# Each round runs the command once in the other checkout (PYTHONPATH pointing there, so its
# mimo_spec is imported) and once in this one, and prints both outputs under a header.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
before="$(cd "$1" && pwd)"; shift
rounds=2
if [ "${1:-}" != "--" ]; then rounds="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
py="${PYTHON:-$here/.venv/bin/python}"
for r in $(seq 1 "$rounds"); do
  for side in before after; do
    dir=$here; [ "$side" = before ] && dir=$before
    echo "=== round $r: $side ($(git -C "$dir" rev-parse --short HEAD))"
    (cd "$dir" && PYTHONPATH="$dir" "$py" "$@")
  done
done
