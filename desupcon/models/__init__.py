"""Encoders, the student and teacher wrappers, and teacher weight loading (SPEC section 2).

Every encoder exposes `forward_features(x) -> (B, feature_dim)` and a linear classifier `fc`, and
keeps the torchvision/timm state-dict layout (`conv1`, `bn1`, `layer1..`, `fc`), so public
checkpoints load directly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.errors import DesupconError
from desupcon.models.folding import fold_batchnorm
from desupcon.models.stages import ModelOutputs, NO_STAGES, StageNeeds, Stages
from desupcon.models.encoder import residual_stages, ZooEncoder
from desupcon.models.zoo import ORIGINAL_CLASSIFIER, ZOO
from desupcon.precision import true_float32


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    @property
    def last_bn(self) -> nn.BatchNorm2d:  # the BatchNorm of the residual branch before the sum
        return self.bn2

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the residual sum before the final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        pre = out + shortcut
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class SmallCifarResNet(ZooEncoder):
    """The KD literature's CIFAR ResNets: 3 stages of basic blocks, (depth - 2) / 6 blocks each."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        stem, *stages = widths
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_planes = stem
        for i, (planes, stride) in enumerate(zip(stages, (1, 2, 2)), start=1):
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.feature_dim = in_planes
        self.declared_stage_channels = list(widths)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then each stage's output; preact: its last block's sum before the ReLU."""
        return residual_stages(self, F.relu(self.bn1(self.conv1(x))), preact)

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [getattr(self, f"layer{i}")[-1].last_bn for i in range(1, 4)]


def _torchvision(block: str, layers: list[int]):
    def build(num_classes: int) -> nn.Module:
        # imported on first use: `import torchvision` loads every torchvision model (and
        # torch._dynamo), seconds that a command's start or `--help` should not pay
        from desupcon.models.cifar_torchvision import CifarTorchvisionResNet
        return CifarTorchvisionResNet(block, layers, num_classes)
    return build


def _small(depth: int, widths=(16, 16, 32, 64)):
    return lambda num_classes: SmallCifarResNet(depth, widths, num_classes)


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    # torchvision's layout (`downsample`, `fc`): the published teacher and student
    "resnet18": _torchvision("basic", [2, 2, 2, 2]),
    "resnet34": _torchvision("basic", [3, 4, 6, 3]),
    "resnet50": _torchvision("bottleneck", [3, 4, 6, 3]),
    # the KD literature's CIFAR zoo (SPEC 2 and 17)
    **{f"resnet{d}": _small(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _small(8, (32, 64, 128, 256)),
    "resnet32x4": _small(32, (32, 64, 128, 256)),
    **ZOO,
}


def canonical_arch(name: str) -> str:
    """The registry's spelling of an architecture name: exact, else the one name equal to it
    ignoring case (`mobilenetv2` -> `MobileNetV2`). Names that differ only by case from two
    entries (`Resnet50`: torchvision's `resnet50` or the zoo's `ResNet50`) must be typed exactly."""
    if name in ARCHITECTURES:
        return name
    matches = [a for a in ARCHITECTURES if a.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"architecture {name!r} is ambiguous: {' or '.join(sorted(matches))} "
                         "(resnet18/34/50: torchvision's layout; ResNet18/34/50: the KD zoo's); type one exactly")
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES, key=str.lower))}")


def build_encoder(arch: str, num_classes: int, init: str = "kaiming") -> nn.Module:
    """A fresh encoder. `init="kaiming"` keeps the architectures' own initialisation (Kaiming-normal
    fan-out convolutions for the ResNets, WRN, VGG and MobileNetV2; the replaced CIFAR stem of the
    torchvision ResNets and the ShuffleNets keep PyTorch's default, as in the originals);
    `init="pytorch"` gives every convolution PyTorch's default (SPEC 2)."""
    arch = canonical_arch(arch)
    if init not in ("kaiming", "pytorch"):
        raise ValueError(f"unknown initialisation {init!r}; known: kaiming, pytorch")
    encoder = ARCHITECTURES[arch](num_classes)
    if init == "pytorch":
        for module in encoder.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
    return encoder


# ----------------------------------------------------------------------------------------------
# Heads and wrappers
# ----------------------------------------------------------------------------------------------

def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers through `dims` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class Student(nn.Module):
    """Encoder + projector (feat -> 128 -> 64) + linear classifier (the encoder's `fc`).

    `forward` returns `ModelOutputs` (features, logits, normalised projection, and the final map
    or stages the caller's `StageNeeds` asks for). With `detach_classifier` the classifier sees
    detached features: the online linear classifier of the contrastive methods, trained next to the
    encoder without shaping it.
    """

    def __init__(self, encoder: nn.Module, proj_hidden: int = 128, proj_dim: int = 64):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp([encoder.feature_dim, proj_hidden, proj_dim])

    @property
    def classifier(self) -> nn.Linear:
        return self.encoder.fc

    def forward(self, x: torch.Tensor, detach_classifier: bool = False,
                needs: StageNeeds = NO_STAGES) -> ModelOutputs:
        stages = self.encoder.forward_stages(x, preact=needs.preact)  # one pass: maps and pooling
        features = stages.pooled
        projection = F.normalize(self.projector(features), dim=1)
        logits = self.classifier(features.detach() if detach_classifier else features)
        return ModelOutputs(features, logits, projection, **needs.outputs(stages))


class Teacher(nn.Module):
    """Frozen encoder and classifier, trainable projection head (feat -> 512 -> 128 -> 64).

    The encoder stays in eval mode (BatchNorm statistics fixed) whatever `.train()` is asked.
    """

    def __init__(self, encoder: nn.Module, head_dims: tuple[int, ...] = (512, 128, 64)):
        super().__init__()
        self.encoder = encoder
        self.head = mlp([encoder.feature_dim, *head_dims])
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def fold_batchnorm(self, example: torch.Tensor) -> int:
        """Run every later forward on a copy of the encoder whose BatchNorms are folded into the
        convolutions before them (`folding.py`: the same function, fewer kernels); the encoder
        itself (saved, fingerprinted) stays as it is. Returns the number of BatchNorms folded."""
        folded, count = fold_batchnorm(self.encoder, outputs_a_fold_must_keep, example)
        self.__dict__["inference_encoder"] = folded if count else None  # not a submodule: not saved
        self.__dict__["inference_dtype"] = None
        return count

    def cast_weights_once(self, dtype: torch.dtype) -> int:
        """Keep the convolution and linear weights of the encoder copy every later forward runs on
        in `dtype`, the policy's autocast dtype: autocast re-casts a weight that needs no gradient
        on every call (its cast cache holds only weights that do), one kernel per weight per
        forward; cast once, they are the same values. BatchNorms stay float32, and the logits come
        from the float32 classifier of the encoder itself. That copy runs only inside an autocast
        region of `dtype`; elsewhere the encoder itself does. Returns the number of modules cast."""
        inference = self.__dict__.get("inference_encoder")
        if inference is None:
            inference = copy.deepcopy(self.encoder)
        count = 0
        for module in inference.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module is not inference.fc:
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype)
                count += 1
        self.__dict__["inference_encoder"] = inference
        self.__dict__["inference_dtype"] = dtype if count else None
        return count

    def _inference_encoder(self, x: torch.Tensor) -> nn.Module:
        inference = self.__dict__.get("inference_encoder")
        if inference is None or inference.fc.weight.device != x.device:  # (moved since: the encoder itself)
            return self.encoder
        dtype = self.__dict__.get("inference_dtype")
        if dtype is not None and not (torch.is_autocast_enabled(x.device.type)
                                      and torch.get_autocast_dtype(x.device.type) == dtype):
            return self.encoder  # weights cast for an autocast region that is not this one
        return inference

    @torch.no_grad()
    def forward(self, x: torch.Tensor, needs: StageNeeds = NO_STAGES) -> ModelOutputs:
        """One backbone pass giving `ModelOutputs` (features, logits, and the final map or stages
        `needs` asks for; no projection), all detached, from the folded (and weight-cast) copy
        where there is one; the classifier runs in float32 even inside an autocast region (its
        logits set LW-SupCRD's weights and every logit distiller's targets), with TF32 off."""
        encoder = self._inference_encoder(x)
        stages = encoder.forward_stages(x, preact=needs.preact)
        with true_float32(stages.pooled.device.type):
            logits = self.encoder.fc(stages.pooled.float())
        return ModelOutputs(stages.pooled, logits, None, **needs.outputs(stages))

    def features_and_logits(self, x: torch.Tensor, policy, needs: StageNeeds = NO_STAGES) -> ModelOutputs:
        """`forward` under the device policy's autocast (the logits stay float32)."""
        with policy.autocast():
            return self(x, needs=needs)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised head output; gradients reach the head only."""
        return F.normalize(self.head(features.detach()), dim=1)


def teacher_identity_fingerprint(teacher, reads_projection: bool) -> str | None:
    """The teacher's content fingerprint a student's identity records: backbone and head when the
    run reads the teacher's projection, the backbone alone otherwise (so such a run keeps its
    identity whether or not the head was probed). None without a fingerprinted teacher."""
    return getattr(teacher, "fingerprint" if reads_projection else "backbone_fingerprint", None)


def outputs_a_fold_must_keep(encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the teacher's folded copy must compute as the encoder does: the pooled features, the
    logits and every stage entry and pre-activation (a BatchNorm folded into a convolution whose
    output is itself a stage entry, as WRN's stem, would change that entry: such folds are left out)."""
    stages = encoder.forward_stages(x, preact=True)
    return (stages.pooled, encoder.fc(stages.pooled), *stages.feats, *stages.preact)


# ----------------------------------------------------------------------------------------------
# Weight loading
# ----------------------------------------------------------------------------------------------

# Names of the classifier in the layouts we load (timm, the published files, the KD zoo); the
# longest first, so that MobileNetV2's `classifier.0.` is not read as `classifier.`.
CLASSIFIER_ALIASES = tuple(sorted({"classifier.", "final_classifier.",
                                   *(f"{name}." for name in ORIGINAL_CLASSIFIER.values())}, key=len, reverse=True))


class CheckpointMismatchError(DesupconError, ValueError):
    """A state dict that does not fit the model; the message lists what differs."""


def normalise_state_dict_layout(state: dict) -> "OrderedDict[str, torch.Tensor]":
    """Unwrap `state_dict`/`model` containers (mdistiller's `{"model": ...}` files), strip
    `module.`, rename classifier keys (`classifier.`, `classifier.0.`, `linear.`, ...) to `fc.`."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    out = OrderedDict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        while name.startswith("module."):
            name = name[len("module."):]
        for alias in CLASSIFIER_ALIASES:
            if name.startswith(alias):
                name = "fc." + name[len(alias):]
                break
        out[name] = value
    return out


def architecture_signature(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """{parameter or buffer name: shape} of an architecture, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_encoder(arch, num_classes).state_dict().items()}


def identify_architecture(state: dict) -> str | None:
    """The registered architecture whose names and shapes `state` (layout normalised) has exactly,
    at the class count of its classifier; None when none fits."""
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        return None
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for arch in ARCHITECTURES:
        expected = architecture_signature(arch, fc.shape[0])
        if {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")} == shapes:
            return arch
    return None


def load_matching_state_dict(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """Load `state` strictly; on mismatch raise listing missing, unexpected and mis-shaped keys.
    BatchNorm step counters (`num_batches_tracked`) missing from older files are the only keys
    tolerated: they take the model's own (they change no output)."""
    expected = model.state_dict()
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state},
             **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        def show(items):
            return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")
        parts = [f"{source} does not match the model ({type(model).__name__})"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if misshaped:
            parts.append(f"shape mismatches ({len(misshaped)}): {show(misshaped)}")
        parts.append("check the architecture (--teacher-arch) and the number of classes of the dataset")
        raise CheckpointMismatchError("\n  ".join(parts))
    model.load_state_dict(state)

