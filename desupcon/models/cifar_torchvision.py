"""torchvision's ResNets with the CIFAR stem (the published teacher and student), in torchvision's
state-dict layout (`conv1`, `bn1`, `layer1..4` with `downsample`, `fc`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from desupcon.models.stages import Stages, StagedEncoder

BLOCKS = {"basic": torchvision.models.resnet.BasicBlock, "bottleneck": torchvision.models.resnet.Bottleneck}


def _block_preact(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, the residual sum before the final ReLU) of a torchvision BasicBlock or Bottleneck:
    the arithmetic of its `forward`, with the sum kept."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    pre = out + (x if block.downsample is None else block.downsample(x))
    return torch.relu(pre), pre  # (not the block's in-place ReLU: `pre` is kept)


def _last_bn(block: nn.Module) -> nn.BatchNorm2d:
    return block.bn3 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.bn2


class CifarTorchvisionResNet(StagedEncoder, torchvision.models.ResNet):
    """torchvision ResNet with the CIFAR stem: 3x3 stride-1 first conv and no max-pool."""

    def __init__(self, block: str, layers: list[int], num_classes: int):
        super().__init__(BLOCKS[block], layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        self.feature_dim = self.fc.in_features
        expansion = BLOCKS[block].expansion
        self.declared_stage_channels = [64, *(c * expansion for c in (64, 128, 256, 512))]

    def forward_stages(self, x: torch.Tensor, preact: bool = False) -> Stages:
        """feats: the stem, then each stage's output; preact: its last block's sum before the ReLU."""
        feats = [self.relu(self.bn1(self.conv1(x)))]
        preacts = [feats[0]]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if not preact:  # (the stage itself runs: its forward hooks fire)
                feats.append(layer(feats[-1]))
                continue
            x = feats[-1]
            for block in list(layer)[:-1]:
                x = block(x)
            x, pre = _block_preact(layer[-1], x)
            feats.append(x)
            preacts.append(pre)
        return self.stages(feats, preacts if preact else None, feats[-1])

    def stage_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [_last_bn(layer[-1]) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def pool_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(feature_map), 1)
