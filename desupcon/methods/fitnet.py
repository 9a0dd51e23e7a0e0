"""FitNet (Romero et al., as mdistiller and RepDistiller run it): the student's hint stage, through a
trainable regressor, matched to the teacher's by mean squared error, beside cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import losses
from desupcon.config.settings import method_setting
from desupcon.errors import ConfigError
from desupcon.methods.base import CE_WEIGHT, FEAT_WEIGHT, FeatureDistillationMethod, register_method, StepOutputs


class HintRegressor(nn.Module):
    """Maps the student's (C_s, H_s, W_s) hint map onto the teacher's (C_t, H_t, W_t): a convolution
    chosen from the two heights, then BatchNorm (batch statistics while training) and ReLU.

    - H_s = 2 H_t: 3x3 convolution, stride 2, padding 1;
    - 2 H_s = H_t: 4x4 transposed convolution, stride 2, padding 1;
    - H_s >= H_t: a convolution of kernel (1 + H_s - H_t) x (1 + W_s - W_t) (1x1 for equal sizes);
    - a student map smaller than half the teacher's cannot be regressed.
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]):
        super().__init__()
        (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
        if h_s == 2 * h_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:
            raise ConfigError(f"fitnet: the student's hint map ({c_s}x{h_s}x{w_s}) is smaller than half the "
                              f"teacher's ({c_t}x{h_t}x{w_t}); choose another --hint-layer")
        self.bn = nn.BatchNorm2d(c_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@register_method
class FitNetMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * mean((regressor(f_s[h]) - f_t[h])^2), with f[h] the stage-h
    output of each model (post-ReLU; WRN's raw residual stream) and h = `hint_layer`. One view; the
    regressor trains with the student's optimiser settings, weight decay included, as in the
    originals; there is no separate hint pre-training stage (neither original has one)."""

    name, label = "fitnet", "FitNet"
    settings = (
        CE_WEIGHT, FEAT_WEIGHT,
        method_setting("hint_layer", "--hint-layer", int, "FitNet's hint stage h: feats[h] of both models (2)",
                       "hint", (lambda v: v >= 0, ">= 0 (a stage index: 0 is the stem)"), 2),
    )
    defaults = {"ce_weight": 1.0, "feat_weight": 100.0}
    comparisons = {"feature": 2}

    def setup(self, dataset, student, teacher) -> None:
        h, size = self.cfg.hint_layer, (dataset.image_size, dataset.image_size)
        shapes = []
        for who, encoder in (("student", student.encoder), ("teacher", teacher.encoder)):
            stages = encoder.stage_shapes(size)
            if h >= len(stages):
                raise ConfigError(f"fitnet: --hint-layer {h} is past the {who}'s last stage (its stages are "
                                  f"0..{len(stages) - 1}); choose one of those")
            shapes.append(stages[h])
        self.regressor = HintRegressor(*shapes)

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        h = self.cfg.hint_layer
        hint = self.regressor(out.student_stages.feats[h].float())
        return losses.hint_loss(hint, out.teacher_stages.feats[h].float())
