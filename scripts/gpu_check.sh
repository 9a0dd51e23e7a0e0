#!/usr/bin/env bash
# The GPU checks, one call of a lent GPU: the tests marked `cuda` (skipped without a GPU), the
# profile of the `paper` step (one student eager and as CUDA graph replays; 8 students in lockstep,
# looped, fused, fused and graphed), then short `paper`-shaped runs (eager, --cuda-graphs,
# --compile, one lockstep group looped, fused, fused and graphed) printing images/s, seconds per
# epoch and peak memory. Each check runs whatever happened to the one before (a failing test or a
# failed capture must not cost the session's other figures); the script fails at the end if any
# did. Each has a time limit, so that a hang cannot cost them either: the seconds below, or
# CHECK_SECONDS for every check when set; a check that ignores the stop is killed 15 s later.
# Everything printed is also kept in $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
failed=()
check() {  # check NAME SECONDS COMMAND...: run it within its time limit, note a failure, go on
    local name=$1 limit=${CHECK_SECONDS:-$2} code; shift 2
    echo "== $name: $*"
    timeout --kill-after=15 "$limit" "$@"
    code=$?
    if [ $code -eq 124 ]; then  # timeout's own code (a KILL after the stop shows as exit 137)
        echo "== $name FAILED (stopped after its limit of $limit s)"; failed+=("$name")
    elif [ $code -ne 0 ]; then
        echo "== $name FAILED (exit $code)"; failed+=("$name")
    fi
}
check versions 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
check cuda-tests 300 "$PY" -m pytest -q -m cuda tests/
STEP=(benchmarks/bench_gpu_step.py --device cuda --batch-size 128)
check step 120 "$PY" "${STEP[@]}" --steps 50
check step-graphs 120 "$PY" "${STEP[@]}" --steps 50 --cuda-graphs
check lockstep-8 120 "$PY" "${STEP[@]}" --steps 20 --students 8
check lockstep-8-fused 120 "$PY" "${STEP[@]}" --steps 20 --students 8 --fused
check lockstep-8-fused-graphs 120 "$PY" "${STEP[@]}" --steps 20 --students 8 --fused --cuda-graphs
check runs 480 "$PY" scripts/gpu_check.py "$@"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${failed[*]}"
    exit 1
fi
echo "gpu_check: every check passed"
