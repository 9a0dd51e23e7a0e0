"""TTM and WTTM, (weighted) transformed teacher matching (Zheng and Yang): the student's own
probabilities matched to the teacher's raised to a power gamma and renormalised, beside CE."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.config.settings import method_setting, POSITIVE
from desupcon.methods.base import CE_WEIGHT, KD_WEIGHT, register_method, StepOutputs, WARMUP
from desupcon.methods.logit import LogitDistillationMethod

TTM_GAMMA = method_setting("ttm_gamma", "--ttm-gamma", float,
                           "TTM/WTTM's power gamma (= 1/T) of the teacher's probabilities (0.1)", "gamma",
                           POSITIVE, 0.1)


@register_method
class TTMMethod(LogitDistillationMethod):
    """ce_weight * CE + kd_weight * mean KL(p~ || softmax(z_s)), p~ the teacher's probabilities to
    the power gamma, renormalised; no temperature on the student, no T^2. Defaults: the one setting
    the original repository gives (gamma 0.1, weight 45, vgg13 -> vgg8); its per-pair values are in
    the paper's appendix. One view."""

    name, label = "ttm", "TTM"
    settings = (CE_WEIGHT, KD_WEIGHT, TTM_GAMMA, WARMUP)
    defaults = {"ce_weight": 1.0, "kd_weight": 45.0, "ttm_gamma": 0.1, "warmup": 0}
    comparisons = {"logit": 12}
    weighted = False

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        c = self.cfg
        return c.kd_weight * losses.ttm_loss(out.student_logits, out.teacher_logits, c.ttm_gamma, self.weighted)


@register_method
class WTTMMethod(TTMMethod):
    """WTTM: TTM with each sample's KL weighted by the teacher's power sum Z (its defaults TTM's)."""

    name, label = "wttm", "WTTM"
    comparisons = {"logit": 13}
    weighted = True
