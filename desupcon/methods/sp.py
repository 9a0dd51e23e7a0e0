"""SP, similarity-preserving distillation (Tung and Mori, as mdistiller and RepDistiller run it): the
batch's pairwise similarities of the last stage's maps matched to the teacher's, beside CE."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.methods.base import FeatureDistillationMethod, register_method, StepOutputs


@register_method
class SimilarityPreservingMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * ||G^_t - G^_s||_F^2 / B^2, G = x x^T over the batch's flattened
    last-stage outputs feats[n] (not the final map of MobileNetV2 or ShuffleV2), rows L2-normalised.
    It couples the samples of each process's batch (the originals ran on one GPU). One view."""

    name, label = "sp", "SP"
    defaults = {"ce_weight": 1.0, "feat_weight": 3000.0}
    comparisons = {"feature": 4}

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        return losses.similarity_preserving_loss(out.student_stages.feats[-1].float(),
                                                 out.teacher_stages.feats[-1].float())
