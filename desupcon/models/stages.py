"""An encoder's stages, in the KD literature's convention: what feature distillers read.

`forward_stages(x, preact)` returns, from the one forward pass that also gives the final map:

- `feats`: [stem output, stage 1 output, ..., stage n output];
- `preact` (only when asked): the same entries before their final ReLU (entry 0 is the stem output
  itself; an architecture whose stage outputs are linear gives them again);
- `final_map`: the map the classifier's pooling reads (`forward_feature_map`); for most
  architectures feats[n], but after one more layer for WRN (BN-ReLU), MobileNetV2 and ShuffleV2
  (1x1 conv-BN-ReLU);
- `pooled`: the global average of the final map, the classifier's input.

An encoder declares its stage channels (`stage_channels()`), gives their shapes for an input size
(`stage_shapes(hw)`, from a dry run) and the BatchNorm whose output is, or feeds, each stage's
pre-activation (`stage_batchnorms()`; None where no single BatchNorm does, the ShuffleNets).
Asking for no pre-activation computes exactly what `forward_feature_map` computes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# Named tuples rather than dataclasses: they are pytrees, so `vmap` (fused lockstep), compile and
# CUDA graphs pass them through as they pass tuples.
class Stages(NamedTuple):
    feats: tuple[torch.Tensor, ...]
    preact: tuple[torch.Tensor, ...] | None
    final_map: torch.Tensor
    pooled: torch.Tensor

    def rows(self, index) -> "Stages":
        """The same stages for the batch rows `index` (a slice or an index tensor)."""
        return Stages(tuple(f[index] for f in self.feats),
                      None if self.preact is None else tuple(f[index] for f in self.preact),
                      self.final_map[index], self.pooled[index])


class ModelOutputs(NamedTuple):
    """What a model returns for a batch, read by name: `features` (the pooled vector the classifier
    reads), `logits`, `projection` (normalised embedding; None for models without a projector),
    `final_map` and `stages` (each only when the caller asked for it, else None)."""

    features: torch.Tensor
    logits: torch.Tensor
    projection: torch.Tensor | None = None
    final_map: torch.Tensor | None = None
    stages: Stages | None = None


class StageNeeds(NamedTuple):
    """Which of a model's intermediate outputs a caller reads: the final map, the stage entries,
    and with them their pre-activations. `|` gives what a group of callers reads together."""

    final_map: bool = False
    stages: bool = False
    preact: bool = False

    def __or__(self, other: "StageNeeds") -> "StageNeeds":
        return StageNeeds(*(a or b for a, b in zip(self, other)))

    def outputs(self, stages: Stages) -> dict:
        """The `ModelOutputs` fields these needs fill from one pass's `stages`."""
        return {"final_map": stages.final_map if self.final_map else None,
                "stages": stages if self.stages or self.preact else None}


NO_STAGES = StageNeeds()


def run_stage(stage: nn.Sequential, x: torch.Tensor, preact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stage of blocks: (output, the last block's pre-activation when `preact`, else None). Without
    `preact` the stage itself runs (its forward hooks fire, as layer-by-layer analyses need); with it
    every block but the last runs its plain forward, the last its `forward_preact` (the same
    arithmetic)."""
    if not preact:
        return stage(x), None
    blocks = list(stage)
    for block in blocks[:-1]:
        x = block(x)
    return blocks[-1].forward_preact(x)


def batchnorm_without_update(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn(x)` without touching its running statistics (a second reading of a BatchNorm the forward
    already applied: training mode normalises with the batch's statistics as that call did)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=bn.training or bn.running_mean is None, momentum=0.0, eps=bn.eps)


class StagedEncoder:
    """Mixin of every encoder, which defines `forward_stages(x, preact=False) -> Stages` (the stages,
    final map and pooled vector of one pass); `forward_feature_map` and `forward_features` are its
    final map and pooled vector."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x).pooled

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C, H, W): the map pooled for the classifier."""
        return self.forward_stages(x).final_map

    def stages(self, feats: list[torch.Tensor], preacts: list[torch.Tensor] | None,
               final_map: torch.Tensor) -> Stages:
        return Stages(tuple(feats), tuple(preacts) if preacts is not None else None, final_map,
                      self.pool_features(final_map))

    def stage_channels(self) -> list[int]:
        """Channels of feats[0..n] (declared by the architecture)."""
        return list(self.declared_stage_channels)

    @torch.no_grad()
    def stage_shapes(self, input_hw: tuple[int, int] = (32, 32)) -> list[tuple[int, int, int]]:
        """(C, H, W) of feats[0..n] for inputs of `input_hw`, from a dry run of one image in eval
        mode (no statistics change; the training mode is restored)."""
        parameter = next(self.parameters())
        was_training = self.training
        self.eval()
        try:
            out = self.forward_stages(torch.zeros(1, 3, *input_hw, device=parameter.device, dtype=parameter.dtype))
        finally:
            self.train(was_training)
        return [tuple(f.shape[1:]) for f in out.feats]

    def last_stage_modules(self) -> list[nn.Module]:
        """The modules that compute the final map from feats[n-1] (the last stage and whatever
        follows it before the pooling): what fine-tuning "the last stage" trains. Residual encoders
        (stages `layer1..n`): the last of them."""
        i = 1
        while hasattr(self, f"layer{i + 1}"):
            i += 1
        return [getattr(self, f"layer{i}")]

    def stage_batchnorms(self) -> list[nn.BatchNorm2d] | None:
        """The BatchNorm whose output is, or feeds, preact[i] for i = 1..n (None: no such single
        BatchNorm)."""
        return None
