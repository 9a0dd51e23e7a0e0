"""desupcon: logit-weighted supervised contrastive representation distillation (LW-SupCRD)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("desupcon")  # declared once, in pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
