"""PKT, probabilistic knowledge transfer (Passalis and Tefas, as mdistiller and RepDistiller run it):
the batch's cosine-similarity distribution of the pooled features matched to the teacher's."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.methods.base import FeatureDistillationMethod, POOLED_FEATURES, register_method, StepOutputs


@register_method
class ProbabilisticTransferMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * mean_ij P_t log((P_t + eps) / (P_s + eps)) with P each model's
    row-normalised (cos + 1) / 2 similarities of the pooled features over the batch (a mean over all
    B^2 entries: hence the large weight, 30000). It couples the samples of each process's batch
    (the originals ran on one GPU). One view."""

    name, label = "pkt", "PKT"
    defaults = {"ce_weight": 1.0, "feat_weight": 30000.0}
    comparisons = {"feature": 5}
    needs = POOLED_FEATURES

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        return losses.pkt_loss(out.student_features, out.teacher_features)
