"""The KD literature's CIFAR-100 model zoo (SPEC 2 and 17) beyond the small ResNets.

Wide ResNets, VGG with BatchNorm, the tables' half-width MobileNetV2, ShuffleNet V1 / V2 and the
zoo's own CIFAR ResNet18/34/50 (`shortcut`, `linear`), built with exactly the parameters of the
literature's `models/cifar` (mdistiller and RepDistiller share it) and under the same parameter
names, so that a released teacher file loads as it is. The one renaming is the classifier: every
encoder here calls it `fc` (what the wrappers use); the original's name for it is in
`ORIGINAL_CLASSIFIER` and `models.normalise_state_dict_layout` maps it.

Every encoder exposes `forward_stages` (the literature's stage outputs and pre-activations, and the
final map: `stages.py`), `forward_feature_map` (the final map SDD pools, after the last
BatchNorm/ReLU), `pool_features`, `forward_features` and `feature_dim`, like the ResNets of
`models.py`, and starts from its original's initialisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.models.stages import batchnorm_without_update, run_stage, Stages, StagedEncoder


class ZooEncoder(StagedEncoder, nn.Module):
    """The tail every CIFAR encoder shares (the zoo's and models.SmallCifarResNet): global average
    pooling of the final map, then the linear classifier `fc`. A subclass sets `feature_dim`, `fc`
    and `declared_stage_channels` and defines `forward_stages(x, preact)` (whose final map is
    `forward_feature_map(x)`)."""

    feature_dim: int

    def pool_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        # The originals pool with a fixed window equal to the map at 32x32 input; the global mean
        # is the same number there and stays defined at other sizes.
        return F.adaptive_avg_pool2d(feature_map, 1).flatten(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_features(self.forward_feature_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _kaiming_fan_out(module: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan-out) convolutions, BatchNorm 1/0; linear layers N(0, std) with zero bias
    when `linear_std` is given (VGG, MobileNetV2), else a zero bias only (WRN)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Wide ResNets (wrn_D_W): pre-activation blocks, widths 16, 16W, 32W, 64W, (D - 4) / 6 blocks a stage
# ----------------------------------------------------------------------------------------------

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
        _kaiming_fan_out(self)

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

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]


# ----------------------------------------------------------------------------------------------
# VGG with BatchNorm: five blocks of 3x3 conv-BN(-ReLU), max-pooling between the first four
# ----------------------------------------------------------------------------------------------

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
        _kaiming_fan_out(self, linear_std=0.01)

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

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [getattr(self, f"block{i}")[-1] for i in range(1, 5)]


# ----------------------------------------------------------------------------------------------
# MobileNetV2, the tables' variant: expansion 6, width x0.5, stride-2 stem, 1280-channel last conv
# ----------------------------------------------------------------------------------------------

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
        _kaiming_fan_out(self, linear_std=0.01)

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

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[k][-1].conv[-1] for k in self.STAGE_BLOCKS]


# ----------------------------------------------------------------------------------------------
# ShuffleNet V1 (groups 3) and V2 (x1): 1x1 stems at full resolution, three stages
# ----------------------------------------------------------------------------------------------

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

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then each stage's output (after its shuffle); preact: see the block's
        `forward_preact`; the final map is the 1x1 conv to 1024 after the stages."""
        stages = residual_stages(self, F.relu(self.bn1(self.conv1(x))), preact)
        final_map = F.relu(self.bn2(self.conv2(stages.feats[-1])))
        return self.stages(list(stages.feats), None if stages.preact is None else list(stages.preact), final_map)


# ----------------------------------------------------------------------------------------------
# The zoo's CIFAR ResNet18/34/50 (3x3 stem, no max-pool; `shortcut` projections, `linear` classifier)
# ----------------------------------------------------------------------------------------------

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


def residual_stages(encoder: ZooEncoder, stem: torch.Tensor, preact: bool) -> Stages:
    """The stages `layer1..n` of an encoder whose stage outputs end in a block with `forward_preact`
    (the ResNets and ShuffleNets); its final map is the last stage's output."""
    feats, preacts = [stem], [stem]
    i = 1
    while hasattr(encoder, f"layer{i}"):
        out, pre = run_stage(getattr(encoder, f"layer{i}"), feats[-1], preact)
        feats.append(out)
        preacts.append(pre)
        i += 1
    return encoder.stages(feats, preacts if preact else None, feats[-1])


# name as the literature writes it -> builder(num_classes)
ZOO = {
    **{f"wrn_{d}_{w}": (lambda d, w: lambda k: WideResNet(d, w, k))(d, w)
       for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": (lambda d: lambda k: VGG(d, k))(d) for d in VGG_LAYOUTS},
    "MobileNetV2": lambda k: MobileNetV2(k),
    "ShuffleV1": lambda k: ShuffleNetV1(k),
    "ShuffleV2": lambda k: ShuffleNetV2(k),
    "ResNet18": lambda k: ZooResNet(ZooBasicBlock, (2, 2, 2, 2), k),
    "ResNet34": lambda k: ZooResNet(ZooBasicBlock, (3, 4, 6, 3), k),
    "ResNet50": lambda k: ZooResNet(ZooBottleneck, (3, 4, 6, 3), k),
}

# The original's name of the classifier where it is not `fc` (its parameters load into `fc`).
ORIGINAL_CLASSIFIER = {
    **{f"vgg{d}": "classifier" for d in VGG_LAYOUTS},
    "MobileNetV2": "classifier.0",
    "ShuffleV1": "linear", "ShuffleV2": "linear",
    "ResNet18": "linear", "ResNet34": "linear", "ResNet50": "linear",
}

# mdistiller's released CIFAR-100 teachers (`cifar_teachers.tar`): folder name per architecture.
RELEASED_TEACHERS = {arch: f"{arch}_vanilla" for arch in
                     ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")}
RELEASED_CHECKPOINT = "ckpt_epoch_240.pth"

