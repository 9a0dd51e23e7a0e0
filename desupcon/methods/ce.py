"""The undistilled student."""

from __future__ import annotations

import torch.nn.functional as F

from desupcon.methods.base import Method, Needs, register_method


@register_method
class CrossEntropyMethod(Method):
    """The undistilled student: cross-entropy on its own classifier, one view."""

    name, label = "ce", "CE student"
    comparisons = {"logit": 0, "feature": 0}
    # the projector gets no gradient
    needs = Needs(views=1, teacher=False, teacher_head=False, online_classifier=False, gathers_batch=False,
                  every_parameter=False)

    def representation_losses(self, out):
        return {"ce": F.cross_entropy(out.student_logits, out.labels)}
