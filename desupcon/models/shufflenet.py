"""ShuffleNet V1 (groups 3) and V2 (x1): 1x1 stems at full resolution, three stages."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.models.encoder import ZooEncoder, residual_stages
from desupcon.models.stages import Stages


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, g * c, H, W) -> channels reordered c-major: the group-interleaving permutation."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an average-pooled
    input instead of adding it. The first block after the 24-channel stem uses one group in its
    first conv (the stem is too narrow to split)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, its value before the final ReLU)."""
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        pre = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ShuffleNetV1(ZooEncoder):
    def __init__(self, num_classes: int, out_planes=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (planes, n) in enumerate(zip(out_planes, blocks), start=1):
            layer = []
            for b in range(n):
                # the stride-2 block concatenates its input, so it makes only the missing channels
                layer.append(ShuffleV1Block(in_planes, planes - (in_planes if b == 0 else 0),
                                            2 if b == 0 else 1, groups))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        self.declared_stage_channels = [24, *out_planes]

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then each stage's output; preact: its last block's sum before the ReLU."""
        return residual_stages(self, F.relu(self.bn1(self.conv1(x))), preact)


class ShuffleV2Block(nn.Module):
    """Half the channels pass through; the other half go 1x1, depthwise 3x3, 1x1; then shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the concatenation before the branch's last ReLU and before the shuffle: the
        original's pre-activation, in its unshuffled channel order)."""
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return channel_shuffle(torch.cat([kept, F.relu(out)], 1), 2), torch.cat([kept, out], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: a depthwise-then-1x1 branch and a 1x1-depthwise-1x1 branch, concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(ZooEncoder):
    def __init__(self, num_classes: int, out_channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for i, (channels, n) in enumerate(zip(out_channels[:3], blocks), start=1):
            layer = [ShuffleV2Down(in_channels, channels), *[ShuffleV2Block(channels) for _ in range(n)]]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.fc = nn.Linear(out_channels[3], num_classes)
        self.feature_dim = out_channels[3]
        self.declared_stage_channels = [24, *out_channels[:3]]

    def last_stage_modules(self) -> list[nn.Module]:
        return [self.layer3, self.conv2, self.bn2]

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then each stage's output (after its shuffle); preact: see the block's
        `forward_preact`; the final map is the 1x1 conv to 1024 after the stages."""
        stages = residual_stages(self, F.relu(self.bn1(self.conv1(x))), preact)
        final_map = F.relu(self.bn2(self.conv2(stages.feats[-1])))
        return self.stages(list(stages.feats), None if stages.preact is None else list(stages.preact), final_map)
