"""The literature's CRD (SPEC 14): NCE against momentum banks of embeddings."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from desupcon.config.settings import AT_LEAST_ONE, FRACTION, method_setting, POSITIVE, WEIGHT
from desupcon.engine import distributed
from desupcon.methods.base import CE_WEIGHT, Method, Needs, register_method, StepOutputs

log = logging.getLogger("desupcon")


@register_method
class CRDNCEMethod(Method):
    """The literature's CRD (SPEC 14): Linear(d, nce_dim) + L2 embedding heads on the student's
    and teacher's pooled features, two momentum banks, class-aware negatives, the NCE loss with
    its fixed normalising constants; CE + nce_weight * CRD. One view."""

    name, label = "crd-nce", "CRD (NCE, Tian et al.)"
    settings = (
        CE_WEIGHT,
        method_setting("nce_weight", "--nce-weight", float, "crd-nce's weight beside CE (0.8)", "ncew", WEIGHT, 0.8),
        method_setting("nce_dim", None, int, "crd-nce's embedding size", "nced", AT_LEAST_ONE, 128),
        method_setting("nce_negatives", "--nce-negatives", int, "crd-nce's negatives per anchor (16384)", "ncek",
                       (lambda v: v >= 1, ">= 1 (negatives per anchor)"), 16384),
        method_setting("nce_momentum", None, float, "crd-nce's bank momentum", "ncem", FRACTION, 0.5),
        method_setting("nce_temperature", None, float, "crd-nce's temperature", "ncet", POSITIVE, 0.07),
    )
    defaults = {"ce_weight": 1.0}
    comparisons = {"logit": 9, "feature": 90}
    two_stage_phase1 = True
    # negatives drawn on the host, the normalisers fixed from the first batch: not graph-capturable
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False,
                  graph_capturable=False, every_parameter=False)

    def setup(self, dataset, student, teacher) -> None:
        from desupcon.crd_memory import CRDMemory
        c = self.cfg
        self.embed_student = torch.nn.Linear(student.encoder.feature_dim, c.nce_dim)
        self.embed_teacher = torch.nn.Linear(teacher.encoder.feature_dim, c.nce_dim)
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        self.memory = CRDMemory(dataset.train_labels.cpu(), dim=c.nce_dim, momentum=c.nce_momentum,
                                generator=self.generator)
        # more negatives than the training set holds bring nothing new (they repeat)
        self.negatives = min(c.nce_negatives, len(dataset.train_labels))
        if self.negatives < c.nce_negatives:
            log.warning(f"crd-nce: --nce-negatives {c.nce_negatives} is more than the {self.negatives} training "
                        f"images; each anchor draws {self.negatives} (the run's name keeps the setting as given)")
        self._pending = None

    def representation_losses(self, out):
        c = self.cfg
        v_s = F.normalize(self.embed_student(out.student_features), dim=1)
        v_t = F.normalize(self.embed_teacher(out.teacher_features), dim=1)
        crd = self.memory.loss(v_s, v_t, out.indices, None, self.negatives, self.generator,
                               c.nce_temperature)
        self._pending = (out.indices, v_s.detach(), v_t.detach())
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                "crd_nce": c.nce_weight * crd}

    def after_step(self, out: StepOutputs) -> None:
        if self._pending is not None:
            indices, v_s, v_t = self._pending
            if distributed.active():  # every rank applies the global batch's update: identical banks
                indices = distributed.all_gather_no_grad(indices.to(v_s.device)).cpu()
                v_s, v_t = distributed.all_gather_no_grad(v_s), distributed.all_gather_no_grad(v_t)
            self.memory.update(indices, v_s, v_t)
            self._pending = None

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
