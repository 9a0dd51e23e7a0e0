"""Device choice and the per-device training settings (bf16 autocast, channels_last, fused Adam)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to `device` without making the host wait (pinned on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device

def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

def memory_format(device: torch.device):
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format

def make_adam(groups: list[dict], device: torch.device) -> torch.optim.Adam:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.Adam(groups, **kwargs)


def lr_factor(schedule: str, epochs: int):
    """Epoch -> learning-rate multiplier: "constant" (1) or "cosine" (annealed to 0 over `epochs`)."""
    if schedule == "constant":
        return lambda epoch: 1.0
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: constant, cosine")


def make_scheduler(optimizer: torch.optim.Optimizer, schedules: list[str], epochs: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per parameter group (a single entry applies to every group), stepped per epoch."""
    if len(schedules) == 1:
        schedules = schedules * len(optimizer.param_groups)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_factor(s, epochs) for s in schedules])
