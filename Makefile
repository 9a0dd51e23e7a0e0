# Two entry points for a fresh clone: `make quickstart` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test bench cifar100-demo gpu-subset clean-outputs

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
	$(PY) benchmarks/bench_compare.py
	$(PY) benchmarks/bench_zoo.py

# The published comparison at CPU scale on the real CIFAR-100 (an npz folder, or CIFAR100=cifar100
# with DATA_ROOT=<torchvision root>): a resnet20 teacher on 10,000 images, resnet8 students on
# 2,000, one seed; prints its table (runs/cifar100_demo/comparison_published.json keeps it).
CIFAR100 ?= ../shared/data/cifar100
DATA_ROOT ?= data
cifar100-demo: $(PY)
	$(PY) scripts/cpu_comparison.py --group published --data $(CIFAR100) --data-root $(DATA_ROOT) \
		--teacher-train-images 10000 --teacher-epochs 3 --train-images 2000 --test-images 1000 \
		--epochs 4 --seeds 0 --bank-size 1024 --output-dir runs/cifar100_demo

# The CIFAR-100 subset that travels to a lent GPU (150 + 50 images per class, 53.6 MiB) for
# scripts/gpu_reproduce.sh; carry/ travels with the checkout and is never committed.
gpu-subset: $(PY)
	$(PY) desupcon.py data subset $(CIFAR100) carry/cifar100-150 --train-per-class 150 --test-per-class 50 --overwrite

clean-outputs:
	rm -rf pth_models json_results plots
