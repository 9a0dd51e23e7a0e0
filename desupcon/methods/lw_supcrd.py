"""LW-SupCRD: pulls and pushes weighted by the teacher's class probabilities (SPEC 4)."""

from __future__ import annotations

from desupcon import losses
from desupcon.config.settings import method_setting, NON_NEGATIVE, POSITIVE
from desupcon.methods.base import BANK, BankMixin, COMBO, Method, register_method, StepOutputs, TEMPERATURE


LW = (
    method_setting("alpha", "--alpha", float, "LW-SupCRD pull weight alpha (the loss is divided by it)", "alpha",
                   POSITIVE, 1.0),
    method_setting("beta", "--beta", float, "LW-SupCRD push weight beta", "beta", NON_NEGATIVE, 10.0),
    TEMPERATURE,
    method_setting("adaptive_beta", "--adaptive-beta", bool, "beta_i = beta / (p_i(y_i) + 0.5) (default)",
                   "adaptive", default=True, off_flag="--no-adaptive-beta", off_help="constant beta"),
    method_setting("kd_temperature", "--kd-temperature", float,
                   "temperature of the teacher softmax that weights LW-SupCRD", "kdT", POSITIVE, 1.0),
)


@register_method
class LWSupCRDMethod(BankMixin, Method):
    name, label, settings = "lw-supcrd", "LW-SupCRD", (*LW, *BANK, *COMBO)
    comparisons = {"logit": 10, "feature": 100}
    two_stage_phase1 = True

    def lw_kwargs(self, out: StepOutputs) -> dict:
        c = self.cfg
        return dict(alpha=c.alpha, beta=c.beta, temperature=c.temperature,
                    adaptive_beta=c.adaptive_beta, kd_temperature=c.kd_temperature,
                    bank=out.bank_embeddings, bank_labels=out.bank_labels,
                    bank_positives=c.bank_mode == "class-aware")

    def representation_losses(self, out):
        return {"lw_supcrd": losses.lw_supcrd_loss(out.student_projection, out.teacher_projection,
                                                   out.teacher_logits, out.labels, **self.lw_kwargs(out))}
