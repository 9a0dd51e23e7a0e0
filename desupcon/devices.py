"""Device choice and the per-device training settings (bf16 autocast, channels_last, fused Adam)."""

from __future__ import annotations

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
