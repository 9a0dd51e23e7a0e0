"""In-batch contrastive representation distillation (CRD, SPEC 4)."""

from __future__ import annotations

from desupcon import losses
from desupcon.methods.base import BANK, BankMixin, COMBO, Method, register_method, TEMPERATURE


@register_method
class CRDMethod(BankMixin, Method):
    name, label, settings = "crd", "CRD", (TEMPERATURE, *BANK, *COMBO)
    two_stage_phase1 = True

    def representation_losses(self, out):
        return {"crd": losses.crd_loss(out.student_projection, out.teacher_projection,
                                       self.cfg.temperature, bank=out.bank_embeddings)}
