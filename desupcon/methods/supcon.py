"""Supervised contrastive learning on the student alone (SupCon)."""

from __future__ import annotations

from desupcon import losses
from desupcon.methods.base import COMBO, Method, Needs, register_method, TEMPERATURE


@register_method
class SupConMethod(Method):
    name, label, settings = "supcon", "SupCon", (TEMPERATURE, *COMBO)
    two_stage_phase1 = True
    needs = Needs(teacher=False, teacher_head=False)  # (a logit term reads the teacher's logits, never its projection)

    def representation_losses(self, out):
        return {"supcon": losses.supcon_loss(out.student_projection, out.labels, self.cfg.temperature)}
