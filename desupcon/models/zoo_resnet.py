"""The zoo's CIFAR ResNet18/34/50: 3x3 stem, no max-pool, `shortcut` projections."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.models.encoder import ZooEncoder, residual_stages
from desupcon.models.stages import Stages


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()  # identity, no parameters
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ZooBasicBlock(nn.Module):
    expansion = 1

    @property
    def last_bn(self) -> nn.BatchNorm2d:  # the BatchNorm of the residual branch before the sum
        return self.bn2

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ZooBottleneck(nn.Module):
    expansion = 4

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        pre = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out))))) + self.shortcut(x)
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ZooResNet(ZooEncoder):
    def __init__(self, block, layers: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2)), start=1):
            stage = []
            for b in range(n):
                stage.append(block(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        self.declared_stage_channels = [64, *(p * block.expansion for p in (64, 128, 256, 512))]
        for m in self.modules():  # the original leaves the classifier at PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then each stage's output; preact: its last block's sum before the ReLU."""
        return residual_stages(self, F.relu(self.bn1(self.conv1(x))), preact)

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [getattr(self, f"layer{i}")[-1].last_bn for i in range(1, 5)]
