"""The teacher: cross-entropy training (or weights from a file), then the cosine-probe projection
head (SPEC section 2). Both are cached as `pth_models/teacher_<arch>_<dataset>[...].pth` and
`..._with_projection.pth`; teacher training writes epoch checkpoints and resumes like a student."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from .checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, describe_load_failure
from .config import RunConfig, teacher_run_name
from .devices import autocast_for, make_adam, memory_format
from .models import (CheckpointMismatchError, Teacher, build_encoder, load_matching_state_dict,
                     normalise_state_dict_layout)
from .runs import (NonFiniteLossError, OutputPaths, cached_checkpoint, check_finite, check_output_dirs,
                   evaluate_accuracy, global_rng_state, grads_finite, load_partial, non_finite_error,
                   params_finite, remove_partial, save_log, set_global_rng_state, summary_line, with_kept_state)
from .validation import validate_config

log = logging.getLogger("desupcon")


def teacher_backbone_identity(cfg: RunConfig) -> dict:
    return {k: v for k, v in cfg.teacher_identity().items() if k != "probe"}


def train_teacher_encoder(cfg: RunConfig, dataset: data_mod.ImageDataset, device: torch.device,
                          paths: OutputPaths, resume: bool = True) -> tuple[nn.Module, list[dict]]:
    """Cross-entropy training of the teacher backbone + classifier (single augmented view).

    Like a student run, it writes an epoch checkpoint (`pth_models/in_progress/<teacher>.pth`) and
    resumes from one bit-identically unless `resume` is False.
    """
    torch.manual_seed(cfg.teacher.seed)
    encoder = build_encoder(cfg.model.teacher_arch, dataset.num_classes).to(device)
    encoder = encoder.to(memory_format=memory_format(device))
    opt = make_adam([{"params": encoder.parameters(), "lr": cfg.optim.lr,
                       "weight_decay": cfg.optim.weight_decay}], device)
    epochs = cfg.teacher.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(cfg.teacher.seed)
    name = teacher_run_name(cfg)
    identity = teacher_backbone_identity(cfg)
    partial = paths.partial_checkpoint(name)
    entries: list[dict] = []
    done = 0
    state = load_partial(partial, identity, name) if resume else None
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
                    logits = encoder(x.contiguous(memory_format=memory_format(device)))
                loss = F.cross_entropy(logits.float(), y)
                if device.type == "cpu":
                    check_finite(loss, name, epoch, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if device.type == "cpu" and not bool(grads_finite(opt)):
                    raise non_finite_error(name, "gradients", epoch, step)
                opt.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.argmax(1) == y).sum()
                seen += y.shape[0]
            check_finite(loss_sum, name, epoch, n_steps)
            if not params_finite([encoder]):
                raise non_finite_error(name, "weights", epoch, n_steps)
        except NonFiniteLossError as exc:
            raise with_kept_state(exc, partial, epoch - 1) from None
        lr = opt.param_groups[0]["lr"]
        sched.step()
        encoder.eval()
        entry = {"epoch": epoch, "loss": loss_sum.item() / seen, "train_acc": 100.0 * correct.item() / seen,
                 "test_acc": evaluate_accuracy(encoder, dataset.test_images, dataset.test_labels,
                                               dataset, device),
                 "lr": lr, "seconds": time.perf_counter() - start}
        entries.append(entry)
        save_log(paths, name, entries)
        if epoch < epochs:
            atomic_torch_save(partial, {
                "format": CHECKPOINT_FORMAT, "kind": "in_progress", "name": name, "identity": identity,
                "epoch": epoch, "log": entries, "encoder": encoder.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"data": gen.get_state(), **global_rng_state()}})
        log.info(summary_line(name, entry, epochs))
    return encoder, entries


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
                features, _ = teacher(x.contiguous(memory_format=memory_format(device)))
            z = teacher.project(features.float())
            logits = z @ F.normalize(weight, dim=1).T / cfg.teacher.probe_temperature
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
        check_finite(loss_sum, f"{teacher_run_name(cfg, with_projection=True)} (projection probe)",
                      epoch, data_mod.batches_per_epoch(len(dataset.train_labels), cfg.optim.batch_size))
        entry = {"epoch": epoch, "loss": loss_sum.item() / seen,
                 "train_acc": 100.0 * correct.item() / seen, "lr": cfg.teacher.probe_lr,
                 "seconds": time.perf_counter() - start}
        entries.append(entry)
        log.info(summary_line("projection probe", entry, cfg.teacher.probe_epochs))
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

    cached_proj = cached_checkpoint(paths.checkpoint(proj_name), "teacher_projection", identity, force)
    if cached_proj is not None:
        teacher = Teacher(encoder)
        load_matching_state_dict(teacher.encoder, cached_proj["encoder"], source=proj_name)
        teacher.head.load_state_dict(cached_proj["head"])
        log.info(f"[{proj_name}] loaded from cache (test acc {cached_proj['metrics']['test_acc']:.2f}%)")
        return teacher.to(device).to(memory_format=memory_format(device)).eval(), cached_proj["metrics"]

    backbone_identity = teacher_backbone_identity(cfg)
    cached = cached_checkpoint(paths.checkpoint(name), "teacher", backbone_identity, force)
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
    encoder = encoder.to(device).to(memory_format=memory_format(device))
    torch.manual_seed(cfg.teacher.seed)  # the projection head's initialisation
    teacher = Teacher(encoder).to(device)
    test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels, dataset, device)
    metrics = {"test_acc": test_acc, "train_acc": entries[-1]["train_acc"] if entries else None}
    if cached is None:
        atomic_torch_save(paths.checkpoint(name), _teacher_checkpoint(
            "teacher", name, backbone_identity, cfg, teacher, metrics, entries))
        remove_partial(paths, name)
    log.info(f"[{name}] teacher test accuracy {test_acc:.2f}%")

    probe_log = train_projection_probe(teacher, cfg, dataset, device)
    metrics = {**metrics, "probe_train_acc": probe_log[-1]["train_acc"] if probe_log else None}
    atomic_torch_save(paths.checkpoint(proj_name), _teacher_checkpoint(
        "teacher_projection", proj_name, identity, cfg, teacher, metrics, probe_log))
    return teacher.eval(), metrics
