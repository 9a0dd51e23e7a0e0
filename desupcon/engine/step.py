"""One training step of a lockstep group on one batch: what the loop, benchmarks and tests run."""

from __future__ import annotations

import functools
import operator

import torch

from desupcon.engine.fused import FusedStudents
from desupcon.engine.run import Run
from desupcon.models import NO_STAGES, StageNeeds, Teacher


def views_the_teacher_sees(runs: list[Run]) -> int:
    """2 when a run that uses the teacher sees both views, else 1."""
    users = [r.method.needs.views for r in runs if r.method.needs.teacher]
    return max(users) if users else 1


def teacher_stage_needs(runs: list[Run]) -> StageNeeds:
    """The union of the teacher maps the runs read: one shared teacher forward serves them all."""
    return functools.reduce(operator.or_, (r.method.needs.teacher_stages for r in runs if r.method.needs.teacher),
                            NO_STAGES)


def train_step(runs: list[Run], batch: tuple, teacher: Teacher | None, policy,
               teacher_views: int | None = None, fused: list[FusedStudents] = ()) -> None:
    """One training step of `runs` on one batch `(indices, view1, view2 or None, labels)` of
    `data.epoch_batches`: the inputs moved by the device policy, one teacher forward shared by
    every run that uses the teacher, then each run's step. The loop's body; benchmarks and tests
    call it rather than a copy.

    The runs of each `fused` group (`engine.fused`) are computed together: one batched forward,
    each run's losses, one backward over their sum, then each run's optimiser step."""
    indices, view1, view2, labels = batch
    view1 = policy.inputs(view1)
    views = policy.inputs(torch.cat([view1, view2])) if view2 is not None else None
    teacher_out = None
    if teacher is not None and any(r.method.needs.teacher for r in runs):
        teacher_views = teacher_views or views_the_teacher_sees(runs)
        teacher_out = teacher.features_and_logits(
            views if teacher_views == 2 and views is not None else view1, policy, needs=teacher_stage_needs(runs))
    fused_runs = {id(r) for group in fused for r in group.runs}
    for group in fused:
        first = group.runs[0]
        with policy.autocast():
            outs = group.forward(first.model_input(view1, views), **first.model_kwargs())
        steps = [run.losses_of(out, indices, labels, teacher_out) for run, out in zip(group.runs, outs)]
        for run in group.runs:
            run.zero_grad()
        sum(run.scaler.scale(total) for run, (_, _, total) in zip(group.runs, steps)).backward()
        group.hand_gradients_to_runs()
        for run, out, (outputs, losses, total) in zip(group.runs, outs, steps):
            run.finish_step(outputs, losses, total, labels, out.logits)
    for run in runs:
        if id(run) not in fused_runs:
            run.step(indices, view1, views, labels, teacher_out)
