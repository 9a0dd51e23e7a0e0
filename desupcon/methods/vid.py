"""VID, variational information distillation (Ahn et al., as RepDistiller runs it): at every stage,
the teacher's map is made likely under a Gaussian whose mean is regressed from the student's map
and whose per-channel variance is learnt, beside cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import losses
from desupcon.config.settings import method_setting, POSITIVE
from desupcon.methods.base import (CE_WEIGHT, FEAT_WEIGHT, FeatureDistillationMethod, register_method, stage_outputs,
                                   StepOutputs)

VARIANCE_EPS = 1e-5


class VariationalRegressor(nn.Module):
    """mu = three bias-free 1x1 convolutions C_s -> C_t -> C_t -> C_t with ReLUs between; the variance
    var_c = softplus(alpha_c) + 1e-5 per teacher channel, alpha starting where var = `initial_variance`."""

    def __init__(self, student_channels: int, teacher_channels: int, initial_variance: float):
        super().__init__()
        self.mean = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False))
        start = math.log(math.expm1(initial_variance - VARIANCE_EPS))  # softplus^-1
        self.alpha = nn.Parameter(torch.full((teacher_channels,), start))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + VARIANCE_EPS


@register_method
class VIDMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * sum_i mean(0.5 ((mu_i - t_i)^2 / var_i + log var_i)) over the
    stage outputs feats[1..n] (paired in order, brought to one size before the regression). The
    variances train with the regressors, as RepDistiller and the paper do; mdistiller's runs kept
    them fixed at their start (its variances were never registered): `--vid-fixed-variance`."""

    name, label = "vid", "VID"
    settings = (CE_WEIGHT, FEAT_WEIGHT,
                method_setting("vid_initial_variance", None, float, "VID's variance at the start (5)", "vidvar",
                               POSITIVE, 5.0),
                method_setting("vid_learn_variance", "--vid-learn-variance", bool,
                               "VID's variances train with the regressors (default: RepDistiller, the paper)",
                               "vidlearn", default=True, off_flag="--vid-fixed-variance",
                               off_help="VID's variances stay at their start (mdistiller's runs)"))
    defaults = {"ce_weight": 1.0, "feat_weight": 1.0}
    comparisons = {"feature": 8}

    def setup(self, dataset, student, teacher) -> None:
        size = (dataset.image_size, dataset.image_size)
        pairs = zip(student.encoder.stage_shapes(size)[1:], teacher.encoder.stage_shapes(size)[1:])
        self.regressors = nn.ModuleList(VariationalRegressor(s[0], t[0], self.cfg.vid_initial_variance)
                                        for s, t in pairs)
        for regressor in self.regressors:
            regressor.alpha.requires_grad_(self.cfg.vid_learn_variance)

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        total = 0.0
        for regressor, s, t in zip(self.regressors, *stage_outputs(out)):
            s, t = losses.match_spatial(s, t)
            total = total + losses.vid_loss(regressor.mean(s), t, regressor.variance())
        return total
