"""PKT, probabilistic knowledge transfer (Passalis and Tefas, as mdistiller and RepDistiller run it):
the batch's cosine-similarity distribution of the pooled features matched to the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desupcon import losses
from desupcon.methods.base import CE_WEIGHT, FEAT_WEIGHT, Method, Needs, register_method, StepOutputs


@register_method
class ProbabilisticTransferMethod(Method):
    """ce_weight * CE + feat_weight * mean_ij P_t log((P_t + eps) / (P_s + eps)) with P each model's
    row-normalised (cos + 1) / 2 similarities of the pooled features over the batch (a mean over all
    B^2 entries: hence the large weight, 30000). It couples the samples of each process's batch
    (the originals ran on one GPU). One view."""

    name, label = "pkt", "PKT"
    settings = (CE_WEIGHT, FEAT_WEIGHT)
    defaults = {"ce_weight": 1.0, "feat_weight": 30000.0}
    comparisons = {"feature": 5}
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False)

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        c = self.cfg
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                "pkt": c.feat_weight * losses.pkt_loss(out.student_features, out.teacher_features)}
