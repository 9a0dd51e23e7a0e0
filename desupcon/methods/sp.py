"""SP, similarity-preserving distillation (Tung and Mori, as mdistiller and RepDistiller run it): the
batch's pairwise similarities of the last stage's maps matched to the teacher's, beside CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desupcon import losses
from desupcon.methods.base import CE_WEIGHT, FEAT_WEIGHT, Method, Needs, register_method, StepOutputs
from desupcon.models.stages import StageNeeds


@register_method
class SimilarityPreservingMethod(Method):
    """ce_weight * CE + feat_weight * ||G^_t - G^_s||_F^2 / B^2, G = x x^T over the batch's flattened
    last-stage outputs feats[n] (not the final map of MobileNetV2 or ShuffleV2), rows L2-normalised.
    It couples the samples of each process's batch (the originals ran on one GPU). One view."""

    name, label = "sp", "SP"
    settings = (CE_WEIGHT, FEAT_WEIGHT)
    defaults = {"ce_weight": 1.0, "feat_weight": 3000.0}
    comparisons = {"feature": 4}
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False,
                  student_stages=StageNeeds(stages=True), teacher_stages=StageNeeds(stages=True))

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        c = self.cfg
        loss = losses.similarity_preserving_loss(out.student_stages.feats[-1].float(),
                                                 out.teacher_stages.feats[-1].float())
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels), "sp": c.feat_weight * loss}
