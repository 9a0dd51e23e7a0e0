#!/usr/bin/env bash
# The GPU checks: the tests marked `cuda` (skipped without a GPU), then short paper-shaped runs
# (eager, --compile, one lockstep group) printing images/s, seconds per epoch and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
"$PY" -m pytest -q -m cuda tests/
"$PY" scripts/gpu_check.py "$@"
