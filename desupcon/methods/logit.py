"""The logit distillers (SPEC 13): KD, DKD and their logit-standardised forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desupcon.methods.base import DKD, KD, logit_term, Method, Needs, register_method, StepOutputs, warmup_factor


class LogitDistillationMethod(Method):
    """Logit distillers (SPEC 13): one view, CE on the student's own classifier (weight
    `ce_weight`) plus the warmed-up distillation term on the teacher's float32 logits."""

    # the projector gets no gradient
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False)
    base = "kd"
    standardize = False

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        return logit_term(self.cfg, self.base, out.student_logits, out.teacher_logits, out.labels,
                          self.standardize)

    def representation_losses(self, out):
        c = self.cfg
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                self.cfg.method.replace("-", "_"): warmup_factor(c.warmup, out.epoch) * self.distillation(out)}


@register_method
class KDMethod(LogitDistillationMethod):
    """Hinton's KD: 0.1 CE + 0.9 T^2 KL, T 4."""

    name, label, settings = "kd", "KD", KD
    comparisons = {"logit": 1, "feature": 1}
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "logit_temperature": 4.0, "warmup": 0}
    base = "kd"


@register_method
class KDStandardizedMethod(KDMethod):
    """KD on z-scored logits with the LSKD calibration (T 2, KD weight 9)."""

    name, label = "kd-ls", "KD+LS"
    comparisons = {"logit": 3}
    defaults = {"ce_weight": 0.1, "kd_weight": 9.0, "logit_temperature": 2.0, "warmup": 0}
    standardize = True


@register_method
class DKDMethod(LogitDistillationMethod):
    """Decoupled KD: CE + warm-up x (alpha TCKD + beta NCKD); beta follows the pair (SPEC 17)."""

    name, label, settings = "dkd", "DKD", DKD
    comparisons = {"logit": 2}
    defaults = {"ce_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "logit_temperature": 4.0, "warmup": 20}
    base = "dkd"


@register_method
class DKDStandardizedMethod(DKDMethod):
    """DKD on z-scored logits with the LSKD calibration (T 2, alpha and beta x 9)."""

    name, label = "dkd-ls", "DKD+LS"
    comparisons = {"logit": 4}
    defaults = {"ce_weight": 1.0, "dkd_alpha": 9.0, "dkd_beta": 72.0, "logit_temperature": 2.0, "warmup": 20}
    standardize = True
