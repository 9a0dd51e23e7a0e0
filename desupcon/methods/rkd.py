"""RKD, relational knowledge distillation (Park et al., as mdistiller and RepDistiller run it): the
distances and angles between the batch's pooled features matched to the teacher's, beside CE."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.config.settings import method_setting, WEIGHT
from desupcon.methods.base import (CE_WEIGHT, FEAT_WEIGHT, FeatureDistillationMethod, POOLED_FEATURES,
                                   register_method, StepOutputs)


@register_method
class RelationalDistillationMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * (rkd_distance * L_D + rkd_angle * L_A) on the pooled features:
    L_D compares the batch's normalised pairwise distances, L_A its triplet angles (SmoothL1, means).
    It couples the samples of each process's batch (the originals ran on one GPU). One view."""

    name, label = "rkd", "RKD"
    settings = (CE_WEIGHT, FEAT_WEIGHT,
                method_setting("rkd_distance", "--rkd-distance", float, "RKD's weight of the distance term (25)",
                               "rkdd", WEIGHT, 25.0),
                method_setting("rkd_angle", "--rkd-angle", float, "RKD's weight of the angle term (50)", "rkda",
                               WEIGHT, 50.0))
    defaults = {"ce_weight": 1.0, "feat_weight": 1.0}
    comparisons = {"feature": 6}
    needs = POOLED_FEATURES

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        return losses.rkd_loss(out.student_features, out.teacher_features, self.cfg.rkd_distance, self.cfg.rkd_angle)
