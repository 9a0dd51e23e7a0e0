"""True float32: the regions whose arithmetic must not be lowered (the losses, the teacher's
classifier), whatever autocast and TF32 settings surround them."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def true_float32(device_type: str):
    """Autocast off and, on CUDA, TF32 off for matrix products: float32 inputs give IEEE float32
    matmuls (the device policy turns TF32 on for the convolutions and matmuls of the models)."""
    with torch.autocast(device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
