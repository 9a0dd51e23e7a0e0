"""The hybrid: SupCon and LW-SupCRD mixed by lambda (SPEC 4 and 6)."""

from __future__ import annotations

from dataclasses import replace

import torch

from desupcon import losses
from desupcon.config import MethodConfig
from desupcon.config.settings import AT_LEAST_ONE, HYBRID_SCALINGS, method_setting, UNIT_INTERVAL
from desupcon.methods.base import BANK, COMBO, register_method
from desupcon.methods.lw_supcrd import LW, LWSupCRDMethod


@register_method
class HybridMethod(LWSupCRDMethod):
    """lambda * SupCon + (1 - lambda) * LW-SupCRD, each term divided by a running scale of itself in
    the published ("running") form, or the plain mix of SPEC 4 ("plain").

    Running form (SPEC 6): for the first `hybrid_scale_steps` steps s <- 0.9 s + 0.1 L (s starts at
    the first L), then s is frozen; L = lambda * SupCon / s_sc + (1 - lambda) * LW-SupCRD / s_lw.
    The scales are detached (no gradient) and checkpointed.
    """

    name, label = "hybrid", "Hybrid (lambda {lam})"
    two_stage_phase1 = True
    settings = (
        method_setting("lam", "--lam", float, "hybrid mix: lam * SupCon + (1 - lam) * LW-SupCRD", "lam",
                       UNIT_INTERVAL, 0.5),
        method_setting("hybrid_scaling", "--hybrid-scaling", str,
                       "hybrid terms: running (each divided by a running scale, as published) or plain", "scaling",
                       default="running", choices=HYBRID_SCALINGS),
        method_setting("hybrid_scale_steps", "--hybrid-scale-steps", int,
                       "steps during which the hybrid's running scales still move (100)", "scalesteps",
                       AT_LEAST_ONE, 100),
        *LW, *BANK, *COMBO)

    SCALE_MOMENTUM = 0.9
    needs = replace(LWSupCRDMethod.needs, graph_capturable=False)  # the running scales are Python state

    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.scales: torch.Tensor | None = None  # (s_sc, s_lw)
        self.scale_steps = 0

    def get_extra_state(self) -> dict:
        return {"scales": None if self.scales is None else self.scales.detach().cpu().clone(),
                "scale_steps": self.scale_steps}

    def set_extra_state(self, state: dict) -> None:
        scales = state.get("scales")
        self.scales = None if scales is None else scales.clone()
        self.scale_steps = int(state.get("scale_steps", 0))

    def representation_losses(self, out):
        c = self.cfg
        kwargs = self.lw_kwargs(out)
        if c.hybrid_scaling == "plain":  # SPEC 4's mix
            return {"hybrid": losses.hybrid_loss(out.student_projection, out.teacher_projection,
                                                 out.teacher_logits, out.labels, lam=c.lam, **kwargs)}
        supcon = losses.supcon_loss(out.student_projection, out.labels, c.temperature)
        lw = losses.lw_supcrd_loss(out.student_projection, out.teacher_projection, out.teacher_logits,
                                   out.labels, **kwargs)
        current = torch.stack([supcon.detach(), lw.detach()])
        if self.scale_steps < c.hybrid_scale_steps:
            if self.scales is None:
                self.scales = current
            else:
                self.scales = self.SCALE_MOMENTUM * self.scales.to(current.device) \
                    + (1 - self.SCALE_MOMENTUM) * current
            self.scale_steps += 1
        scales = self.scales.to(current.device)
        return {"hybrid": c.lam * supcon / scales[0] + (1 - c.lam) * lw / scales[1]}
