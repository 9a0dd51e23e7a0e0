"""DIST, distillation from a stronger teacher (Huang et al., as its CIFAR configuration runs it): the
students' class probabilities matched to the teacher's by Pearson correlation, across classes and
across the batch, beside cross-entropy."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.config.settings import method_setting, WEIGHT
from desupcon.methods.base import CE_WEIGHT, KD_WEIGHT, LOGIT_TEMPERATURE, register_method, StepOutputs, WARMUP
from desupcon.methods.logit import LogitDistillationMethod


@register_method
class DISTMethod(LogitDistillationMethod):
    """ce_weight * CE + kd_weight * (dist_inter * inter + dist_intra * intra), T = 4 on CIFAR: inter
    correlates each sample's probabilities with the teacher's, intra each class's probabilities over
    the batch (`losses.dist_loss`). The CIFAR configuration's 1 CE + 2 L is the default. One view."""

    name, label = "dist", "DIST"
    settings = (CE_WEIGHT, KD_WEIGHT, LOGIT_TEMPERATURE, WARMUP,
                method_setting("dist_inter", "--dist-inter", float, "DIST's weight of the inter-class term (1)",
                               "inter", WEIGHT, 1.0),
                method_setting("dist_intra", "--dist-intra", float, "DIST's weight of the intra-class term (1)",
                               "intra", WEIGHT, 1.0))
    defaults = {"ce_weight": 1.0, "kd_weight": 2.0, "logit_temperature": 4.0, "warmup": 0}
    comparisons = {"logit": 11}

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        c = self.cfg
        return c.kd_weight * losses.dist_loss(out.student_logits, out.teacher_logits, c.logit_temperature,
                                              c.dist_inter, c.dist_intra)
