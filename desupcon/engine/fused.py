"""Fused lockstep: the students of one architecture in a lockstep group computed as one batched
model (`torch.func.vmap` over their stacked weights), instead of one forward and backward each.

For the duration of an epoch every student's parameters and buffers become views into stacked
tensors of shape (students, ...), so one vmapped forward computes all students on the shared
batch, BatchNorm updating each student's own running statistics in place. The losses stay each
run's own, one backward runs over their sum (the students share no weight, so each gradient is
its own run's), each stacked gradient is handed to its run's parameters, and every run then takes
its own optimiser step (its learning rate, clipping, scaler and bank). The mathematics is the
solo step's; the floating-point grouping of the batched kernels may differ in the last digits.

`release` gives every parameter and buffer its own storage again (at the epoch's end, before
anything is saved), so checkpoints never hold another run's weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from desupcon.engine import distributed as dist
from desupcon.models import ModelOutputs


def _signature(run) -> tuple:
    """Runs that can be fused have equal signatures: the same model type, tensors and calls."""
    model, needs = run.model, run.method.needs
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in (*model.named_parameters(), *model.named_buffers()))
    return (type(model), tensors, needs.views, needs.online_classifier, needs.student_stages)


def fusable(run) -> bool:
    """A student run whose model vmap computes exactly: one process (DDP keeps its own wrapper),
    not compiled, no dropout (its masks would be shared), BatchNorm with an exponential average, a
    method that calls no student module outside the forward (its gradient would miss the stacked
    weights)."""
    if (run.kind != "student" or dist.world_size() > 1 or run.cfg.compile
            or run.forward_model is not run.model or run.method.needs.calls_student_modules):
        return False
    for module in run.model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            return False
    return True


def fusable_groups(runs: list) -> list[list]:
    """The runs that fuse, grouped by signature (groups of two or more, in the runs' order)."""
    groups: dict[tuple, list] = {}
    for run in runs:
        if fusable(run):
            groups.setdefault(_signature(run), []).append(run)
    return [g for g in groups.values() if len(g) > 1]


def _stack_into(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(len, *shape) holding `tensors`, each slice with its tensor's own strides (channels_last
    weights stay channels_last), then every tensor made a view of its slice."""
    first = tensors[0]
    stacked = torch.empty_strided((len(tensors), *first.shape), (first.numel(), *first.stride()),
                                  dtype=first.dtype, device=first.device)
    for i, t in enumerate(tensors):
        stacked[i].copy_(t.detach())
        t.data = stacked[i]
    return stacked


class FusedStudents:
    """The models of `runs` (equal signatures) as one vmapped model for one epoch."""

    def __init__(self, runs: list):
        self.runs = list(runs)
        models = [r.model for r in self.runs]
        self.param_names = [k for k, _ in models[0].named_parameters()]
        self.buffer_names = [k for k, _ in models[0].named_buffers()]
        per_model_params = [dict(m.named_parameters()) for m in models]
        per_model_buffers = [dict(m.named_buffers()) for m in models]
        self.params = {k: _stack_into([p[k] for p in per_model_params]) for k in self.param_names}
        self.buffers = {k: _stack_into([b[k] for b in per_model_buffers]) for k in self.buffer_names}
        self._own = per_model_params
        # the call structure only: functional_call replaces every tensor
        self._skeleton = copy.deepcopy(models[0]).to("meta")
        self._leaves: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, **kwargs) -> list[ModelOutputs]:
        """Every student on the same input `x`: a list of each run's model outputs."""
        self._leaves = {k: v.detach().requires_grad_(self._own[0][k].requires_grad) for k, v in self.params.items()}
        skeleton = self._skeleton

        structure = []  # the outputs' tree and its leaves: vmap returns tensors only (no None fields)

        def one(params, buffers, inputs):
            leaves, tree = tree_flatten(functional_call(skeleton, (params, buffers), (inputs,), kwargs))
            structure[:] = [tree, leaves]
            return tuple(t for t in leaves if t is not None)

        stacked = iter(vmap(one, in_dims=(0, 0, None))(self._leaves, self.buffers, x))
        tree, leaves = structure
        per_leaf = [None if t is None else next(stacked) for t in leaves]
        return [tree_unflatten([None if t is None else t[i] for t in per_leaf], tree) for i in range(len(self.runs))]

    def hand_gradients_to_runs(self) -> None:
        """Each run's parameters get their slice of the stacked gradients (after the backward)."""
        for k in self.param_names:
            grad = self._leaves[k].grad
            for i, own in enumerate(self._own):
                p = own[k]
                if grad is None or not p.requires_grad:
                    p.grad = None
                    continue
                g = grad[i]
                p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        self._leaves = {}

    def release(self) -> None:
        """Every parameter and buffer in storage of its own again (the values unchanged)."""
        for model in (r.model for r in self.runs):
            for t in (*model.parameters(), *model.buffers()):
                t.data = t.data.clone()
        self.params, self.buffers, self._leaves = {}, {}, {}
