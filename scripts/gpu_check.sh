#!/usr/bin/env bash
# The GPU checks, one call of a lent GPU: the tests marked `cuda` (skipped without a GPU), the
# profile of the `paper` step (one student eager and as CUDA graph replays; 8 students in lockstep,
# looped, fused, fused and graphed), then short `paper`-shaped runs (eager, --cuda-graphs,
# --compile, one lockstep group looped, fused, fused and graphed) printing images/s,
# seconds per epoch and peak memory. Everything printed is also kept in $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
"$PY" -m pytest -q -m cuda tests/
"$PY" benchmarks/bench_gpu_step.py --device cuda --batch-size 128 --steps 50
"$PY" benchmarks/bench_gpu_step.py --device cuda --batch-size 128 --steps 50 --cuda-graphs
"$PY" benchmarks/bench_gpu_step.py --device cuda --batch-size 128 --steps 20 --students 8
"$PY" benchmarks/bench_gpu_step.py --device cuda --batch-size 128 --steps 20 --students 8 --fused
"$PY" benchmarks/bench_gpu_step.py --device cuda --batch-size 128 --steps 20 --students 8 --fused --cuda-graphs
"$PY" scripts/gpu_check.py "$@"
