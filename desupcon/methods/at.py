"""AT, attention transfer (Zagoruyko and Komodakis, as mdistiller and RepDistiller run it): the
student's spatial attention maps at every stage matched to the teacher's, beside cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desupcon import losses
from desupcon.config.settings import method_setting, POSITIVE
from desupcon.methods.base import CE_WEIGHT, FEAT_WEIGHT, Method, Needs, register_method, StepOutputs
from desupcon.models.stages import StageNeeds


@register_method
class AttentionTransferMethod(Method):
    """ce_weight * CE + feat_weight * sum_i mean((a(s_i) - a(t_i))^2) over the stage outputs
    feats[1..n] of both models (paired in order, the larger map of a pair pooled to the other's
    size), with a(f) = normalize(mean over channels of f^p) per sample. The originals' mean over
    channels and squared difference (not the paper's sum and norm) are the default. One view."""

    name, label = "at", "AT"
    settings = (CE_WEIGHT, FEAT_WEIGHT,
                method_setting("at_p", "--at-p", float, "AT's power p of the attention map (2)", "atp", POSITIVE, 2.0))
    defaults = {"ce_weight": 1.0, "feat_weight": 1000.0}
    comparisons = {"feature": 3}
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False,
                  student_stages=StageNeeds(stages=True), teacher_stages=StageNeeds(stages=True))

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        c = self.cfg
        student = [f.float() for f in out.student_stages.feats[1:]]
        teacher = [f.float() for f in out.teacher_stages.feats[1:]]
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                "at": c.feat_weight * losses.attention_transfer_loss(student, teacher, c.at_p)}
