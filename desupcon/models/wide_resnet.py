"""Wide ResNets (wrn_D_W): pre-activation blocks, widths 16, 16W, 32W, 64W, (D - 4) / 6 blocks a stage."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.models.encoder import ZooEncoder, kaiming_fan_out
from desupcon.models.stages import batchnorm_without_update, Stages


class WideBlock(nn.Module):
    """BN-ReLU-conv twice; where the width changes, the first BN-ReLU also feeds a 1x1 shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0,
                                                                     bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # the identity path carries the block's raw input; the projection the activated one
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class WideStage(nn.Module):
    """A stage of wide blocks (the original nests them as `blockN.layer.I`)."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ZooEncoder):
    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"wide ResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self.declared_stage_channels = widths
        kaiming_fan_out(self)

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem conv, then each stage's raw residual stream (no BN, no ReLU); preact: the
        BatchNorm that reads each (`stage_batchnorms`) applied to it, without a second update of
        its statistics."""
        feats = [self.conv1(x)]
        for stage in (self.block1, self.block2, self.block3):
            feats.append(stage(feats[-1]))
        final_map = F.relu(self.bn1(feats[-1]))
        preacts = None
        if preact:
            preacts = [feats[0], *(batchnorm_without_update(bn, f) for bn, f in zip(self.stage_batchnorms(), feats[1:]))]
        return self.stages(feats, preacts, final_map)

    def last_stage_modules(self) -> list[nn.Module]:
        return [self.block3, self.bn1]

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]
