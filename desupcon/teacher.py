"""The teacher: weights (the published hub teacher by default, a file, or a published checkpoint in
`pth_models/`) or cross-entropy training with its own settings, then the cosine-probe projection
head (SPEC sections 2 and 6). Both are cached as `pth_models/teacher_<arch>_<dataset>[...].pth` and
`..._with_projection.pth`; teacher training writes epoch checkpoints and resumes like a student.
The loaded teacher carries a content fingerprint (backbone and head) that enters every student's
identity."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from . import distributed as dist
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, load_checkpoint
from .config import HUB_TEACHER, RunConfig, teacher_run_name
from .config import MethodConfig, OptimConfig
from .devices import as_policy, make_scheduler
from .methods import build_method
from .models import Student, Teacher, build_encoder, load_matching_state_dict
from .published import PUBLISHED_SOURCE, file_sha256, imported_path
from .teacher_weights import (fingerprint, is_plain_state_dict_file, load_encoder_weights,
                              read_state_dict, resolve_source, split_projection)
from .train import Run, make_optimizer, train_group
from .runs import OutputPaths, check_output_dirs, evaluate_accuracy, remove_partial
from .validation import validate_config

log = logging.getLogger("desupcon")


def _save(path: Path, obj) -> None:
    """Only the first process writes (several GPUs); the others wait for the file."""
    if dist.is_main():
        atomic_torch_save(path, obj)
    dist.barrier()


def teacher_training_config(cfg: RunConfig) -> RunConfig:
    """The teacher's cross-entropy training as a run: the `ce` method on the teacher's architecture,
    with the teacher's own settings (never the student's)."""
    t = cfg.teacher
    return cfg.replace(model={"student_arch": cfg.model.teacher_arch}, method=MethodConfig(method="ce"),
                       optim=OptimConfig(epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer,
                                         lr=t.lr, weight_decay=t.weight_decay, schedule=t.schedule,
                                         drop_last=True, seed=t.seed))


def probe_config(cfg: RunConfig) -> RunConfig:
    """The cosine probe of the projection head as a run (constant Adam, no weight decay)."""
    t = cfg.teacher
    return cfg.replace(method=MethodConfig(method="ce"),
                       optim=OptimConfig(epochs=max(t.probe_epochs, 1), batch_size=t.batch_size,
                                         lr=t.probe_lr, drop_last=True, seed=t.seed + 7))


class CosineProbe(nn.Module):
    """The teacher's projection head under a bias-free cosine classifier (SPEC 2): logits =
    cos(head(f), W_c) / T on the frozen backbone's features; W is discarded after the probe."""

    def __init__(self, teacher: Teacher, num_classes: int, temperature: float):
        super().__init__()
        self.teacher = teacher
        self.weight = nn.Parameter(torch.randn(num_classes, teacher.head[-1].out_features) * 0.01)
        self.temperature = temperature

    def forward(self, x: torch.Tensor, detach_classifier: bool = False):
        with torch.no_grad():
            features = self.teacher.encoder.forward_features(x)
        z = self.teacher.project(features.float())
        return features, z, z @ F.normalize(self.weight, dim=1).T / self.temperature


def train_teacher_encoder(cfg: RunConfig, dataset: data_mod.ImageDataset, policy,
                          paths: OutputPaths, resume: bool = True) -> tuple[nn.Module, list[dict]]:
    """Cross-entropy training of the teacher backbone + classifier (single augmented view), through
    the one training loop: epoch checkpoints (`pth_models/in_progress/<teacher>.pth`), exact resume
    unless `resume` is False, the deferred finiteness check."""
    policy = as_policy(policy)
    tcfg = teacher_training_config(cfg)
    t = cfg.teacher
    torch.manual_seed(t.seed)
    model = policy.prepare(Student(build_encoder(cfg.model.teacher_arch, dataset.num_classes, cfg.model.init)))
    optimizer = make_optimizer(tcfg.optim, [{"params": model.encoder.parameters(), "lr": t.lr,
                                             "weight_decay": t.weight_decay}], policy)
    run = Run(tcfg, teacher_run_name(cfg), cfg.teacher_backbone_identity(), build_method(tcfg.method), model,
              None, optimizer, make_scheduler(optimizer, [t.schedule], t.epochs), policy, tcfg.optim,
              data_views=1, kind="teacher")
    finished, failures = train_group([run], dataset, None, paths, resume=resume, save_every=cfg.save_every)
    if failures:
        raise failures[0]
    return finished[0].model.encoder, finished[0].log


def train_projection_probe(teacher: Teacher, cfg: RunConfig, dataset: data_mod.ImageDataset,
                           policy, paths: OutputPaths | None = None, resume: bool = True) -> list[dict]:
    """Cosine probe of the teacher's projection head on the frozen backbone, through the one
    training loop (augmented views, Adam, constant lr); resumes from its epoch checkpoint unless
    `resume` is False. Returns the probe's log."""
    if cfg.teacher.probe_epochs < 1:
        return []
    policy = as_policy(policy)
    pcfg = probe_config(cfg)
    torch.manual_seed(cfg.teacher.seed)
    probe = CosineProbe(teacher, dataset.num_classes, cfg.teacher.probe_temperature).to(policy.device)
    optimizer = policy.make_adam([{"params": [*teacher.head.parameters(), probe.weight],
                                   "lr": cfg.teacher.probe_lr, "weight_decay": 0.0}])
    name = teacher_run_name(cfg, with_projection=True)
    identity = {**cfg.teacher_identity(), "backbone": fingerprint(teacher.encoder)}
    run = Run(pcfg, name, identity, build_method(pcfg.method), probe, None, optimizer,
              make_scheduler(optimizer, ["constant"], pcfg.optim.epochs), policy, pcfg.optim,
              data_views=1, kind="probe")
    finished, failures = train_group([run], dataset, None, paths or OutputPaths(cfg.output_dir),
                                     resume=resume, save_every=cfg.save_every)
    if failures:
        raise failures[0]
    teacher.eval()
    return finished[0].log


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


def _finish(teacher: Teacher, metrics: dict, policy) -> tuple[Teacher, dict]:
    """The teacher on the policy's device in eval mode, with its content fingerprint and source."""
    teacher.fingerprint = metrics["fingerprint"] = fingerprint(teacher.encoder, teacher.head)
    teacher.source = metrics.get("source", "")
    return policy.prepare(teacher).eval(), metrics


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


def load_or_train_teacher(cfg: RunConfig, dataset: data_mod.ImageDataset, policy,
                          force: bool = False, resume: bool = True) -> tuple[Teacher, dict]:
    """The frozen teacher with its probe-trained projection head, from cache when possible.

    Sources, in order: our cached teacher of this configuration; a published teacher-with-
    projection file in `pth_models/` (its head is not re-probed); a published teacher file there;
    `model.teacher_weights` (a file or the hub); cross-entropy training with the teacher's own
    settings. `force` retrains (or re-probes) the teacher; it is the teacher's own switch.
    Returns (teacher, metrics); `teacher.fingerprint` identifies its weights.
    """
    validate_config(cfg, dataset)
    policy = as_policy(policy)
    paths = OutputPaths(cfg.output_dir)
    check_output_dirs(paths)
    identity = cfg.teacher_identity()
    name, proj_name = teacher_run_name(cfg), teacher_run_name(cfg, with_projection=True)
    encoder = build_encoder(cfg.model.teacher_arch, dataset.num_classes, cfg.model.init)
    # Several processes decide as rank 0 does (node-local disks may differ): which files exist,
    # which checkpoints are cached; the others then use rank 0's loaded checkpoints.
    published_proj, published_plain = dist.broadcast_from_main(_published_teacher_files(cfg, paths))
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
            teacher = policy.prepare(teacher)
            test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels,
                                         dataset, policy)
            metrics = {"test_acc": test_acc, "train_acc": None, "source": PUBLISHED_SOURCE}
            _save(own_proj, _teacher_checkpoint("teacher_projection", proj_name, identity, cfg,
                                                            teacher, metrics, [], source))
            log.info(f"[{proj_name}] imported the published teacher with projection {published_proj} "
                     f"(test acc {test_acc:.2f}%; its head is used as published, not re-probed)")
            return _finish(teacher, metrics, policy)
        return _from_checkpoint(cached, encoder, proj_name, policy)

    cached_proj = None if force else dist.broadcast_from_main(
        _load_if(own_proj, "teacher_projection", identity) if dist.is_main() else None)
    if cached_proj is not None:
        return _from_checkpoint(cached_proj, encoder, proj_name, policy)

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
        cached = dist.broadcast_from_main(_load_if(own_name, "teacher", backbone_identity,
                                                   lambda c: c.get("source", source) == source)
                                          if dist.is_main() else None)
    if cached is not None:
        load_matching_state_dict(encoder, cached["encoder"], source=name)
        entries = cached["log"]
        log.info(f"[{name}] loaded from cache")
    elif published_plain is not None:
        load_encoder_weights(encoder, read_state_dict(published_plain), str(published_plain),
                             dataset.num_classes, dataset.name, cfg.model.teacher_arch)
        log.info(f"[{name}] using the published teacher {published_plain}")
    elif cfg.model.teacher_weights:
        path = resolve_source(cfg.model.teacher_weights, cfg.model.teacher_arch)
        load_encoder_weights(encoder, read_state_dict(path), cfg.model.teacher_weights,
                             dataset.num_classes, dataset.name, cfg.model.teacher_arch)
        log.info(f"[{name}] teacher weights from {cfg.model.teacher_weights} ({path})")
    else:
        encoder, entries = train_teacher_encoder(cfg, dataset, policy, paths,
                                                 resume=resume and not force)
    encoder = policy.prepare(encoder)
    torch.manual_seed(cfg.teacher.seed)  # the projection head's initialisation
    teacher = policy.prepare(Teacher(encoder))
    test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels, dataset, policy)
    metrics = {"test_acc": test_acc, "train_acc": entries[-1]["train_acc"] if entries else None,
               "source": source["kind"] if source["kind"] != "weights" else source["file"]}
    if cached is None:
        _save(own_name, _teacher_checkpoint("teacher", name, backbone_identity, cfg, teacher,
                                                        metrics, entries, source))
        remove_partial(paths, name)
    log.info(f"[{name}] teacher test accuracy {test_acc:.2f}%")

    probe_log = train_projection_probe(teacher, cfg, dataset, policy, paths, resume=resume and not force)
    metrics = {**metrics, "probe_train_acc": probe_log[-1]["train_acc"] if probe_log else None}
    _save(own_proj, _teacher_checkpoint("teacher_projection", proj_name, identity, cfg,
                                                    teacher, metrics, probe_log, source))
    remove_partial(paths, proj_name)  # the probe's epoch checkpoint: finished, no longer needed
    return _finish(teacher, metrics, policy)


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


def _from_checkpoint(ckpt: dict, encoder: nn.Module, name: str, policy) -> tuple[Teacher, dict]:
    teacher = Teacher(encoder)
    load_matching_state_dict(teacher.encoder, ckpt["encoder"], source=name)
    teacher.head.load_state_dict(ckpt["head"])
    log.info(f"[{name}] loaded from cache (test acc {ckpt['metrics']['test_acc']:.2f}%)")
    return _finish(teacher, dict(ckpt["metrics"]), policy)


def teacher_ready(cfg: RunConfig) -> bool:
    """Whether `cfg`'s teacher with its projection head can be had without training anything: a
    cached checkpoint of this configuration, or a published teacher-with-projection file."""
    paths = OutputPaths(cfg.output_dir)
    if _published_teacher_files(cfg, paths)[0] is not None:
        return True
    try:
        return _load_if(teacher_checkpoint_path(cfg), "teacher_projection", cfg.teacher_identity()) is not None
    except CheckpointError:
        return False


def teacher_state(teacher: Teacher, metrics: dict) -> dict:
    """What another process needs to rebuild this teacher (`teacher_from_state`)."""
    return {"encoder": {k: v.cpu() for k, v in teacher.encoder.state_dict().items()},
            "head": {k: v.cpu() for k, v in teacher.head.state_dict().items()}, "metrics": dict(metrics)}


def teacher_from_state(state: dict, cfg: RunConfig, num_classes: int, policy) -> tuple[Teacher, dict]:
    teacher = Teacher(build_encoder(cfg.model.teacher_arch, num_classes, cfg.model.init))
    load_matching_state_dict(teacher.encoder, state["encoder"], source="rank 0's teacher")
    teacher.head.load_state_dict(state["head"])
    return _finish(teacher, dict(state["metrics"]), as_policy(policy))


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
    resolve_source(cfg.model.teacher_weights, cfg.model.teacher_arch)
