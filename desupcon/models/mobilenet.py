"""MobileNetV2, the tables' variant: expansion 6, width x0.5, stride-2 stem, 1280-channel last conv."""

from __future__ import annotations

import torch
import torch.nn as nn

from desupcon.models.encoder import ZooEncoder, kaiming_fan_out
from desupcon.models.stages import Stages


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection (the expansion conv is kept even at
    ratio 1, as in the original); a residual where the shape allows."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, channels, blocks, first stride) of each stage, channels before the width multiplier
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(ZooEncoder):
    def __init__(self, num_classes: int, expansion: int = 6, width: float = 0.5):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        stages = []
        for t, c, n, s in MOBILENETV2_STAGES:
            out = int(c * width)
            t = expansion if t != 1 else 1
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        self.conv2 = _conv_bn_relu(channels, 1280, 1, 1)
        self.fc = nn.Linear(1280, num_classes)
        self.feature_dim = 1280
        self.declared_stage_channels = [int(32 * width), *(int(MOBILENETV2_STAGES[k][1] * width)
                                                           for k in self.STAGE_BLOCKS)]
        # the original's normal(0, sqrt(2 / (k * k * out_channels))) is Kaiming fan-out
        kaiming_fan_out(self, linear_std=0.01)

    STAGE_BLOCKS = (1, 2, 4, 6)  # the block groups whose outputs are the stages

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then the outputs of block groups 1, 2, 4 and 6 (linear bottlenecks,
        so preact is the same tensors); the final map is the 1x1 conv to 1280 after them."""
        x = self.conv1(x)
        feats = [x]
        for k, stage in enumerate(self.blocks):
            x = stage(x)
            if k in self.STAGE_BLOCKS:
                feats.append(x)
        return self.stages(feats, list(feats) if preact else None, self.conv2(x))

    def last_stage_modules(self) -> list[nn.Module]:
        """The block groups after the last but one stage's, and the final 1x1 convolution."""
        return [*self.blocks[self.STAGE_BLOCKS[-2] + 1:], self.conv2]

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[k][-1].conv[-1] for k in self.STAGE_BLOCKS]
