"""VGG with BatchNorm: five blocks of 3x3 conv-BN(-ReLU), max-pooling between the first four."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.models.encoder import ZooEncoder, kaiming_fan_out
from desupcon.models.stages import Stages


VGG_LAYOUTS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _vgg_block(widths: tuple[int, ...], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU per width, without the last ReLU (the forward applies it): the original's
    module indices (conv 3i, BN 3i + 1)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(ZooEncoder):
    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        layout = VGG_LAYOUTS[depth]
        in_channels = 3
        for i, widths in enumerate(layout):
            setattr(self, f"block{i}", _vgg_block(widths, in_channels))
            in_channels = widths[-1]
        self.fc = nn.Linear(512, num_classes)
        self.feature_dim = 512
        self.declared_stage_channels = [widths[-1] for widths in layout]
        kaiming_fan_out(self, linear_std=0.01)

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: each block's ReLU output before its max-pool (block 0 the stem, blocks 1-4 the
        stages); preact: the block's last BatchNorm output."""
        side = x.shape[2]
        feats, preacts = [], []
        for i in range(5):
            if i in (1, 2, 3) or (i == 4 and side == 64):  # the original pools a fourth time only at 64x64
                x = F.max_pool2d(x, 2, 2)
            pre = getattr(self, f"block{i}")(x)
            x = F.relu(pre)
            feats.append(x)
            preacts.append(pre)
        return self.stages(feats, [feats[0], *preacts[1:]] if preact else None, feats[-1])

    def last_stage_modules(self) -> list[nn.Module]:
        return [self.block4]

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [getattr(self, f"block{i}")[-1] for i in range(1, 5)]
