"""AT, attention transfer (Zagoruyko and Komodakis, as mdistiller and RepDistiller run it): the
student's spatial attention maps at every stage matched to the teacher's, beside cross-entropy."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.config.settings import method_setting, POSITIVE
from desupcon.methods.base import (CE_WEIGHT, FEAT_WEIGHT, FeatureDistillationMethod, register_method, stage_outputs,
                                   StepOutputs)


@register_method
class AttentionTransferMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * sum_i mean((a(s_i) - a(t_i))^2) over the stage outputs
    feats[1..n] of both models (paired in order, the larger map of a pair pooled to the other's
    size), with a(f) = normalize(mean over channels of f^p) per sample. The originals' mean over
    channels and squared difference (not the paper's sum and norm) are the default. One view."""

    name, label = "at", "AT"
    settings = (CE_WEIGHT, FEAT_WEIGHT,
                method_setting("at_p", "--at-p", float, "AT's power p of the attention map (2)", "atp", POSITIVE, 2.0))
    defaults = {"ce_weight": 1.0, "feat_weight": 1000.0}
    comparisons = {"feature": 3}

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        return losses.attention_transfer_loss(*stage_outputs(out), self.cfg.at_p)
