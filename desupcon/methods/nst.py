"""NST, neuron selectivity transfer (Huang and Wang, as mdistiller and RepDistiller run it): the
distributions of the stage maps' channels matched to the teacher's by a polynomial-kernel MMD."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from desupcon import losses
from desupcon.methods.base import CE_WEIGHT, FEAT_WEIGHT, Method, Needs, register_method, StepOutputs
from desupcon.models.stages import StageNeeds


@register_method
class NeuronSelectivityMethod(Method):
    """ce_weight * CE + feat_weight * sum_i MMD_i over the stage outputs feats[1..n] of both models
    (paired in order, brought to one size), with the degree-2 polynomial kernel without offset on the
    channels' normalised maps (`losses.nst_loss`). One view."""

    name, label = "nst", "NST"
    settings = (CE_WEIGHT, FEAT_WEIGHT)
    defaults = {"ce_weight": 1.0, "feat_weight": 50.0}
    comparisons = {"feature": 7}
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False,
                  student_stages=StageNeeds(stages=True), teacher_stages=StageNeeds(stages=True))

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        c = self.cfg
        student = [f.float() for f in out.student_stages.feats[1:]]
        teacher = [f.float() for f in out.teacher_stages.feats[1:]]
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                "nst": c.feat_weight * losses.nst_loss(student, teacher)}
