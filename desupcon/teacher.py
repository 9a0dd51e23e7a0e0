"""The teacher: weights (the published hub teacher by default, a file, or a published checkpoint in
`pth_models/`) or cross-entropy training with its own settings, then the cosine-probe projection
head (SPEC sections 2 and 6). Both are cached as `pth_models/teacher_<arch>_<dataset>[...].pth` and
`..._with_projection.pth`; teacher training writes epoch checkpoints and resumes like a student.
The loaded teacher carries a content fingerprint (backbone and head) that enters every student's
identity."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, load_checkpoint
from .config import HUB_TEACHER, RunConfig, teacher_run_name
from .devices import autocast_for, make_adam, make_scheduler, memory_format
from .models import Teacher, build_encoder, load_matching_state_dict
from .published import PUBLISHED_SOURCE, file_sha256, imported_path
from .teacher_weights import (fingerprint, is_plain_state_dict_file, load_encoder_weights,
                              read_state_dict, resolve_source, split_projection)
from .runs import (NonFiniteLossError, OutputPaths, cached_checkpoint, check_finite, check_output_dirs,
                   evaluate_accuracy, global_rng_state, grads_finite, load_partial, non_finite_error,
                   params_finite, remove_partial, save_log, set_global_rng_state, summary_line, with_kept_state)
from .validation import validate_config

log = logging.getLogger("desupcon")


def train_teacher_encoder(cfg: RunConfig, dataset: data_mod.ImageDataset, device: torch.device,
                          paths: OutputPaths, resume: bool = True) -> tuple[nn.Module, list[dict]]:
    """Cross-entropy training of the teacher backbone + classifier (single augmented view).

    Like a student run, it writes an epoch checkpoint (`pth_models/in_progress/<teacher>.pth`) and
    resumes from one bit-identically unless `resume` is False.
    """
    t = cfg.teacher
    torch.manual_seed(t.seed)
    encoder = build_encoder(cfg.model.teacher_arch, dataset.num_classes, cfg.model.init).to(device)
    encoder = encoder.to(memory_format=memory_format(device))
    opt = make_adam([{"params": encoder.parameters(), "lr": t.lr, "weight_decay": t.weight_decay}], device)
    epochs = t.epochs
    sched = make_scheduler(opt, [t.schedule], epochs)
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(cfg.teacher.seed)
    name = teacher_run_name(cfg)
    identity = cfg.teacher_backbone_identity()
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
        n_steps = data_mod.batches_per_epoch(len(dataset.train_labels), t.batch_size)
        batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels,
                                         t.batch_size, augment, gen, views=1)
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
                                         cfg.teacher.batch_size, augment, gen, views=1)
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
                      epoch, data_mod.batches_per_epoch(len(dataset.train_labels), cfg.teacher.batch_size))
        entry = {"epoch": epoch, "loss": loss_sum.item() / seen,
                 "train_acc": 100.0 * correct.item() / seen, "lr": cfg.teacher.probe_lr,
                 "seconds": time.perf_counter() - start}
        entries.append(entry)
        log.info(summary_line("projection probe", entry, cfg.teacher.probe_epochs))
    teacher.eval()
    return entries


def _teacher_checkpoint(kind: str, name: str, identity: dict, cfg: RunConfig, teacher: Teacher,
                        metrics: dict, entries: list[dict], source: dict) -> dict:
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": kind, "name": name, "identity": identity,
            "config": cfg.to_dict(), "arch": cfg.model.teacher_arch,
            "num_classes": teacher.encoder.fc.out_features,
            "encoder": {k: v.cpu() for k, v in teacher.encoder.state_dict().items()},
            "metrics": metrics, "log": entries, "source": source}
    if kind == "teacher_projection":
        ckpt["head"] = {k: v.cpu() for k, v in teacher.head.state_dict().items()}
    return ckpt


def _finish(teacher: Teacher, metrics: dict, device: torch.device) -> tuple[Teacher, dict]:
    """The teacher on `device` in eval mode, with its content fingerprint and source attached."""
    teacher.fingerprint = metrics["fingerprint"] = fingerprint(teacher.encoder, teacher.head)
    teacher.source = metrics.get("source", "")
    return teacher.to(device).to(memory_format=memory_format(device)).eval(), metrics


def _published_teacher_files(cfg: RunConfig, paths: OutputPaths) -> tuple[Path | None, Path | None]:
    """Published teacher files (plain state dicts under their SPEC 11 names) usable for `cfg`:
    (teacher with projection, teacher). Only the published teacher's configuration uses them."""
    if cfg.model.teacher_weights != HUB_TEACHER:
        return None, None
    found = []
    for path in (paths.checkpoint(teacher_run_name(cfg, with_projection=True)),
                 paths.checkpoint(teacher_run_name(cfg))):
        found.append(path if path.is_file() and is_plain_state_dict_file(path) else None)
    return found[0], found[1]


def load_or_train_teacher(cfg: RunConfig, dataset: data_mod.ImageDataset, device: torch.device,
                          force: bool = False, resume: bool = True) -> tuple[Teacher, dict]:
    """The frozen teacher with its probe-trained projection head, from cache when possible.

    Sources, in order: our cached teacher of this configuration; a published teacher-with-
    projection file in `pth_models/` (its head is not re-probed); a published teacher file there;
    `model.teacher_weights` (a file or the hub); cross-entropy training with the teacher's own
    settings. `force` retrains (or re-probes) the teacher; it is the teacher's own switch.
    Returns (teacher, metrics); `teacher.fingerprint` identifies its weights.
    """
    validate_config(cfg, dataset)
    paths = OutputPaths(cfg.output_dir)
    check_output_dirs(paths)
    identity = cfg.teacher_identity()
    name, proj_name = teacher_run_name(cfg), teacher_run_name(cfg, with_projection=True)
    encoder = build_encoder(cfg.model.teacher_arch, dataset.num_classes, cfg.model.init)
    published_proj, published_plain = _published_teacher_files(cfg, paths)
    # Our checkpoint of the teacher lives beside a published file of the same name, never over it.
    own_proj = imported_path(paths.models, proj_name) if published_proj else paths.checkpoint(proj_name)
    own_name = imported_path(paths.models, name) if published_plain else paths.checkpoint(name)

    if published_proj is not None and not force:
        sha = file_sha256(published_proj)
        source = {"kind": PUBLISHED_SOURCE, "file": str(published_proj), "sha256": sha}
        cached = _load_if(own_proj, "teacher_projection", identity, lambda c: c.get("source") == source)
        if cached is None:
            body, head = split_projection(read_state_dict(published_proj))
            if not head:
                raise CheckpointError(f"{published_proj} has no projection.* keys; a published "
                                      "teacher with projection holds projection.0/2/4 (SPEC 11)")
            teacher = Teacher(encoder)
            load_encoder_weights(teacher.encoder, body, str(published_proj), dataset.num_classes, dataset.name,
                                 cfg.model.teacher_arch)
            load_matching_state_dict(teacher.head, head, source=f"{published_proj} (projection head)")
            teacher = teacher.to(device)
            test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels,
                                         dataset, device)
            metrics = {"test_acc": test_acc, "train_acc": None, "source": PUBLISHED_SOURCE}
            atomic_torch_save(own_proj, _teacher_checkpoint("teacher_projection", proj_name, identity, cfg,
                                                            teacher, metrics, [], source))
            log.info(f"[{proj_name}] imported the published teacher with projection {published_proj} "
                     f"(test acc {test_acc:.2f}%; its head is used as published, not re-probed)")
            return _finish(teacher, metrics, device)
        return _from_checkpoint(cached, encoder, proj_name, device)

    cached_proj = None if force else _load_if(own_proj, "teacher_projection", identity)
    if cached_proj is not None:
        return _from_checkpoint(cached_proj, encoder, proj_name, device)

    backbone_identity = cfg.teacher_backbone_identity()
    entries: list[dict] = []
    if published_plain is not None:
        source = {"kind": PUBLISHED_SOURCE, "file": str(published_plain), "sha256": file_sha256(published_plain)}
    elif cfg.model.teacher_weights:
        source = {"kind": "weights", "file": cfg.model.teacher_weights}
    else:
        source = {"kind": "trained"}
    cached = None
    if not (force and cfg.trains_teacher):
        cached = _load_if(own_name, "teacher", backbone_identity,
                          lambda c: c.get("source", source) == source)
    if cached is not None:
        load_matching_state_dict(encoder, cached["encoder"], source=name)
        entries = cached["log"]
        log.info(f"[{name}] loaded from cache")
    elif published_plain is not None:
        load_encoder_weights(encoder, read_state_dict(published_plain), str(published_plain),
                             dataset.num_classes, dataset.name, cfg.model.teacher_arch)
        log.info(f"[{name}] using the published teacher {published_plain}")
    elif cfg.model.teacher_weights:
        path = resolve_source(cfg.model.teacher_weights)
        load_encoder_weights(encoder, read_state_dict(path), cfg.model.teacher_weights,
                             dataset.num_classes, dataset.name, cfg.model.teacher_arch)
        log.info(f"[{name}] teacher weights from {cfg.model.teacher_weights} ({path})")
    else:
        encoder, entries = train_teacher_encoder(cfg, dataset, device, paths,
                                                 resume=resume and not force)
    encoder = encoder.to(device).to(memory_format=memory_format(device))
    torch.manual_seed(cfg.teacher.seed)  # the projection head's initialisation
    teacher = Teacher(encoder).to(device)
    test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels, dataset, device)
    metrics = {"test_acc": test_acc, "train_acc": entries[-1]["train_acc"] if entries else None,
               "source": source["kind"] if source["kind"] != "weights" else source["file"]}
    if cached is None:
        atomic_torch_save(own_name, _teacher_checkpoint("teacher", name, backbone_identity, cfg, teacher,
                                                        metrics, entries, source))
        remove_partial(paths, name)
    log.info(f"[{name}] teacher test accuracy {test_acc:.2f}%")

    probe_log = train_projection_probe(teacher, cfg, dataset, device)
    metrics = {**metrics, "probe_train_acc": probe_log[-1]["train_acc"] if probe_log else None}
    atomic_torch_save(own_proj, _teacher_checkpoint("teacher_projection", proj_name, identity, cfg,
                                                    teacher, metrics, probe_log, source))
    return _finish(teacher, metrics, device)


def _load_if(path: Path, kind: str, identity: dict, accept=lambda ckpt: True) -> dict | None:
    """Our checkpoint at `path` when it holds this identity (and `accept`s), else None. A checkpoint
    of another teacher configuration under the same name is replaced, with a warning."""
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, expected_kind=kind)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Rerun with --force-teacher to rebuild it, or restore it from "
                              "a backup") from exc
    if ckpt.get("identity") == identity and accept(ckpt):
        return ckpt
    log.warning(f"{path} holds another teacher configuration or source; it will be replaced")
    return None


def _from_checkpoint(ckpt: dict, encoder: nn.Module, name: str, device: torch.device) -> tuple[Teacher, dict]:
    teacher = Teacher(encoder)
    load_matching_state_dict(teacher.encoder, ckpt["encoder"], source=name)
    teacher.head.load_state_dict(ckpt["head"])
    log.info(f"[{name}] loaded from cache (test acc {ckpt['metrics']['test_acc']:.2f}%)")
    return _finish(teacher, dict(ckpt["metrics"]), device)


def teacher_checkpoint_path(cfg: RunConfig) -> Path:
    """Where the teacher-with-projection checkpoint of `cfg` is (imported/ beside a published file)."""
    paths = OutputPaths(cfg.output_dir)
    proj = paths.checkpoint(teacher_run_name(cfg, with_projection=True))
    if cfg.model.teacher_weights == HUB_TEACHER and proj.is_file() and is_plain_state_dict_file(proj):
        return imported_path(paths.models, proj.stem)
    return proj


def check_teacher_available(cfg: RunConfig) -> None:
    """Raise `TeacherWeightsUnavailableError` now if `cfg`'s teacher cannot be had (before any data
    is loaded): fine when it is trained, cached, a published file in `pth_models/`, or its weights
    resolve (a local file, or the hub: fetched into its cache, or read from it offline)."""
    if cfg.trains_teacher:
        return
    paths = OutputPaths(cfg.output_dir)
    published_proj, published_plain = _published_teacher_files(cfg, paths)
    if published_proj or published_plain or teacher_checkpoint_path(cfg).is_file() \
            or paths.checkpoint(teacher_run_name(cfg)).is_file():
        return
    resolve_source(cfg.model.teacher_weights)
