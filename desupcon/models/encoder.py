"""What every CIFAR encoder of the zoo shares: the pooled tail and classifier (`ZooEncoder`), the
originals' initialisation, and the stages of encoders built from residual stages `layer1..n`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon.models.stages import run_stage, Stages, StagedEncoder


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def kaiming_fan_out(module: nn.Module, linear_std: float | None = None) -> None:
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
