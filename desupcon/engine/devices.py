"""Device choice and the one device policy every loop uses (precision, memory format, fused
optimiser, cuDNN settings), plus the learning-rate schedules.

A `DevicePolicy` is chosen once per run (`DevicePolicy.choose`) and passed to every loop: the
training step, the evaluation and the analysis ask it for their autocast context, input memory
format, optimiser and gradient scaler, so no loop branches on the device itself.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from desupcon.errors import DesupconError
from desupcon.precision import true_float32

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to `device` without making the host wait (pinned on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DeviceError(DesupconError, ValueError):
    """A device that does not exist here; the message names it and the alternatives."""


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (Ampere and newer), not emulated (T4, V100 emulate it slowly)."""
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class DevicePolicy:
    """How a run uses its device. Tests build any policy on the CPU (bf16 autocast, channels_last
    and fused Adam all exist there), so every branch a GPU run takes is exercised."""

    device: torch.device
    precision: str = "fp32"  # bf16 | fp16 (with a gradient scaler) | fp32
    channels_last: bool = False
    fused_adam: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False
    # the frozen teacher's BatchNorms folded into its convolutions (the same function, fewer
    # kernels; measured no slower on the CPU for every zoo family, README)
    fold_teacher_batchnorm: bool = True
    # the frozen teacher's convolution weights kept in the autocast dtype (cast once, not on every
    # forward: the same values, one kernel less per weight per forward)
    cast_teacher_weights: bool = True
    # test images per forward pass of the per-epoch evaluation: large on a GPU (fewer launches,
    # off the training's critical path sooner), moderate on the CPU (cache-sized)
    eval_batch: int = 512

    @classmethod
    def choose(cls, device: torch.device | str, precision: str = "auto",
               deterministic: bool = False) -> "DevicePolicy":
        """auto: bf16 where the GPU has it natively, fp16 (scaled) on older GPUs, fp32 on CPU."""
        device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r} is unknown; known: {', '.join(PRECISIONS)}")
        cuda = device.type == "cuda"
        if precision == "auto":
            precision = ("bf16" if native_bf16(device) else "fp16") if cuda else "fp32"
        return cls(device, precision, channels_last=cuda, fused_adam=cuda,
                   cudnn_benchmark=cuda and not deterministic, deterministic=deterministic,
                   eval_batch=2048 if cuda else 512)

    def apply_global_settings(self) -> None:
        """Process-wide switches (cuDNN autotuning, deterministic kernels)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = not self.deterministic
            torch.backends.cudnn.allow_tf32 = not self.deterministic
        if self.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 or fp16 under those precisions, None in float32."""
        return _DTYPES.get(self.precision)

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        # No weight-cast cache: every weight is used once per region here (so it saves nothing),
        # and a CUDA graph's capture must not keep casts made outside it (engine/graphs.py).
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision], cache_enabled=False)

    def full_precision(self):
        """True float32 inside an autocast region (the losses): autocast off, and TF32 off for
        their matrix products on CUDA (`precision.true_float32`)."""
        return true_float32(self.device.type)

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device).to(memory_format=self.memory_format)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format)

    def make_adam(self, groups: list[dict]) -> torch.optim.Adam:
        return torch.optim.Adam(groups, **({"fused": True} if self.fused_adam else {}))

    def make_sgd(self, groups: list[dict], momentum: float) -> torch.optim.SGD:
        return torch.optim.SGD(groups, momentum=momentum, **({"fused": True} if self.fused_adam else {}))

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (a no-op scaler otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> str:
        return (f"{self.device} {self.precision}" + (" channels_last" if self.channels_last else "")
                + (" fused-adam" if self.fused_adam else "") + (" deterministic" if self.deterministic else ""))


def as_policy(device_or_policy) -> DevicePolicy:
    """A policy from a policy, a device or a device name (the device's automatic choice)."""
    if isinstance(device_or_policy, DevicePolicy):
        return device_or_policy
    return DevicePolicy.choose(device_or_policy)


def lr_factor(schedule: str, epochs: int, milestones: tuple[int, ...] = (), gamma: float = 0.1):
    """Epoch -> learning-rate multiplier: "constant" (1), "cosine" (annealed to 0 over `epochs`) or
    "step" (x gamma after each milestone epoch)."""
    if schedule == "constant":
        return lambda epoch: 1.0
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))
    if schedule == "step":
        return lambda epoch: gamma ** sum(epoch >= m for m in milestones)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: constant, cosine, step")


def make_scheduler(optimizer: torch.optim.Optimizer, schedules: list[str], epochs: int,
                   milestones: tuple[int, ...] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per parameter group (a single entry applies to every group), stepped per epoch."""
    if len(schedules) == 1:
        schedules = schedules * len(optimizer.param_groups)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_factor(s, epochs, milestones, gamma) for s in schedules])
