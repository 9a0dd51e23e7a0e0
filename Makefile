# Two entry points for a fresh clone: `make quickstart` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test bench clean-outputs

$(PY): requirements.txt pyproject.toml
	./scripts/setup.sh
	@touch $(PY)

setup: $(PY)

quickstart: $(PY)
	$(PY) desupcon.py quickstart --output-dir .

test: $(PY)
	$(PY) -m pytest -q

bench: $(PY)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_step.py --preset paper --method lw-supcrd --batch-size 32
	$(PY) benchmarks/bench_flops.py --preset paper --method lw-supcrd --batch-size 32
	$(PY) benchmarks/bench_lockstep.py
	$(PY) benchmarks/bench_analysis.py
	$(PY) benchmarks/bench_teacher_epoch.py

clean-outputs:
	rm -rf pth_models json_results plots
