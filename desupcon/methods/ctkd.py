"""CTKD, curriculum temperature for knowledge distillation (Li et al.): KD whose temperature is a
learnt parameter trained against the student through a gradient reversal that grows over the first
epochs, so the distillation gets harder as the student learns."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from desupcon import losses
from desupcon.config.settings import AT_LEAST_ONE, method_setting, POSITIVE
from desupcon.methods.base import CE_WEIGHT, KD_WEIGHT, register_method, StepOutputs, WARMUP
from desupcon.methods.logit import LogitDistillationMethod


@register_method
class CTKDMethod(LogitDistillationMethod):
    """ce_weight * CE + kd_weight * T^2 KL(softmax(z_t / T) || softmax(z_s / T)), T = 1 + 20 sigmoid(theta)
    with theta one parameter starting at 1 (T about 15.6), trained with the student's optimiser and
    weight decay, its gradient multiplied by lambda(e) = (cos(pi min(e, 10) / 10) + 1) / 2 - 1 (from
    -0.02 at epoch 1 to -1 from epoch 10): the gradient reaches T through both softmaxes and T^2.
    The original's 0.1 CE + 0.9 KD is the default. One view."""

    name, label = "ctkd", "CTKD"
    settings = (CE_WEIGHT, KD_WEIGHT, WARMUP,
                method_setting("ctkd_start", None, float, "CTKD's lowest temperature (1)", "tstart", POSITIVE, 1.0),
                method_setting("ctkd_span", None, float, "CTKD's temperature span above it (20)", "tspan", POSITIVE,
                               20.0),
                method_setting("ctkd_epochs", "--ctkd-epochs", int,
                               "CTKD: epochs over which the gradient reversal grows to -1 (10)", "tloops",
                               AT_LEAST_ONE, 10))
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "warmup": 0}
    comparisons = {"logit": 14}
    # the reversal's scale changes with the epoch, a Python value the step reads
    needs = replace(LogitDistillationMethod.needs, graph_capturable=False)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.theta = nn.Parameter(torch.ones(()))

    def temperature(self, epoch: int) -> torch.Tensor:
        c = self.cfg
        return losses.curriculum_temperature(self.theta, losses.cosine_reversal(epoch, c.ctkd_epochs),
                                             c.ctkd_start, c.ctkd_span)

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        return self.cfg.kd_weight * losses.kd_loss(out.student_logits, out.teacher_logits, self.temperature(out.epoch))
