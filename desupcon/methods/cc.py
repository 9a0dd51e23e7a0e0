"""CC, correlation congruence (Peng et al., as RepDistiller runs it): linear embeddings of both
models' pooled features, trained with the student, compared over consecutive samples, beside CE."""

from __future__ import annotations

import torch
import torch.nn as nn

from desupcon import losses
from desupcon.config.settings import AT_LEAST_ONE, method_setting
from desupcon.methods.base import (CE_WEIGHT, FEAT_WEIGHT, FeatureDistillationMethod, POOLED_FEATURES,
                                   register_method, StepOutputs)


@register_method
class CorrelationCongruenceMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * (1 / (B - 1)) sum_i sum_d |e_s - e_t|_{i,d} |e_s - e_t|_{i+1,d},
    e = Linear(D -> cc_dim) of each model's pooled features, both embeddings trained (the teacher's
    features detached): RepDistiller's form, which made the published figures (the paper's kernel
    form is another method). It couples consecutive samples of each process's batch. One view."""

    name, label = "cc", "CC"
    settings = (CE_WEIGHT, FEAT_WEIGHT,
                method_setting("cc_dim", None, int, "CC's embedding size (128)", "ccd", AT_LEAST_ONE, 128))
    defaults = {"ce_weight": 1.0, "feat_weight": 0.02}
    comparisons = {"feature": 9}
    needs = POOLED_FEATURES

    def setup(self, dataset, student, teacher) -> None:
        self.embed_student = nn.Linear(student.encoder.feature_dim, self.cfg.cc_dim)
        self.embed_teacher = nn.Linear(teacher.encoder.feature_dim, self.cfg.cc_dim)

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        return losses.correlation_congruence_loss(self.embed_student(out.student_features),
                                                  self.embed_teacher(out.teacher_features.detach()))
