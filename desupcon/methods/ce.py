"""The undistilled student."""

from __future__ import annotations

import torch.nn.functional as F

from desupcon.methods.base import Method, register_method


@register_method
class CrossEntropyMethod(Method):
    """The undistilled student: cross-entropy on its own classifier, one view."""

    name, label = "ce", "CE student"
    uses_teacher = False
    views = 1
    online_classifier = False
    gathers_batch = False
    uses_every_parameter = False  # the projector gets no gradient

    def representation_losses(self, out):
        return {"ce": F.cross_entropy(out.student_logits, out.labels)}
