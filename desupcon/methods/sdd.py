"""Scale-decoupled distillation (SPEC 13): the base loss on every region of the final maps."""

from __future__ import annotations

from dataclasses import replace

import torch

from desupcon import losses
from desupcon.config.settings import method_setting, WEIGHT
from desupcon.methods.base import DKD, KD, register_method, StepOutputs
from desupcon.models.stages import StageNeeds
from desupcon.methods.logit import DKDMethod, DKDStandardizedMethod, KDMethod, LogitDistillationMethod


SDD = (
    method_setting("sdd_scales", "--sdd-scales", [int], "SDD's pooling levels M (default 1 2 4; SD-KD 1 2)", "M",
                   default=(1, 2, 4)),
    method_setting("complementary_weight", "--complementary-weight", float,
                   "SDD's weight of regions whose teacher prediction differs from the global one", "cw", WEIGHT, 2.0),
)


class ScaleDecoupledMethod(LogitDistillationMethod):
    """SDD: the base loss on every region of the final feature maps (levels `sdd_scales`), each
    model's own classifier applied per region, complementary regions weighted up."""

    needs = replace(LogitDistillationMethod.needs, student_stages=StageNeeds(final_map=True),
                    teacher_stages=StageNeeds(final_map=True), calls_student_modules=True)
    base = "dkd"
    settings = (*DKD, *SDD)

    def setup(self, dataset, student, teacher) -> None:
        # each model's own classifier, applied per region: read, not owned
        self.refer_to(student_classifier=student.classifier, teacher_classifier=teacher.encoder.fc)

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        c = self.cfg
        scales = tuple(c.sdd_scales)
        student = losses.region_logits(out.student_feature_map, self.student_classifier, scales)
        teacher = losses.region_logits(out.teacher_feature_map, self.teacher_classifier, scales)
        weight = c.kd_weight if self.base == "kd" else 1.0
        return weight * losses.sdd_loss(student, teacher, out.labels, base=self.base, alpha=c.dkd_alpha,
                                         beta=c.dkd_beta, temperature=c.logit_temperature,
                                         complementary_weight=c.complementary_weight,
                                         standardize=self.standardize)


@register_method
class SDKDMethod(ScaleDecoupledMethod):
    name, label, settings = "sd-kd", "SD-KD", (*KD, *SDD)
    comparisons = {"logit": 5}
    defaults = {**KDMethod.defaults, "sdd_scales": [1, 2]}  # the published SD-KD used M = [1, 2]
    base = "kd"


@register_method
class SDDKDMethod(ScaleDecoupledMethod):
    name, label = "sd-dkd", "SD-DKD"
    comparisons = {"logit": 6}
    defaults = DKDMethod.defaults
    base = "dkd"


@register_method
class SDDLSKDMethod(ScaleDecoupledMethod):
    """The fusion (seed 003): SDD with DKD as base on z-score standardised region logits, with the
    seed's settings (alpha 1, beta 8, T 4, W 20, M 1 2 4)."""

    name, label = "sdd-lskd", "SDD-LSKD"
    comparisons = {"logit": 7}
    defaults = DKDMethod.defaults
    base = "dkd"
    standardize = True


@register_method
class SDDLSKDCalibratedMethod(SDDLSKDMethod):
    """The fusion with the LSKD calibration (alpha 9, beta 72, T 2, W 20)."""

    name, label = "sdd-lskd-calibrated", "SDD-LSKD (LSKD calibration)"
    comparisons = {"logit": 8}
    defaults = DKDStandardizedMethod.defaults
