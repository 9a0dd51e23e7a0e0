"""The one student training loop (SPEC section 6); the teacher is in `teacher.py`.

One loop trains every method. Several students can train in *lockstep* over the same batches, so
each batch's teacher backbone forward is computed once for all of them; a single run is a lockstep
group of one, so both paths are the same code. Each student owns its optimiser, teacher projection
head, memory bank (with its own sampling generator), online classifier and log, which is why a
student trained in lockstep ends identical to the same student trained alone.

Per step: one teacher forward over both views (features and logits together), one student forward
over both views, the teacher head and the online classifier trained in the same backward pass.
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

from . import data as data_mod
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, load_checkpoint
from .config import RunConfig, run_name
from .devices import autocast_for, make_adam, make_scheduler, memory_format
from .memory_bank import MomentumMemoryBank
from .methods import Method, StepOutputs, build_method
from .models import Student, Teacher, build_encoder, load_matching_state_dict
from .published import (PUBLISHED_SOURCE, file_sha256, imported_path, load_plain_state,
                        published_config, published_names, student_state_from_published)
from .runs import (NonFiniteLossError, OutputPaths, check_finite, check_output_dirs, evaluate_accuracy,
                   global_rng_state, grads_finite, identity_diff, load_partial, non_finite_error,
                   params_finite, save_log, remove_partial, set_global_rng_state, summary_line,
                   with_kept_state)
from .validation import validate_config

log = logging.getLogger("desupcon")


@dataclass
class StudentRun:
    """Everything one student owns during training: models, optimiser, bank, log."""

    cfg: RunConfig
    method: Method
    student: Student
    teacher_head: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bank: MomentumMemoryBank | None
    bank_generator: torch.Generator
    device: torch.device
    name: str
    teacher_fingerprint: str | None = None
    log: list[dict] = field(default_factory=list)
    epoch: int = 0  # epochs completed

    # Per-epoch accumulators, kept on the device (no host sync inside the step).
    def start_epoch(self) -> None:
        self.student.train()
        if self.teacher_head is not None:
            self.teacher_head.train()
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._total = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._seen = 0
        self._steps = 0
        self._first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        self._started = time.perf_counter()

    def step(self, indices: torch.Tensor, view1: torch.Tensor, views: torch.Tensor,
             labels: torch.Tensor, teacher_out: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        batch = labels.shape[0]
        device = self.device
        with autocast_for(device):
            if self.method.views == 1:
                _, s_proj, s_logits = self.student(view1, detach_classifier=False)
                step_labels = labels
            else:
                _, s_proj, s_logits = self.student(views, detach_classifier=self.method.online_classifier)
                step_labels = torch.cat([labels, labels])
        outputs = StepOutputs(step_labels, s_proj.float(), s_logits.float())
        if self.method.uses_teacher:
            t_features, t_logits = teacher_out
            with autocast_for(device):
                t_proj = F.normalize(self.teacher_head(t_features), dim=1)
            outputs.teacher_projection = t_proj.float()
            outputs.teacher_logits = t_logits.float()
        if self.bank is not None:
            outputs.bank_embeddings, outputs.bank_labels = self.bank.sample(
                self.cfg.method.bank_size, exclude=indices, generator=self.bank_generator,
                written_only=self.cfg.method.bank_mode == "class-aware")
        with torch.autocast(device.type, enabled=False):
            losses = self.method.losses(outputs)
        total = sum(losses.values())
        self._steps += 1
        if device.type == "cpu":  # free to check here; on CUDA the epoch end checks (no sync)
            check_finite(total, self.name, self.epoch + 1, self._steps)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        finite = grads_finite(self.optimizer)
        if device.type == "cpu":
            if not bool(finite):
                raise non_finite_error(self.name, "gradients", self.epoch + 1, self._steps)
        else:  # remember the first bad step on the device; finish_epoch reports it
            bad = ~(finite & torch.isfinite(total.detach())) & (self._first_bad == 0)
            self._first_bad = torch.where(bad, self._steps, self._first_bad)
        self.optimizer.step()
        if self.bank is not None:
            self.bank.update(torch.cat([indices, indices]), outputs.teacher_projection.detach())
        for key, value in losses.items():
            self._loss_sums[key] = self._loss_sums.get(key, 0) + value.detach() * batch
        self._total += total.detach() * batch
        self._correct += (s_logits[:batch].argmax(1) == labels).sum()
        self._seen += batch

    def finish_epoch(self, dataset: data_mod.ImageDataset, seconds: float | None = None) -> dict:
        """Close the epoch (raising NonFiniteLossError before anything is recorded if it went bad)."""
        epoch = self.epoch + 1
        first_bad = int(self._first_bad)
        if first_bad:
            raise non_finite_error(self.name, "loss or gradients", epoch, first_bad)
        check_finite(self._total, self.name, epoch, self._steps)
        if not params_finite([self.student, self.teacher_head]):
            raise non_finite_error(self.name, "weights", epoch, self._steps)
        self.epoch = epoch
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.student.eval()
        test_acc = evaluate_accuracy(lambda x: self.student(x)[2], dataset.test_images,
                                     dataset.test_labels, dataset, self.device)
        entry = {"epoch": self.epoch, "loss": self._total.item() / self._seen,
                 "losses": {k: v.item() / self._seen for k, v in self._loss_sums.items()},
                 "train_acc": 100.0 * self._correct.item() / self._seen, "test_acc": test_acc,
                 "lr": lr, "seconds": seconds if seconds is not None else time.perf_counter() - self._started}
        self.log.append(entry)
        return entry

    # -- checkpoints ----------------------------------------------------------------------
    def training_state(self, data_generator: torch.Generator) -> dict:
        """Everything needed to continue bit-identically from the end of `self.epoch`."""
        return {"format": CHECKPOINT_FORMAT, "kind": "in_progress", "name": self.name,
                "identity": self.identity(), "epoch": self.epoch, "log": self.log,
                "method_state": self.method.state_dict(),
                "student": self.student.state_dict(),
                "teacher_head": self.teacher_head.state_dict() if self.teacher_head is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "bank": self.bank.state_dict() if self.bank is not None else None,
                "rng": {"data": data_generator.get_state(), "bank": self.bank_generator.get_state(),
                        **global_rng_state()}}

    def load_training_state(self, state: dict, data_generator: torch.Generator) -> None:
        self.epoch = state["epoch"]
        self.log = list(state["log"])
        self.student.load_state_dict(state["student"])
        if self.teacher_head is not None:
            self.teacher_head.load_state_dict(state["teacher_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state.get("method_state") or {})
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        data_generator.set_state(state["rng"]["data"])
        self.bank_generator.set_state(state["rng"]["bank"])
        set_global_rng_state(state["rng"])

    def identity(self) -> dict:
        return self.cfg.identity(self.teacher_fingerprint)

    def final_checkpoint(self, metrics: dict) -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "student", "name": self.name,
                "identity": self.identity(), "config": self.cfg.to_dict(),
                "teacher_fingerprint": self.teacher_fingerprint,
                "student_arch": self.cfg.model.student_arch,
                "num_classes": self.student.classifier.out_features,
                "student": {k: v.cpu() for k, v in self.student.state_dict().items()},
                "teacher_head": ({k: v.cpu() for k, v in self.teacher_head.state_dict().items()}
                                 if self.teacher_head is not None else None),
                "metrics": metrics, "log": self.log}


def build_student(arch: str, num_classes: int, init: str = "kaiming") -> Student:
    return Student(build_encoder(arch, num_classes, init))


def make_student_run(cfg: RunConfig, dataset: data_mod.ImageDataset, teacher: Teacher | None,
                     device: torch.device) -> StudentRun:
    """A fresh student with its optimiser: parameters seeded by the run's seed alone.

    One Adam, three parameter groups (SPEC 6): the encoder and projector (the student's lr, weight
    decay and schedule), the classifier and the teacher head. A contrastive method's online
    classifier and the teacher head have their own constant learning rate and no weight decay; a
    CE student's classifier is part of the student and follows the student's settings.
    """
    method = build_method(cfg.method)
    o = cfg.optim
    torch.manual_seed(o.seed)
    student = build_student(cfg.model.student_arch, dataset.num_classes, cfg.model.init).to(device)
    student = student.to(memory_format=memory_format(device))
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
    teacher_head = None
    if method.uses_teacher:
        teacher_head = copy.deepcopy(teacher.head).to(device)
        groups.append({"params": list(teacher_head.parameters()), "lr": o.head_lr, "weight_decay": 0.0})
        schedules.append("constant")
    optimizer = make_adam(groups, device)
    scheduler = make_scheduler(optimizer, schedules, o.epochs)
    bank = None
    if method.uses_bank:
        bank = MomentumMemoryBank(len(dataset.train_labels), teacher_head[-1].out_features,
                                  dataset.train_labels, cfg.method.bank_momentum, device=device)
    if cfg.compile:
        student.forward = torch.compile(student.forward)
    fp = getattr(teacher, "fingerprint", None) if method.uses_teacher else None
    return StudentRun(cfg, method, student, teacher_head, optimizer, scheduler, bank,
                      torch.Generator().manual_seed(o.seed + 1), device, run_name(cfg), teacher_fingerprint=fp)


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
            "seconds": sum(e["seconds"] for e in entries), "epochs": epochs}


def _is_published(ckpt: dict) -> bool:
    return (ckpt.get("source") or {}).get("kind") == PUBLISHED_SOURCE


def find_cached_run(cfg: RunConfig, paths: OutputPaths, teacher_fingerprint: str | None,
                    dataset: data_mod.ImageDataset, device: torch.device) -> tuple[Path, dict] | None:
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
            return import_published_student(original, cfg, identity, dataset, device, paths.models)
    path = paths.checkpoint(name)
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, expected_kind="student")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Rerun with --force to retrain and replace it, or restore it "
                              "from a backup") from exc
    stored = ckpt.get("identity") or {}
    if stored == identity:
        return path, ckpt
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
                             dataset: data_mod.ImageDataset, device: torch.device,
                             models_dir: Path) -> tuple[Path, dict]:
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
    student = student.to(device).eval()
    test_acc = evaluate_accuracy(lambda x: student(x)[2], dataset.test_images, dataset.test_labels,
                                 dataset, device)
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
    from .config import preset
    return preset("paper").replace(data={"dataset": dataset.name}, method={"method": "unknown"})


def train_students(cfgs: list[RunConfig], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                   device: torch.device, force: bool = False, resume: bool = True) -> list[RunResult]:
    """Train student configurations that share data order and teacher in lockstep.

    Cached runs (same name, same identity) are loaded, not retrained. Runs with an epoch
    checkpoint resume from it unless `resume` is False. Returns results in the order given.
    """
    if not cfgs:
        return []
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
    for cfg in cfgs:
        name = run_name(cfg)
        found = None if force else find_cached_run(cfg, paths, fp, dataset, device)
        if found is not None:
            path, ckpt = found
            log.info(f"[{name}] loaded from {'a ' + PUBLISHED_SOURCE if _is_published(ckpt) else 'cache'}"
                     f": test acc {ckpt['metrics']['test_acc']:.2f}%")
            results[name] = _result_from_checkpoint(cfg, path, ckpt, cached=True)
        elif name not in results and all(run_name(p) != name for p in pending):
            pending.append(cfg)

    # Group pending runs by the epoch their epoch checkpoint reached: each group shares one data
    # generator state and trains in lockstep from there.
    groups: dict[int, list[tuple[StudentRun, dict | None]]] = {}
    for cfg in pending:
        run = make_student_run(cfg, dataset, teacher, device)
        state = None
        if resume and not force:
            state = load_partial(paths.partial_checkpoint(run.name), run.identity(), run.name)
        groups.setdefault(state["epoch"] if state else 0, []).append((run, state))
    failures: list[NonFiniteLossError] = []
    for start_epoch in sorted(groups):
        members = groups[start_epoch]
        generator = torch.Generator().manual_seed(cfgs[0].optim.seed)
        for run, state in members:
            if state is not None:
                run.load_training_state(state, generator)
                log.info(f"[{run.name}] resuming after epoch {run.epoch}")
        finished, failed = _train_lockstep([r for r, _ in members], dataset, teacher, device,
                                           generator, paths)
        failures += failed
        for run in finished:
            ckpt = run.final_checkpoint(final_metrics(run.log, run.epoch))
            atomic_torch_save(paths.checkpoint(run.name), ckpt)
            remove_partial(paths, run.name)
            results[run.name] = _result_from_checkpoint(run.cfg, paths.checkpoint(run.name), ckpt, False)
    if failures:  # the other runs are finished and saved; report every run that went bad
        if len(failures) == 1:
            raise failures[0]
        raise NonFiniteLossError("\n".join(str(f) for f in failures), failures[0].name,
                                 failures[0].epoch, failures[0].step)
    return [results[run_name(c)] for c in cfgs]


def _train_lockstep(runs: list[StudentRun], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                    device: torch.device, generator: torch.Generator, paths: OutputPaths
                    ) -> tuple[list[StudentRun], list[NonFiniteLossError]]:
    """Train `runs` over the same batches to their last epoch, writing logs and epoch checkpoints.

    A run whose loss, gradients or weights become non-finite stops there (its last good epoch
    checkpoint stays on disk); the others go on. Returns (finished runs, errors of stopped runs).
    """
    cfg = runs[0].cfg
    epochs, batch_size = cfg.optim.epochs, cfg.optim.batch_size
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    drop_last = cfg.optim.drop_last
    n_steps = data_mod.batches_per_epoch(len(dataset.train_labels), batch_size, drop_last)
    label = runs[0].name if len(runs) == 1 else f"{len(runs)} students in lockstep"
    fmt = memory_format(device)
    active, failures = list(runs), []

    def stop(run: StudentRun, exc: NonFiniteLossError) -> None:
        active.remove(run)
        failures.append(with_kept_state(exc, paths.partial_checkpoint(run.name), run.epoch))
        if active:
            log.warning(f"{failures[-1]} The other runs in lockstep go on.")

    for epoch in range(runs[0].epoch + 1, epochs + 1):
        if not active:
            break
        started = time.perf_counter()
        for run in active:
            run.start_epoch()
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels, batch_size,
                                         augment, generator, drop_last=drop_last)
        for indices, view1, view2, labels in tqdm(batches, total=n_steps, leave=False,
                                                  desc=f"{label} {epoch}/{epochs}"):
            views = torch.cat([view1, view2]).contiguous(memory_format=fmt)
            view1 = view1.contiguous(memory_format=fmt)
            teacher_out = None
            if any(r.method.uses_teacher for r in active):
                with autocast_for(device):
                    teacher_out = teacher(views)
            for run in list(active):
                try:
                    run.step(indices, view1, views, labels, teacher_out)
                except NonFiniteLossError as exc:
                    stop(run, exc)
        seconds = (time.perf_counter() - started) / max(len(active), 1)
        for run in list(active):
            try:
                entry = run.finish_epoch(dataset, seconds)
            except NonFiniteLossError as exc:
                stop(run, exc)
                continue
            save_log(paths, run.name, run.log)
            if epoch < epochs:
                atomic_torch_save(paths.partial_checkpoint(run.name), run.training_state(generator))
            log.info(summary_line(run.name, entry, epochs))
    return active, failures


def train_student(cfg: RunConfig, dataset: data_mod.ImageDataset, teacher: Teacher | None,
                  device: torch.device, force: bool = False, resume: bool = True) -> RunResult:
    return train_students([cfg], dataset, teacher, device, force, resume)[0]


def load_student(path: str | Path, device: torch.device | str = "cpu") -> tuple[Student, dict]:
    """A trained (or imported) student and its checkpoint dict (configuration, metrics, log)."""
    ckpt = load_checkpoint(path, expected_kind="student")
    student = build_student(ckpt["student_arch"], ckpt["num_classes"])
    load_matching_state_dict(student, ckpt["student"], source=str(path))
    return student.to(device).eval(), ckpt
