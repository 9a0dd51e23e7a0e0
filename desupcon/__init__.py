"""desupcon: logit-weighted supervised contrastive representation distillation (LW-SupCRD)."""

import os

# OpenMP threads that spin while waiting stall torch's CPU kernels 2-10x whenever another process
# is busy on a small machine (measured in benchmarks/bench_training.py); waiting passively costs
# nothing measurable. Only effective when desupcon is imported before torch; a user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
