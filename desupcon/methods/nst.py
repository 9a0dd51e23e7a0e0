"""NST, neuron selectivity transfer (Huang and Wang, as mdistiller and RepDistiller run it): the
distributions of the stage maps' channels matched to the teacher's by a polynomial-kernel MMD."""

from __future__ import annotations

import torch

from desupcon import losses
from desupcon.methods.base import FeatureDistillationMethod, register_method, stage_outputs, StepOutputs


@register_method
class NeuronSelectivityMethod(FeatureDistillationMethod):
    """ce_weight * CE + feat_weight * sum_i MMD_i over the stage outputs feats[1..n] of both models
    (paired in order, brought to one size), with the degree-2 polynomial kernel without offset on the
    channels' normalised maps (`losses.nst_loss`). One view."""

    name, label = "nst", "NST"
    defaults = {"ce_weight": 1.0, "feat_weight": 50.0}
    comparisons = {"feature": 7}

    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        return losses.nst_loss(*stage_outputs(out))
