"""The one training loop (SPEC sections 6 and 15): every method, the teacher's cross-entropy
training and its cosine probe go through it.

A *run* owns its model, method, optimiser (with a gradient scaler and schedule), teacher head,
memory bank and log. Several runs can train in *lockstep* over the same batches, so each batch's
teacher backbone forward is computed once for all of them; a single run is a lockstep group of
one, so both paths are the same code, and a run trained in lockstep ends identical to the same
run trained alone. Device choices come from one `DevicePolicy`; the finiteness check is deferred
to the end of each epoch on every device (no host synchronisation inside the step).

Per step: one teacher forward over the views (features and float32 logits together), one model
forward, the method's losses in float32, one backward for the model, the teacher head and the
online classifier; then the memory bank.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from desupcon import data as data_mod
from desupcon.engine import distributed as dist
from desupcon.engine.fused import FusedStudents, fusable_groups
from desupcon.engine.finite import NonFiniteLossError, with_kept_state
from desupcon.engine.graphs import capture_blocker, epoch_step, StepGraph
from desupcon.engine.run import Run
from desupcon.engine.step import views_the_teacher_sees
from desupcon.models import Teacher
from desupcon.store.checkpoint import BackgroundCheckpointWriter, load_partial
from desupcon.store.paths import OutputPaths
from desupcon.store.records import save_log

log = logging.getLogger("desupcon")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train_group(runs: list[Run], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                paths: OutputPaths, resume: bool = True, save_every: int = 1
                ) -> tuple[list[Run], list[NonFiniteLossError]]:
    """Train runs that share data order, batch size and epochs in lockstep, resuming each from its
    epoch checkpoint unless `resume` is False. Returns (finished runs, errors of stopped runs).

    Runs are grouped by the epoch their checkpoint reached: each group shares one data generator
    state and trains in lockstep from there.
    """
    by_start: dict[int, list[tuple[Run, dict | None]]] = {}
    for run in runs:
        # rank 0's epoch checkpoint for every rank: all resume from the same epoch and state
        # (node-local disks may hold different or no checkpoints on the other ranks)
        state = dist.broadcast_from_main(
            load_partial(paths.partial_checkpoint(run.name), run.identity, run.name)
            if resume and dist.is_main() else None)
        by_start.setdefault(state["epoch"] if state else 0, []).append((run, state))
    finished, failures = [], []
    for start_epoch in sorted(by_start):
        members = by_start[start_epoch]
        generator = torch.Generator().manual_seed(runs[0].optim.seed)
        for run, state in members:
            if state is not None:
                run.load_training_state(state, generator)
                log.info(f"[{run.name}] resuming after epoch {run.epoch}")
        done, failed = _train_lockstep([r for r, _ in members], dataset, teacher, generator, paths, save_every)
        finished += done
        failures += failed
    for run in runs:
        if run.tracker is not None:
            run.tracker.close()
    return finished, failures


def _train_lockstep(runs: list[Run], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                    generator: torch.Generator, paths: OutputPaths, save_every: int = 1
                    ) -> tuple[list[Run], list[NonFiniteLossError]]:
    """Train `runs` over the same batches to their last epoch, writing logs and epoch checkpoints
    (every `save_every` epochs, in the background while the next epoch trains; not fsync'd: the
    final checkpoint is). Every epoch checkpoint is on disk when this returns or raises."""
    with BackgroundCheckpointWriter() as writer:
        return _train_epochs(runs, dataset, teacher, generator, paths, writer, save_every)


def _train_epochs(runs: list[Run], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                  generator: torch.Generator, paths: OutputPaths, writer: BackgroundCheckpointWriter,
                  save_every: int) -> tuple[list[Run], list[NonFiniteLossError]]:
    """The epochs of `_train_lockstep`, epoch checkpoints queued on `writer`.

    A run whose loss, gradients or weights become non-finite stops there (its last good epoch
    checkpoint stays on disk); the others go on. Returns (finished runs, errors of stopped runs).
    """
    first = runs[0]
    policy, o = first.policy, first.optim
    epochs, batch_size = o.epochs, o.batch_size
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size,
                                               first.cfg.data.color_jitter)
    rank, world = dist.rank(), dist.world_size()
    n_steps = data_mod.batches_per_epoch(len(dataset.train_labels), batch_size, o.drop_last)
    label = first.name if len(runs) == 1 else f"{len(runs)} runs in lockstep"
    data_views = first.data_views
    active, failures = list(runs), []
    teacher_views = views_the_teacher_sees(runs)  # fixed for the group (a run that stops changes nothing)
    first_epoch = first.epoch + 1

    def stop(run: Run, exc: NonFiniteLossError) -> None:
        active.remove(run)
        failures.append(with_kept_state(exc, paths.partial_checkpoint(run.name), run.epoch))
        if active:
            log.warning(f"{failures[-1]} The other runs in lockstep go on.")

    for epoch in range(first_epoch, epochs + 1):
        if not active:
            break
        started = time.perf_counter()
        for run in active:
            run.start_epoch()
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels, batch_size,
                                         augment, generator, drop_last=o.drop_last, views=data_views,
                                         shard=(rank, world))
        # fused lockstep (--fused-lockstep): each architecture's students as one batched model
        fused = [FusedStudents(g) for g in fusable_groups(active)] if first.cfg.fused_lockstep else []
        if first.cfg.fused_lockstep and len(active) > 1 and epoch == first_epoch:
            sizes = ", ".join(str(len(g.runs)) for g in fused) or "none"
            log.info(f"[{label}] fused lockstep: groups of {sizes} students computed as one model "
                     "(the others step alone: see engine/fused.fusable)")
        # CUDA graphs (--cuda-graphs): the epoch's step captured once and replayed (engine/graphs.py)
        blocker = capture_blocker(active, policy) if first.cfg.cuda_graphs else None
        if blocker and epoch == first_epoch:
            log.info(f"[{label}] --cuda-graphs: stepping eagerly, {blocker}")
        try:
            with epoch_step(active, teacher, policy, teacher_views, fused,
                            graphs=first.cfg.cuda_graphs and blocker is None) as step:
                for batch in tqdm(batches, total=n_steps, leave=False, desc=f"{label} {epoch}/{epochs}",
                                  **({"disable": True} if rank else {})):
                    step(batch)
                if epoch == first_epoch and isinstance(step, StepGraph):
                    log.info(f"[{label}] --cuda-graphs: {step.replays} of {n_steps} steps of epoch {epoch} "
                             "replayed as a CUDA graph (the capture's included), the others eager")
        finally:
            for group in fused:
                group.release()
        seconds = time.perf_counter() - started
        group = (seconds, len(active)) if len(runs) > 1 else None
        for run in list(active):
            try:
                entry = run.finish_epoch(dataset, seconds / len(active), group)
            except NonFiniteLossError as exc:
                stop(run, exc)
                continue
            if dist.is_main():
                save_log(paths, run.name, run.log)
                if run.tracker is not None:
                    run.tracker.epoch(entry)
                if epoch < epochs and (epoch % save_every == 0):
                    writer.save(paths.partial_checkpoint(run.name), run.training_state(generator))
                log.info(summary_line(run.name, entry, epochs))
    return active, failures


def summary_line(name: str, entry: dict, epochs: int) -> str:
    test = f" test {entry['test_acc']:.2f}%" if entry.get("test_acc") is not None else ""
    return (f"[{name}] epoch {entry['epoch']}/{epochs} loss {entry['loss']:.4f} "
            f"train {entry['train_acc']:.2f}%{test} lr {entry['lr']:.2e} {entry['seconds']:.1f}s")
