"""torchvision's ResNets with the CIFAR stem (the published teacher and student), in torchvision's
state-dict layout (`conv1`, `bn1`, `layer1..4` with `downsample`, `fc`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

BLOCKS = {"basic": torchvision.models.resnet.BasicBlock, "bottleneck": torchvision.models.resnet.Bottleneck}


class CifarTorchvisionResNet(torchvision.models.ResNet):
    """torchvision ResNet with the CIFAR stem: 3x3 stride-1 first conv and no max-pool."""

    def __init__(self, block: str, layers: list[int], num_classes: int):
        super().__init__(BLOCKS[block], layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        self.feature_dim = self.fc.in_features

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C, H, W): after the last ReLU, before pooling."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(feature_map), 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_features(self.forward_feature_map(x))
