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

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from desupcon import data as data_mod
from desupcon.engine import distributed as dist
from desupcon.store.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, load_checkpoint,
                         remove_stale_temporaries_in)
from desupcon.config import OptimConfig, RunConfig, run_name
from desupcon.engine.devices import DevicePolicy, as_policy, make_scheduler
from desupcon.memory_bank import MomentumMemoryBank
from desupcon.methods import Method, StepOutputs, build_method
from desupcon.models import Student, Teacher, build_encoder, load_matching_state_dict
from desupcon.store.published import (PUBLISHED_SOURCE, file_sha256, imported_path, load_plain_state,
                        published_config, published_names, student_state_from_published)
from desupcon.store.locks import RunLock
from desupcon.engine.runs import (NonFiniteLossError, OutputPaths, check_finite, check_output_dirs, evaluate_accuracy,
                   global_rng_state, grads_finite, identity_diff, load_partial, non_finite_error,
                   params_finite, save_log, remove_partial, set_global_rng_state, summary_line,
                   with_kept_state)
from desupcon.config.validation import validate_config

log = logging.getLogger("desupcon")


@dataclass
class Run:
    """Everything one run owns during training: model, optimiser, teacher head, bank, log.

    `model(x, detach_classifier=...)` returns (features, normalised projection, logits): a
    `Student`, or the teacher's cosine probe. `data_views` is how many augmented views of each
    image the loop draws for it (2 for students, 1 for teacher training and probes).
    """

    cfg: RunConfig
    name: str
    identity: dict
    method: Method
    model: nn.Module
    teacher_head: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    policy: DevicePolicy
    optim: OptimConfig
    bank: MomentumMemoryBank | None = None
    bank_generator: torch.Generator = field(default_factory=torch.Generator)
    data_views: int = 2
    kind: str = "student"
    teacher_fingerprint: str | None = None
    log: list[dict] = field(default_factory=list)
    epoch: int = 0  # epochs completed

    def __post_init__(self):
        self.scaler = self.policy.grad_scaler()
        self.tracker = None
        if (self.cfg.tensorboard or self.cfg.wandb) and dist.is_main():
            from desupcon.engine.tracking import RunTracker
            self.tracker = RunTracker(self.name, self.cfg.output_dir, self.cfg.tensorboard, self.cfg.wandb,
                                      self.cfg.to_dict())
        self.forward_model = dist.wrap_model(self.model, self.policy, self.method, self.cfg.sync_batchnorm)

    @property
    def student(self) -> nn.Module:
        """The model a student run trains (its `Student`)."""
        return self.model

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m in (self.model, self.teacher_head, *self.method.trainable_modules()) if m is not None]

    # Per-epoch accumulators, kept on the device (no host sync inside the step).
    def start_epoch(self) -> None:
        for module in self.modules:
            module.train()
        device = self.policy.device
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._total = torch.zeros((), device=device)
        self._correct = torch.zeros((), dtype=torch.long, device=device)
        self._seen = torch.zeros((), dtype=torch.long, device=device)
        self._steps = 0
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)  # step, 0 = none
        self._bad_loss = torch.zeros((), dtype=torch.bool, device=device)  # the loss itself was bad
        self._bad_value = torch.zeros((), device=device)
        self._started = time.perf_counter()

    def step(self, indices: torch.Tensor, view1: torch.Tensor, views: torch.Tensor | None,
             labels: torch.Tensor, teacher_out: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        policy, method = self.policy, self.method
        batch = labels.shape[0]
        two_views = method.views == 2
        maps = {"feature_map": True} if method.needs_feature_maps else {}
        with policy.autocast():
            s_features, s_proj, s_logits, *s_map = self.forward_model(
                views if two_views else view1, detach_classifier=method.online_classifier, **maps)
        step_labels = torch.cat([labels, labels]) if two_views else labels
        outputs = StepOutputs(step_labels, s_proj.float(), s_logits.float(), epoch=self.epoch + 1,
                              indices=indices, classifier_labels=labels, student_features=s_features.float(),
                              student_feature_map=s_map[0].float() if s_map else None)
        if method.uses_teacher:
            t_features, t_logits, *t_map = teacher_out
            rows = slice(None) if two_views else slice(0, batch)  # the teacher saw both views
            t_features, t_logits = t_features[rows], t_logits[rows]
            if self.teacher_head is not None:
                with policy.autocast():
                    t_proj = F.normalize(self.teacher_head(t_features), dim=1)
                outputs.teacher_projection = t_proj.float()
            outputs.teacher_logits = t_logits.float()
            outputs.view1_teacher_logits = outputs.teacher_logits[:batch]
            outputs.teacher_features = t_features.float()
            if t_map:
                outputs.teacher_feature_map = t_map[0][rows].float()
        outputs = dist.gather_step_outputs(outputs, method)
        if self.bank is not None:
            outputs.bank_embeddings, outputs.bank_labels = self.bank.sample(
                self.cfg.method.bank_size, exclude=outputs.indices, generator=self.bank_generator,
                written_only=self.cfg.method.bank_mode == "class-aware")
        with policy.full_precision():
            losses = method.losses(outputs)
        total = sum(losses.values())
        self._steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        dist.average_gradients([m for m in self.modules if m is not self.model])  # DDP does the model's
        self.scaler.unscale_(self.optimizer)
        if self.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for m in self.modules for p in m.parameters()],
                                           self.optim.grad_clip)
        # One finiteness path on every device: remember the first bad step on the device; the
        # epoch end reports it. With fp16 the scaler skips steps whose gradients overflow.
        loss_finite = torch.isfinite(total.detach())
        finite = loss_finite if self.scaler.is_enabled() else loss_finite & grads_finite(self.optimizer)
        first = ~finite & (self._first_bad == 0)
        self._first_bad = torch.where(first, self._steps, self._first_bad)
        self._bad_loss = torch.where(first, ~loss_finite, self._bad_loss)
        self._bad_value = torch.where(first, total.detach().float(), self._bad_value)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.bank is not None:
            self.bank.update(torch.cat([outputs.indices, outputs.indices]),
                             outputs.teacher_projection.detach())
        method.after_step(outputs)
        for key, value in losses.items():
            self._loss_sums[key] = self._loss_sums.get(key, 0) + value.detach() * batch
        self._total += total.detach() * batch
        self._correct += (s_logits[:batch].argmax(1) == labels).sum()
        self._seen += batch

    def finish_epoch(self, dataset: data_mod.ImageDataset, seconds: float | None = None,
                     group: tuple[float, int] | None = None) -> dict:
        """Close the epoch (raising NonFiniteLossError before anything is recorded if it went bad)."""
        epoch = self.epoch + 1
        totals = dist.sum_over_ranks([self._total, self._correct.double(), self._seen.double(),
                                      *self._loss_sums.values()])
        total, correct, seen, *loss_sums = totals
        first_bad = int(dist.max_over_ranks(self._first_bad))
        if first_bad:
            what = f"loss ({float(self._bad_value)})" if bool(self._bad_loss) else "gradients"
            raise non_finite_error(self.name, what, epoch, first_bad)
        check_finite(total, self.name, epoch, self._steps)
        if not params_finite(self.modules):
            raise non_finite_error(self.name, "weights", epoch, self._steps)
        self.epoch = epoch
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for module in self.modules:
            module.eval()
        test_acc = evaluate_accuracy(lambda x: self.model(x)[2], dataset.test_images,
                                     dataset.test_labels, dataset, self.policy)
        seen = seen.item()
        entry = {"epoch": self.epoch, "loss": total.item() / seen,
                 "losses": {k: v.item() / seen for k, v in zip(self._loss_sums, loss_sums)},
                 "train_acc": 100.0 * correct.item() / seen, "test_acc": test_acc, "lr": lr,
                 "seconds": seconds if seconds is not None else time.perf_counter() - self._started}
        if group is not None:  # lockstep: `seconds` is an equal share of the group's wall time
            entry["group_seconds"], entry["group_size"] = group
        self.log.append(entry)
        return entry

    # -- checkpoints ----------------------------------------------------------------------
    def training_state(self, data_generator: torch.Generator) -> dict:
        """Everything needed to continue bit-identically from the end of `self.epoch`."""
        return {"format": CHECKPOINT_FORMAT, "kind": "in_progress", "name": self.name,
                "identity": self.identity, "config": self.cfg.to_dict(), "epoch": self.epoch, "log": self.log,
                "model": self.model.state_dict(),
                "teacher_head": self.teacher_head.state_dict() if self.teacher_head is not None else None,
                "method_state": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "bank": self.bank.state_dict() if self.bank is not None else None,
                "rng": {"data": data_generator.get_state(), "bank": self.bank_generator.get_state(),
                        **global_rng_state()}}

    def load_training_state(self, state: dict, data_generator: torch.Generator) -> None:
        self.epoch = state["epoch"]
        self.log = list(state["log"])
        self.model.load_state_dict(state["model"])
        if self.teacher_head is not None:
            self.teacher_head.load_state_dict(state["teacher_head"])
        self.method.load_state_dict(state.get("method_state") or {})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        data_generator.set_state(state["rng"]["data"])
        self.bank_generator.set_state(state["rng"]["bank"])
        set_global_rng_state(state["rng"])

    def final_checkpoint(self, metrics: dict) -> dict:
        """A student's final checkpoint (the teacher writes its own format from `model`)."""
        student = self.model
        return {"format": CHECKPOINT_FORMAT, "kind": "student", "name": self.name,
                "identity": self.identity, "config": self.cfg.to_dict(),
                "teacher_fingerprint": self.teacher_fingerprint,
                "student_arch": self.cfg.model.student_arch,
                "num_classes": student.classifier.out_features,
                "student": {k: v.cpu() for k, v in student.state_dict().items()},
                "teacher_head": ({k: v.cpu() for k, v in self.teacher_head.state_dict().items()}
                                 if self.teacher_head is not None else None),
                "method_state": self.method.state_dict(),
                "metrics": metrics, "log": self.log}


# ----------------------------------------------------------------------------------------------
# Building runs
# ----------------------------------------------------------------------------------------------

def build_student(arch: str, num_classes: int, init: str = "kaiming") -> Student:
    return Student(build_encoder(arch, num_classes, init))


def make_optimizer(optim: OptimConfig, groups: list[dict], policy: DevicePolicy) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return policy.make_sgd(groups, optim.momentum)
    return policy.make_adam(groups)


def make_student_run(cfg: RunConfig, dataset: data_mod.ImageDataset, teacher: Teacher | None,
                     policy) -> Run:
    """A fresh student with its optimiser: parameters seeded by the run's seed alone.

    One optimiser, parameter groups of their own (SPEC 6): the encoder and projector (the
    student's lr, weight decay and schedule), the classifier, the teacher head and any module the
    method owns. A contrastive method's online classifier and the teacher head have their own
    constant learning rate and no weight decay; a CE student's classifier is part of the student.
    """
    policy = as_policy(policy)
    method = build_method(cfg.method)
    o = cfg.optim
    torch.manual_seed(o.seed)
    student = policy.prepare(build_student(cfg.model.student_arch, dataset.num_classes, cfg.model.init))
    classifier_ids = {id(p) for p in student.classifier.parameters()}
    groups = [{"params": [p for p in student.parameters() if id(p) not in classifier_ids],
               "lr": o.lr, "weight_decay": o.weight_decay}]
    schedules = [o.schedule]
    if method.online_classifier:
        groups.append({"params": list(student.classifier.parameters()), "lr": o.classifier_lr,
                       "weight_decay": 0.0})
        schedules.append("constant")
    else:
        groups.append({"params": list(student.classifier.parameters()), "lr": o.lr,
                       "weight_decay": o.weight_decay})
        schedules.append(o.schedule)
    return assemble_run(cfg, run_name(cfg), None, method, student, groups, schedules, dataset, teacher, policy)


def assemble_run(cfg: RunConfig, name: str, identity: dict | None, method: Method, student: Student,
                 groups: list[dict], schedules: list[str], dataset: data_mod.ImageDataset,
                 teacher: Teacher | None, policy: DevicePolicy, kind: str = "student") -> Run:
    """A student run from its model and the parameter groups of the student itself: adds the
    teacher head's and the method's own groups, the optimiser, schedule and memory bank.
    `identity=None`: the run's configuration identity with the teacher's fingerprint."""
    o = cfg.optim
    teacher_head = None
    if method.uses_teacher and method.uses_teacher_head:
        teacher_head = copy.deepcopy(teacher.head).to(policy.device)
        groups.append({"params": list(teacher_head.parameters()), "lr": o.head_lr, "weight_decay": 0.0})
        schedules.append("constant")
    method.setup(dataset, student, teacher, policy)
    for module in method.trainable_modules():  # e.g. crd-nce's embedding heads: the student's settings
        groups.append({"params": list(module.parameters()), "lr": o.lr, "weight_decay": o.weight_decay})
        schedules.append(o.schedule)
    optimizer = make_optimizer(o, groups, policy)
    scheduler = make_scheduler(optimizer, schedules, o.epochs, tuple(o.milestones), o.lr_decay)
    bank = None
    if method.uses_bank:
        bank = MomentumMemoryBank(len(dataset.train_labels), teacher_head[-1].out_features,
                                  dataset.train_labels, cfg.method.bank_momentum, device=policy.device)
    if cfg.compile:
        student.forward = torch.compile(student.forward)
    fp = getattr(teacher, "fingerprint", None) if method.uses_teacher else None
    return Run(cfg, name, identity if identity is not None else cfg.identity(fp), method, student,
               teacher_head, optimizer, scheduler, policy, o, bank,
               torch.Generator().manual_seed(o.seed + 1), kind=kind, teacher_fingerprint=fp)


def lockstep_key(cfg: RunConfig) -> tuple:
    """Runs that can share batches: same data, data order, batch size, epochs and teacher."""
    return (repr(cfg.data_identity()), cfg.optim.seed, cfg.optim.batch_size, cfg.optim.drop_last,
            cfg.optim.epochs, repr(cfg.teacher_identity()))


@dataclass
class RunResult:
    name: str
    config: RunConfig
    checkpoint: Path
    metrics: dict
    log: list[dict]
    cached: bool
    analysis: dict | None = None  # section 7 metrics once analysed
    source: str = "trained"  # or "published checkpoint"


def _result_from_checkpoint(cfg: RunConfig, path: Path, ckpt: dict, cached: bool) -> RunResult:
    analysis = (ckpt.get("analysis") or {}).get("metrics")
    source = (ckpt.get("source") or {}).get("kind", "trained")
    return RunResult(ckpt["name"], cfg, path, ckpt["metrics"], ckpt["log"], cached, analysis, source)


def final_metrics(entries: list[dict], epochs: int) -> dict:
    """Last-epoch accuracies (the headline) and, separately, the best epoch by test accuracy."""
    last = entries[-1]
    best = max(entries, key=lambda e: e["test_acc"])
    return {"test_acc": last["test_acc"], "train_acc": last["train_acc"],
            "train_test_gap": last["train_acc"] - last["test_acc"],
            "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
            "seconds": sum(e["seconds"] for e in entries),
            # trained in lockstep: `seconds` is this run's equal share of the group's time
            "seconds_shared": any("group_seconds" in e for e in entries), "epochs": epochs}


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
        done, failed = _train_lockstep([r for r, _ in members], dataset, teacher, generator, paths,
                                       save_every)
        finished += done
        failures += failed
    for run in runs:
        if run.tracker is not None:
            run.tracker.close()
    return finished, failures


def views_the_teacher_sees(runs: list[Run]) -> int:
    """2 when a run that uses the teacher sees both views, else 1."""
    users = [r.method.views for r in runs if r.method.uses_teacher]
    return max(users) if users else 1


def train_step(runs: list[Run], batch: tuple, teacher: Teacher | None, policy,
               teacher_views: int | None = None) -> None:
    """One training step of `runs` on one batch `(indices, view1, view2 or None, labels)` of
    `data.epoch_batches`: the inputs moved by the device policy, one teacher forward shared by
    every run that uses the teacher, then each run's step. The loop's body; benchmarks and tests
    call it rather than a copy."""
    indices, view1, view2, labels = batch
    view1 = policy.inputs(view1)
    views = policy.inputs(torch.cat([view1, view2])) if view2 is not None else None
    teacher_out = None
    if teacher is not None and any(r.method.uses_teacher for r in runs):
        teacher_views = teacher_views or views_the_teacher_sees(runs)
        teacher_out = teacher.features_and_logits(
            views if teacher_views == 2 and views is not None else view1, policy,
            feature_map=any(r.method.needs_feature_maps for r in runs))
    for run in runs:
        run.step(indices, view1, views, labels, teacher_out)


def _train_lockstep(runs: list[Run], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                    generator: torch.Generator, paths: OutputPaths, save_every: int = 1
                    ) -> tuple[list[Run], list[NonFiniteLossError]]:
    """Train `runs` over the same batches to their last epoch, writing logs and epoch checkpoints
    (every `save_every` epochs; not fsync'd: the final checkpoint is).

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

    def stop(run: Run, exc: NonFiniteLossError) -> None:
        active.remove(run)
        failures.append(with_kept_state(exc, paths.partial_checkpoint(run.name), run.epoch))
        if active:
            log.warning(f"{failures[-1]} The other runs in lockstep go on.")

    for epoch in range(first.epoch + 1, epochs + 1):
        if not active:
            break
        started = time.perf_counter()
        for run in active:
            run.start_epoch()
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels, batch_size,
                                         augment, generator, drop_last=o.drop_last, views=data_views,
                                         shard=(rank, world))
        for indices, view1, view2, labels in tqdm(batches, total=n_steps, leave=False,
                                                  desc=f"{label} {epoch}/{epochs}",
                                                  **({"disable": True} if rank else {})):
            train_step(active, (indices, view1, view2, labels), teacher, policy, teacher_views)
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
                    atomic_torch_save(paths.partial_checkpoint(run.name), run.training_state(generator),
                                      durable=False)
                log.info(summary_line(run.name, entry, epochs))
    return active, failures


# ----------------------------------------------------------------------------------------------
# Students: cache, published checkpoints, training
# ----------------------------------------------------------------------------------------------

def train_students(cfgs: list[RunConfig], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                   policy, force: bool = False, resume: bool = True) -> list[RunResult]:
    """Train student configurations that share data order and teacher in lockstep.

    Cached runs (same name, same identity) and published checkpoints of the same run are loaded,
    not trained. Runs with an epoch checkpoint resume from it unless `resume` is False. Returns
    results in the order given.
    """
    if not cfgs:
        return []
    policy = as_policy(policy)
    keys = {lockstep_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError("lockstep training needs the same dataset, seed, batch size, epochs and "
                         "teacher for every run; train such groups separately")
    for cfg in cfgs:
        validate_config(cfg, dataset)
    paths = OutputPaths(cfgs[0].output_dir)
    check_output_dirs(paths)
    results: dict[str, RunResult] = {}
    pending: list[RunConfig] = []
    fp = getattr(teacher, "fingerprint", None)
    locks: dict[str, RunLock] = {}  # the runs this process has claimed
    saved: set[str] = set()

    def load_finished(cfg: RunConfig) -> bool:
        found = None
        if not force and dist.is_main():
            found = find_cached_run(cfg, paths, fp, dataset, policy)
        if dist.active():  # rank 0 decides for all (the others' disks may not hold the file)
            found = dist.broadcast_from_main(None if found is None else (
                found[0], {k: found[1].get(k) for k in ("name", "metrics", "log", "analysis", "source")}))
        if found is None:
            return False
        path, ckpt = found
        log.info(f"[{run_name(cfg)}] loaded from {'a ' + PUBLISHED_SOURCE if _is_published(ckpt) else 'cache'}"
                 f": test acc {ckpt['metrics']['test_acc']:.2f}%")
        stale = paths.partial_checkpoint(run_name(cfg))
        if stale.is_file() and not dist.active():  # a kill between the final save and its clean-up
            if run_name(cfg) in locks:  # ours already
                remove_partial(paths, run_name(cfg))
            else:
                lock = RunLock(paths.run_lock(run_name(cfg)))
                if lock.acquire(wait=False):  # (not while another process retrains it by force)
                    remove_partial(paths, run_name(cfg))
                    lock.release(finished=True)
        results[run_name(cfg)] = _result_from_checkpoint(cfg, path, ckpt, cached=True)
        return True

    for cfg in cfgs:
        name = run_name(cfg)
        if not load_finished(cfg) and name not in results and all(run_name(p) != name for p in pending):
            pending.append(cfg)

    # One process per run (run_locks): claim what is free now, wait for the rest afterwards. Under
    # torchrun the ranks train together and nothing is claimed.

    def claim(cfg: RunConfig, wait: bool) -> bool:
        if dist.active():
            return True
        lock = RunLock(paths.run_lock(run_name(cfg)))
        if lock.acquire(wait):
            locks[run_name(cfg)] = lock
            return True
        return False

    failures: list[NonFiniteLossError] = []
    try:
        now = [cfg for cfg in pending if claim(cfg, wait=False)]
        later = [cfg for cfg in pending if run_name(cfg) not in locks and not dist.active()]
        # a run claimed now may have been finished by another process since the look above
        now = [cfg for cfg in now if not load_finished(cfg)]
        failures += _train_and_save(now, dataset, teacher, policy, paths, results, saved, resume, force)
        for cfg in later:
            log.info(f"[{run_name(cfg)}] is being trained by another process; waiting for it to finish")
            claim(cfg, wait=True)
        retry = [cfg for cfg in later if not load_finished(cfg)]  # its process died: resume it here
        failures += _train_and_save(retry, dataset, teacher, policy, paths, results, saved, resume, force)
    finally:
        for name, lock in locks.items():
            lock.release(finished=name in saved or name in results)
    if dist.is_main():
        remove_stale_temporaries_under(paths)
    if failures:  # the other runs are finished and saved; report every run that went bad
        if len(failures) == 1:
            raise failures[0]
        raise NonFiniteLossError("\n".join(str(f) for f in failures), failures[0].name,
                                 failures[0].epoch, failures[0].step)
    return [results[run_name(c)] for c in cfgs]


def remove_stale_temporaries_under(paths: OutputPaths) -> None:
    """Temporary files of killed writes in every output folder, removed once a run completes."""
    for folder in (paths.models, paths.models / "in_progress", paths.results, paths.results / "training_logs"):
        remove_stale_temporaries_in(folder)


def _train_and_save(cfgs: list[RunConfig], dataset, teacher, policy, paths: OutputPaths,
                    results: dict[str, RunResult], saved: set[str], resume: bool, force: bool) -> list:
    """Train `cfgs` in lockstep and save each finished run (rank 0); returns the failures."""
    if not cfgs:
        return []
    runs = [make_student_run(cfg, dataset, teacher, policy) for cfg in cfgs]
    finished, failures = train_group(runs, dataset, teacher, paths, resume=resume and not force,
                                     save_every=cfgs[0].save_every)
    for run in finished:
        ckpt = run.final_checkpoint(final_metrics(run.log, run.epoch))
        if dist.is_main():
            atomic_torch_save(paths.checkpoint(run.name), ckpt)
            remove_partial(paths, run.name)
        dist.barrier()
        saved.add(run.name)
        results[run.name] = _result_from_checkpoint(run.cfg, paths.checkpoint(run.name), ckpt, False)
    return failures


def _is_published(ckpt: dict) -> bool:
    return (ckpt.get("source") or {}).get("kind") == PUBLISHED_SOURCE


def find_cached_run(cfg: RunConfig, paths: OutputPaths, teacher_fingerprint: str | None,
                    dataset: data_mod.ImageDataset, policy) -> tuple[Path, dict] | None:
    """A finished run of exactly this configuration and teacher: our checkpoint, or a published
    checkpoint under one of the run's published names (imported on first use). None: train it.

    A checkpoint of the same name trained from another teacher (by content) is stale: it is
    retrained (with a warning). One of another configuration is an error naming the difference.
    """
    name = run_name(cfg)
    identity = cfg.identity(teacher_fingerprint)
    for published_name in published_names(cfg):
        original = paths.checkpoint(published_name)
        if original.is_file() and not _is_ours(original):
            return import_published_student(original, cfg, identity, dataset, policy, paths.models)
    path = paths.checkpoint(name)
    ckpt = load_cached_student(path, identity, name)
    return None if ckpt is None else (path, ckpt)


def load_cached_student(path: Path, identity: dict, name: str) -> dict | None:
    """Our finished checkpoint at `path` if it holds exactly this run. One distilled from another
    teacher (by content) is stale: None, so it is retrained (with a warning). One of another
    configuration is an error naming the difference."""
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, expected_kind="student")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Rerun with --force to retrain and replace it, or restore it "
                              "from a backup") from exc
    stored = ckpt.get("identity") or {}
    if stored == identity:
        return ckpt
    diffs = identity_diff(stored, identity)
    if diffs and all(d.startswith("teacher.") for d in diffs):
        log.warning(f"[{name}] {path} was distilled from another teacher ({'; '.join(diffs)}); "
                    "retraining it with the current teacher")
        return None
    raise CheckpointError(f"{path} exists but was trained with another configuration "
                          f"({'; '.join(diffs[:6])}). Rerun with --force to replace it, or use "
                          "another --output-dir.")


def _is_ours(path: Path) -> bool:
    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def import_published_student(original: Path, cfg: RunConfig | None, identity: dict | None,
                             dataset: data_mod.ImageDataset, policy, models_dir: Path) -> tuple[Path, dict]:
    """Import a published student file (SPEC 11) as a desupcon checkpoint beside it, once.

    `cfg` is the run its name describes (None: an unnamed student, analysable only). The import
    is reused while the downloaded file is unchanged (same SHA-256).
    """
    name = original.stem
    sha = file_sha256(original)
    target = imported_path(models_dir, name)
    if target.is_file():
        ckpt = load_checkpoint(target, expected_kind="student")
        if (ckpt.get("source") or {}).get("sha256") == sha and (identity is None or ckpt["identity"] == identity):
            return target, ckpt
    try:
        state = student_state_from_published(load_plain_state(original))
    except Exception as exc:
        raise CheckpointError(f"{original} is neither a desupcon checkpoint nor a readable published "
                              f"student state dict ({type(exc).__name__}: {exc})") from exc
    classifier = state.get("encoder.fc.weight")
    if classifier is None:
        raise CheckpointError(f"{original} has no classifier.weight; a published student holds "
                              "encoder.*, projector.* and classifier.* (SPEC 11)")
    cfg = cfg or _unnamed_student_config(dataset)
    arch = cfg.model.student_arch
    student = build_student(arch, classifier.shape[0])
    load_matching_state_dict(student, state, source=f"published student {original} (expected {arch})")
    policy = as_policy(policy)
    student = policy.prepare(student).eval()
    test_acc = evaluate_accuracy(lambda x: student(x)[2], dataset.test_images, dataset.test_labels,
                                 dataset, policy)
    metrics = {"test_acc": test_acc, "train_acc": None, "train_test_gap": None, "best_test_acc": None,
               "best_epoch": None, "seconds": None, "epochs": cfg.optim.epochs}
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": "student", "name": name,
            "identity": identity if identity is not None else {"unnamed": name},
            "config": cfg.to_dict(), "student_arch": arch, "num_classes": classifier.shape[0],
            "teacher_fingerprint": (identity or {}).get("teacher", {}).get("fingerprint"),
            "student": {k: v.cpu() for k, v in student.state_dict().items()},
            "teacher_head": None, "metrics": metrics, "log": [],
            "source": {"kind": PUBLISHED_SOURCE, "file": str(original), "sha256": sha,
                       "described_run": published_config(name) is not None}}
    atomic_torch_save(target, ckpt)
    log.info(f"[{name}] imported the {PUBLISHED_SOURCE} {original} -> {target} (test acc {test_acc:.2f}%)")
    return target, ckpt


def _unnamed_student_config(dataset: data_mod.ImageDataset) -> RunConfig:
    """A published-layout student whose name describes no run: ResNet-18 on the given dataset."""
    from desupcon.config import preset
    return preset("paper").replace(data={"dataset": dataset.name}, method={"method": "unknown"})


def load_student(path: str | Path, device="cpu") -> tuple[Student, dict]:
    """A trained (or imported) student and its checkpoint dict (configuration, metrics, log).
    `device` is a device (name) or a `DevicePolicy` (whose memory format is then used)."""
    ckpt = load_checkpoint(path, expected_kind="student")
    student = build_student(ckpt["student_arch"], ckpt["num_classes"])
    load_matching_state_dict(student, ckpt["student"], source=str(path))
    if isinstance(device, DevicePolicy):
        return device.prepare(student).eval(), ckpt
    return student.to(device).eval(), ckpt
