"""desupcon: logit-weighted supervised contrastive representation distillation (LW-SupCRD)."""

__version__ = "0.1.0"
