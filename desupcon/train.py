"""Teacher training, the cosine projection probe and the one student loop (SPEC sections 2 and 6).

One loop trains every method. Several students can train in *lockstep* over the same batches, so
each batch's teacher backbone forward is computed once for all of them; a single run is a lockstep
group of one, so both paths are the same code. Each student owns its optimiser, teacher projection
head, memory bank (with its own sampling generator), online classifier and log, which is why a
student trained in lockstep ends identical to the same student trained alone.

Per step: one teacher forward over both views (features and logits together), one student forward
over both views, the teacher head and the online classifier trained in the same backward pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, atomic_write_json,
                         check_writable, describe_load_failure, load_checkpoint)
from .config import RunConfig, run_name, teacher_run_name
from .memory_bank import MomentumMemoryBank
from .methods import Method, StepOutputs, build_method
from .models import (CheckpointMismatchError, Student, Teacher, build_encoder, load_matching_state_dict,
                     normalise_state_dict_layout)
from .validation import validate_config

log = logging.getLogger("desupcon")
EVAL_BATCH = 512


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the message names the run, epoch and step."""

    def __init__(self, message: str, name: str = "", epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.name, self.epoch, self.step = name, epoch, step


# ----------------------------------------------------------------------------------------------
# Devices, folders, data
# ----------------------------------------------------------------------------------------------

def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


@dataclass
class OutputPaths:
    """SPEC section 8 layout under one root."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def models(self) -> Path:
        return self.root / "pth_models"

    @property
    def results(self) -> Path:
        return self.root / "json_results"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def checkpoint(self, name: str) -> Path:
        return self.models / f"{name}.pth"

    def partial_checkpoint(self, name: str) -> Path:
        """The epoch checkpoint of a run in progress; replaced by the final one."""
        return self.models / "in_progress" / f"{name}.pth"

    def training_log(self, name: str) -> Path:
        return self.results / "training_logs" / f"{name}.json"


def prepare_dataset(cfg: RunConfig, device: torch.device) -> data_mod.ImageDataset:
    dataset = data_mod.load_dataset(cfg.data.dataset, cfg.data.data_root, cfg.data.download,
                                     cfg.data.image_size)
    if cfg.data.train_subset or cfg.data.test_subset:
        dataset = data_mod.subsample(dataset, cfg.data.train_subset, cfg.data.test_subset,
                                     seed=0)  # one subset for every seed
    return dataset.to(device)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _memory_format(device: torch.device):
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _make_adam(groups: list[dict], device: torch.device) -> torch.optim.Adam:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.Adam(groups, **kwargs)


@torch.no_grad()
def evaluate_accuracy(logits_fn, images: torch.Tensor, labels: torch.Tensor,
                      dataset: data_mod.ImageDataset, device: torch.device) -> float:
    """Top-1 accuracy in percent; `logits_fn(normalised_batch) -> logits`."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in data_mod.eval_batches(images, labels, EVAL_BATCH, dataset.mean, dataset.std):
        with autocast_for(device):
            logits = logits_fn(x.contiguous(memory_format=_memory_format(device)))
        correct += (logits.argmax(1) == y).sum()
    return 100.0 * correct.item() / max(labels.shape[0], 1)


def _summary_line(name: str, entry: dict, epochs: int) -> str:
    test = f" test {entry['test_acc']:.2f}%" if entry.get("test_acc") is not None else ""
    return (f"[{name}] epoch {entry['epoch']}/{epochs} loss {entry['loss']:.4f} "
            f"train {entry['train_acc']:.2f}%{test} lr {entry['lr']:.2e} {entry['seconds']:.1f}s")


def global_rng_state() -> dict:
    """torch, numpy and python global RNG states as plain data (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


LIKELY_CAUSES = ("Likely causes: learning rate too high (--lr), temperature too small "
                 "(--temperature), or a large alpha (--alpha).")


def _non_finite(name: str, what: str, epoch: int, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(f"run {name}: non-finite {what} at epoch {epoch}, step {step}. "
                              f"{LIKELY_CAUSES}", name, epoch, step)


def _check_finite(value: torch.Tensor, name: str, epoch: int, step: int, what: str = "loss") -> None:
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        shown = f" ({float(value)})" if value.numel() == 1 else ""
        raise _non_finite(name, f"{what}{shown}", epoch, step)


def _grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A device bool: every gradient of the optimiser's parameters is finite (no host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    # The max-norm is finite iff every element is (NaN propagates; no overflow as with the 2-norm).
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()


def _params_finite(modules) -> bool:
    tensors = [t for m in modules if m is not None for t in m.state_dict().values()
               if t.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


# ----------------------------------------------------------------------------------------------
# Teacher: cross-entropy training (or weights), then the cosine-probe projection head
# ----------------------------------------------------------------------------------------------

def _save_log(paths: OutputPaths, name: str, entries: list[dict]) -> None:
    atomic_write_json(paths.training_log(name), entries)


def train_teacher_encoder(cfg: RunConfig, dataset: data_mod.ImageDataset, device: torch.device,
                          paths: OutputPaths, resume: bool = True) -> tuple[nn.Module, list[dict]]:
    """Cross-entropy training of the teacher backbone + classifier (single augmented view).

    Like a student run, it writes an epoch checkpoint (`pth_models/in_progress/<teacher>.pth`) and
    resumes from one bit-identically unless `resume` is False.
    """
    torch.manual_seed(cfg.teacher.seed)
    encoder = build_encoder(cfg.model.teacher_arch, dataset.num_classes).to(device)
    encoder = encoder.to(memory_format=_memory_format(device))
    opt = _make_adam([{"params": encoder.parameters(), "lr": cfg.optim.lr,
                       "weight_decay": cfg.optim.weight_decay}], device)
    epochs = cfg.teacher.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(cfg.teacher.seed)
    name = teacher_run_name(cfg)
    identity = _teacher_backbone_identity(cfg)
    partial = paths.partial_checkpoint(name)
    entries: list[dict] = []
    done = 0
    state = _load_partial(partial, identity, name) if resume else None
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["data"])
        set_global_rng_state(state["rng"])
        entries, done = list(state["log"]), state["epoch"]
        log.info(f"[{name}] resuming after epoch {done}")
    for epoch in range(done + 1, epochs + 1):
        encoder.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        n_steps = data_mod.batches_per_epoch(len(dataset.train_labels), cfg.optim.batch_size)
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels,
                                         cfg.optim.batch_size, augment, gen, views=1)
        try:
            for step, (_, x, _, y) in enumerate(tqdm(batches, total=n_steps, leave=False,
                                                     desc=f"{name} {epoch}/{epochs}"), 1):
                with autocast_for(device):
                    logits = encoder(x.contiguous(memory_format=_memory_format(device)))
                loss = F.cross_entropy(logits.float(), y)
                if device.type == "cpu":
                    _check_finite(loss, name, epoch, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if device.type == "cpu" and not bool(_grads_finite(opt)):
                    raise _non_finite(name, "gradients", epoch, step)
                opt.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.argmax(1) == y).sum()
                seen += y.shape[0]
            _check_finite(loss_sum, name, epoch, n_steps)
            if not _params_finite([encoder]):
                raise _non_finite(name, "weights", epoch, n_steps)
        except NonFiniteLossError as exc:
            raise _with_kept_state(exc, partial, epoch - 1) from None
        lr = opt.param_groups[0]["lr"]
        sched.step()
        encoder.eval()
        entry = {"epoch": epoch, "loss": loss_sum.item() / seen, "train_acc": 100.0 * correct.item() / seen,
                 "test_acc": evaluate_accuracy(encoder, dataset.test_images, dataset.test_labels,
                                               dataset, device),
                 "lr": lr, "seconds": time.perf_counter() - start}
        entries.append(entry)
        _save_log(paths, name, entries)
        if epoch < epochs:
            atomic_torch_save(partial, {
                "format": CHECKPOINT_FORMAT, "kind": "in_progress", "name": name, "identity": identity,
                "epoch": epoch, "log": entries, "encoder": encoder.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"data": gen.get_state(), **global_rng_state()}})
        log.info(_summary_line(name, entry, epochs))
    return encoder, entries


def _load_partial(path: Path, identity: dict, name: str) -> dict | None:
    """The epoch checkpoint of a run in progress, if there is one of this configuration."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, expected_kind="in_progress")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. It is the epoch checkpoint of run {name} in progress: delete "
                              "it, or rerun with --no-resume to start this run over") from exc
    if state.get("identity") != identity:
        log.warning(f"[{name}] ignoring an epoch checkpoint of another configuration ({path})")
        return None
    return state


def _with_kept_state(exc: NonFiniteLossError, partial: Path, last_good_epoch: int) -> NonFiniteLossError:
    """The error, completed with where the last good state of the run is."""
    if last_good_epoch >= 1 and partial.is_file():
        kept = (f"The last good state (after epoch {last_good_epoch}) is kept in {partial}; nothing "
                "non-finite was saved.")
    else:
        kept = "No epoch of this run had finished, so nothing was saved for it."
    return NonFiniteLossError(f"{exc} {kept}", exc.name, exc.epoch, exc.step)


def train_projection_probe(teacher: Teacher, cfg: RunConfig, dataset: data_mod.ImageDataset,
                           device: torch.device) -> list[dict]:
    """Cosine probe: logits = cos(head(f), W_c) / T with L2-normalised, bias-free rows W_c; Adam;
    the frozen backbone's features come from augmented views. W is discarded afterwards."""
    torch.manual_seed(cfg.teacher.seed)
    head_dim = teacher.head[-1].out_features
    weight = nn.Parameter(torch.randn(dataset.num_classes, head_dim, device=device) * 0.01)
    opt = torch.optim.Adam([*teacher.head.parameters(), weight], lr=cfg.teacher.probe_lr)
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(cfg.teacher.seed + 7)
    entries = []
    teacher.train()
    for epoch in range(1, cfg.teacher.probe_epochs + 1):
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels,
                                         cfg.optim.batch_size, augment, gen, views=1)
        for _, x, _, y in batches:
            with autocast_for(device):
                features, _ = teacher(x.contiguous(memory_format=_memory_format(device)))
            z = teacher.project(features.float())
            logits = z @ F.normalize(weight, dim=1).T / cfg.teacher.probe_temperature
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
        _check_finite(loss_sum, f"{teacher_run_name(cfg, with_projection=True)} (projection probe)",
                      epoch, data_mod.batches_per_epoch(len(dataset.train_labels), cfg.optim.batch_size))
        entry = {"epoch": epoch, "loss": loss_sum.item() / seen,
                 "train_acc": 100.0 * correct.item() / seen, "lr": cfg.teacher.probe_lr,
                 "seconds": time.perf_counter() - start}
        entries.append(entry)
        log.info(_summary_line("projection probe", entry, cfg.teacher.probe_epochs))
    teacher.eval()
    return entries


def _teacher_checkpoint(kind: str, name: str, identity: dict, cfg: RunConfig, teacher: Teacher,
                        metrics: dict, entries: list[dict]) -> dict:
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": kind, "name": name, "identity": identity,
            "config": cfg.to_dict(), "arch": cfg.model.teacher_arch,
            "num_classes": teacher.encoder.fc.out_features,
            "encoder": {k: v.cpu() for k, v in teacher.encoder.state_dict().items()},
            "metrics": metrics, "log": entries}
    if kind == "teacher_projection":
        ckpt["head"] = {k: v.cpu() for k, v in teacher.head.state_dict().items()}
    return ckpt


def _cached(path: Path, kind: str, identity: dict, force: bool) -> dict | None:
    """The checkpoint at `path` if it holds exactly this configuration, else None.

    A checkpoint of the same name but another configuration is never reused: without `force`
    that is an error naming the differing settings.
    """
    if force or not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, expected_kind=kind)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Rerun with --force to retrain and replace it, or restore it "
                              "from a backup") from exc
    if ckpt.get("identity") != identity:
        diffs = _identity_diff(ckpt.get("identity") or {}, identity)
        raise CheckpointError(f"{path} exists but was trained with another configuration "
                              f"({'; '.join(diffs[:6])}). Rerun with --force to replace it, or "
                              "use another --output-dir.")
    return ckpt


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return out


def _teacher_backbone_identity(cfg: RunConfig) -> dict:
    return {k: v for k, v in cfg.teacher_identity().items() if k != "probe"}


def check_output_dirs(paths: OutputPaths) -> None:
    """Fail before any training when the outputs could not be written."""
    for folder in (paths.models, paths.results):
        check_writable(folder)


def load_teacher_weights(encoder: nn.Module, path: str | Path, dataset: data_mod.ImageDataset,
                         arch: str) -> None:
    """Teacher weights from a file: a torchvision/timm-layout state dict (possibly wrapped or
    DataParallel-prefixed) or a desupcon teacher checkpoint. Errors name the file and what was
    expected: a readable file, `arch` weights, a classifier for the dataset's number of classes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--teacher-weights {path}: file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random bytes, pickled objects
        raise CheckpointMismatchError(
            f"--teacher-weights: {describe_load_failure(path, exc)}; expected a {arch} state dict "
            "saved with torch.save(model.state_dict(), path)") from exc
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        if not isinstance(raw.get("encoder"), dict):
            raise CheckpointMismatchError(f"--teacher-weights {path} is a desupcon {raw.get('kind')!r} "
                                          "checkpoint without teacher weights; expected a teacher checkpoint")
        raw = raw["encoder"]
    if not isinstance(raw, dict):
        raise CheckpointMismatchError(f"--teacher-weights {path} holds a {type(raw).__name__}, "
                                      f"expected a {arch} state dict (a dict of tensors)")
    state = normalise_state_dict_layout(raw)
    if not state:
        raise CheckpointMismatchError(f"--teacher-weights {path} holds no tensors, expected a {arch} "
                                      "state dict")
    fc = state.get("fc.weight")
    if fc is not None and fc.ndim == 2 and fc.shape[0] != dataset.num_classes:
        raise CheckpointMismatchError(
            f"--teacher-weights {path} has a classifier for {fc.shape[0]} classes, but the dataset "
            f"{dataset.name} has {dataset.num_classes} classes; use teacher weights trained on "
            f"{dataset.name} (or train the teacher: leave out --teacher-weights)")
    load_matching_state_dict(encoder, state, source=f"--teacher-weights {path} (expected {arch} weights)")


def load_or_train_teacher(cfg: RunConfig, dataset: data_mod.ImageDataset, device: torch.device,
                          force: bool = False, resume: bool = True) -> tuple[Teacher, dict]:
    """The frozen teacher with its probe-trained projection head, from cache when possible.

    Returns (teacher, metrics) and writes `pth_models/teacher_<arch>_<dataset>[...].pth` and
    `..._with_projection.pth`. Cross-entropy training resumes from its epoch checkpoint unless
    `resume` is False (or `force`).
    """
    validate_config(cfg, dataset)
    paths = OutputPaths(cfg.output_dir)
    check_output_dirs(paths)
    identity = cfg.teacher_identity()
    name, proj_name = teacher_run_name(cfg), teacher_run_name(cfg, with_projection=True)
    encoder = build_encoder(cfg.model.teacher_arch, dataset.num_classes)

    cached_proj = _cached(paths.checkpoint(proj_name), "teacher_projection", identity, force)
    if cached_proj is not None:
        teacher = Teacher(encoder)
        load_matching_state_dict(teacher.encoder, cached_proj["encoder"], source=proj_name)
        teacher.head.load_state_dict(cached_proj["head"])
        log.info(f"[{proj_name}] loaded from cache (test acc {cached_proj['metrics']['test_acc']:.2f}%)")
        return teacher.to(device).to(memory_format=_memory_format(device)).eval(), cached_proj["metrics"]

    backbone_identity = _teacher_backbone_identity(cfg)
    cached = _cached(paths.checkpoint(name), "teacher", backbone_identity, force)
    if cached is not None:
        load_matching_state_dict(encoder, cached["encoder"], source=name)
        entries = cached["log"]
        log.info(f"[{name}] loaded from cache")
    elif cfg.model.teacher_weights:
        load_teacher_weights(encoder, cfg.model.teacher_weights, dataset, cfg.model.teacher_arch)
        entries = []
    else:
        encoder, entries = train_teacher_encoder(cfg, dataset, device, paths,
                                                 resume=resume and not force)
    encoder = encoder.to(device).to(memory_format=_memory_format(device))
    torch.manual_seed(cfg.teacher.seed)  # the projection head's initialisation
    teacher = Teacher(encoder).to(device)
    test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels, dataset, device)
    metrics = {"test_acc": test_acc, "train_acc": entries[-1]["train_acc"] if entries else None}
    if cached is None:
        atomic_torch_save(paths.checkpoint(name), _teacher_checkpoint(
            "teacher", name, backbone_identity, cfg, teacher, metrics, entries))
        _remove_partial(paths, name)
    log.info(f"[{name}] teacher test accuracy {test_acc:.2f}%")

    probe_log = train_projection_probe(teacher, cfg, dataset, device)
    metrics = {**metrics, "probe_train_acc": probe_log[-1]["train_acc"] if probe_log else None}
    atomic_torch_save(paths.checkpoint(proj_name), _teacher_checkpoint(
        "teacher_projection", proj_name, identity, cfg, teacher, metrics, probe_log))
    return teacher.eval(), metrics


# ----------------------------------------------------------------------------------------------
# Students
# ----------------------------------------------------------------------------------------------

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
                self.cfg.method.bank_size, exclude=indices, generator=self.bank_generator)
        with torch.autocast(device.type, enabled=False):
            losses = self.method.losses(outputs)
        total = sum(losses.values())
        self._steps += 1
        if device.type == "cpu":  # free to check here; on CUDA the epoch end checks (no sync)
            _check_finite(total, self.name, self.epoch + 1, self._steps)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        finite = _grads_finite(self.optimizer)
        if device.type == "cpu":
            if not bool(finite):
                raise _non_finite(self.name, "gradients", self.epoch + 1, self._steps)
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
            raise _non_finite(self.name, "loss or gradients", epoch, first_bad)
        _check_finite(self._total, self.name, epoch, self._steps)
        if not _params_finite([self.student, self.teacher_head]):
            raise _non_finite(self.name, "weights", epoch, self._steps)
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
                "identity": self.cfg.identity(), "epoch": self.epoch, "log": self.log,
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
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        data_generator.set_state(state["rng"]["data"])
        self.bank_generator.set_state(state["rng"]["bank"])
        set_global_rng_state(state["rng"])

    def final_checkpoint(self, metrics: dict) -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "student", "name": self.name,
                "identity": self.cfg.identity(), "config": self.cfg.to_dict(),
                "student_arch": self.cfg.model.student_arch,
                "num_classes": self.student.classifier.out_features,
                "student": {k: v.cpu() for k, v in self.student.state_dict().items()},
                "teacher_head": ({k: v.cpu() for k, v in self.teacher_head.state_dict().items()}
                                 if self.teacher_head is not None else None),
                "metrics": metrics, "log": self.log}


def build_student(arch: str, num_classes: int) -> Student:
    return Student(build_encoder(arch, num_classes))


def make_student_run(cfg: RunConfig, dataset: data_mod.ImageDataset, teacher: Teacher | None,
                     device: torch.device) -> StudentRun:
    """A fresh student with its optimiser: parameters seeded by the run's seed alone."""
    method = build_method(cfg.method)
    torch.manual_seed(cfg.optim.seed)
    student = build_student(cfg.model.student_arch, dataset.num_classes).to(device)
    student = student.to(memory_format=_memory_format(device))
    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    classifier_ids = {id(p) for p in student.classifier.parameters()}
    groups = [{"params": [p for p in student.parameters() if id(p) not in classifier_ids],
               "lr": lr, "weight_decay": wd},
              {"params": list(student.classifier.parameters()), "lr": lr, "weight_decay": wd}]
    teacher_head = None
    if method.uses_teacher:
        teacher_head = copy.deepcopy(teacher.head).to(device)
        groups.append({"params": list(teacher_head.parameters()), "lr": lr / 10, "weight_decay": wd})
    optimizer = _make_adam(groups, device)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.optim.epochs, 1))
    bank = None
    if method.uses_bank:
        bank = MomentumMemoryBank(len(dataset.train_labels), teacher_head[-1].out_features,
                                  dataset.train_labels, cfg.method.bank_momentum, device=device)
    if cfg.compile:
        student.forward = torch.compile(student.forward)
    return StudentRun(cfg, method, student, teacher_head, optimizer, scheduler, bank,
                      torch.Generator().manual_seed(cfg.optim.seed + 1), device, run_name(cfg))


def _lockstep_key(cfg: RunConfig) -> tuple:
    """Runs that can share batches: same data, data order, batch size, epochs and teacher."""
    return (repr(cfg.data_identity()), cfg.optim.seed, cfg.optim.batch_size, cfg.optim.epochs,
            repr(cfg.teacher_identity()))


@dataclass
class RunResult:
    name: str
    config: RunConfig
    checkpoint: Path
    metrics: dict
    log: list[dict]
    cached: bool
    analysis: dict | None = None  # section 7 metrics once analysed


def _result_from_checkpoint(cfg: RunConfig, path: Path, ckpt: dict, cached: bool) -> RunResult:
    analysis = (ckpt.get("analysis") or {}).get("metrics")
    return RunResult(ckpt["name"], cfg, path, ckpt["metrics"], ckpt["log"], cached, analysis)


def train_students(cfgs: list[RunConfig], dataset: data_mod.ImageDataset, teacher: Teacher | None,
                   device: torch.device, force: bool = False, resume: bool = True) -> list[RunResult]:
    """Train student configurations that share data order and teacher in lockstep.

    Cached runs (same name, same identity) are loaded, not retrained. Runs with an epoch
    checkpoint resume from it unless `resume` is False. Returns results in the order given.
    """
    if not cfgs:
        return []
    keys = {_lockstep_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError("lockstep training needs the same dataset, seed, batch size, epochs and "
                         "teacher for every run; train such groups separately")
    for cfg in cfgs:
        validate_config(cfg, dataset)
    paths = OutputPaths(cfgs[0].output_dir)
    check_output_dirs(paths)
    results: dict[str, RunResult] = {}
    pending: list[RunConfig] = []
    for cfg in cfgs:
        name, path = run_name(cfg), paths.checkpoint(run_name(cfg))
        ckpt = _cached(path, "student", cfg.identity(), force)
        if ckpt is not None:
            log.info(f"[{name}] loaded from cache: test acc {ckpt['metrics']['test_acc']:.2f}%")
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
            state = _load_partial(paths.partial_checkpoint(run.name), cfg.identity(), run.name)
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
            metrics = {"test_acc": run.log[-1]["test_acc"], "train_acc": run.log[-1]["train_acc"],
                       "train_test_gap": run.log[-1]["train_acc"] - run.log[-1]["test_acc"],
                       "seconds": sum(e["seconds"] for e in run.log), "epochs": run.epoch}
            ckpt = run.final_checkpoint(metrics)
            atomic_torch_save(paths.checkpoint(run.name), ckpt)
            _remove_partial(paths, run.name)
            results[run.name] = _result_from_checkpoint(run.cfg, paths.checkpoint(run.name), ckpt, False)
    if failures:  # the other runs are finished and saved; report every run that went bad
        if len(failures) == 1:
            raise failures[0]
        raise NonFiniteLossError("\n".join(str(f) for f in failures), failures[0].name,
                                 failures[0].epoch, failures[0].step)
    return [results[run_name(c)] for c in cfgs]


def _remove_partial(paths: OutputPaths, name: str) -> None:
    """The final checkpoint replaces the epoch checkpoint of a run in progress."""
    paths.partial_checkpoint(name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only removed when no other run is in progress
        paths.partial_checkpoint(name).parent.rmdir()


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
    n_steps = data_mod.batches_per_epoch(len(dataset.train_labels), batch_size)
    label = runs[0].name if len(runs) == 1 else f"{len(runs)} students in lockstep"
    fmt = _memory_format(device)
    active, failures = list(runs), []

    def stop(run: StudentRun, exc: NonFiniteLossError) -> None:
        active.remove(run)
        failures.append(_with_kept_state(exc, paths.partial_checkpoint(run.name), run.epoch))
        if active:
            log.warning(f"{failures[-1]} The other runs in lockstep go on.")

    for epoch in range(runs[0].epoch + 1, epochs + 1):
        if not active:
            break
        started = time.perf_counter()
        for run in active:
            run.start_epoch()
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels, batch_size,
                                         augment, generator)
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
            _save_log(paths, run.name, run.log)
            if epoch < epochs:
                atomic_torch_save(paths.partial_checkpoint(run.name), run.training_state(generator))
            log.info(_summary_line(run.name, entry, epochs))
    return active, failures


def train_student(cfg: RunConfig, dataset: data_mod.ImageDataset, teacher: Teacher | None,
                  device: torch.device, force: bool = False, resume: bool = True) -> RunResult:
    return train_students([cfg], dataset, teacher, device, force, resume)[0]


def load_student(path: str | Path, device: torch.device | str = "cpu") -> tuple[Student, dict]:
    """A trained student and its checkpoint dict (configuration, metrics, log)."""
    ckpt = load_checkpoint(path, expected_kind="student")
    student = build_student(ckpt["student_arch"], ckpt["num_classes"])
    load_matching_state_dict(student, ckpt["student"], source=str(path))
    return student.to(device).eval(), ckpt
