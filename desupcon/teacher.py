"""The teacher: weights (the published hub teacher by default, a file, or a published checkpoint in
`pth_models/`) or cross-entropy training with its own settings, then the cosine-probe projection
head (SPEC sections 2 and 6). Both are cached as `pth_models/teacher_<arch>_<dataset>[...].pth` and
`..._with_projection.pth`; teacher training writes epoch checkpoints and resumes like a student.
The loaded teacher carries a content fingerprint (backbone and head) that enters every student's
identity."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import data as data_mod
from desupcon.config import HUB_TEACHER, MethodConfig, OptimConfig, RunConfig, teacher_run_name
from desupcon.config.validation import validate_config
from desupcon.engine import distributed as dist
from desupcon.engine.build import build_run
from desupcon.engine.dataset import evaluate_accuracy
from desupcon.engine.devices import as_policy
from desupcon.engine.loop import train_group
from desupcon.methods import build_method
from desupcon.models import ModelOutputs, Student, Teacher, build_encoder, load_matching_state_dict
from desupcon.store.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, remove_partial
from desupcon.store.schemas import teacher_checkpoint
from desupcon.store.paths import OutputPaths, check_output_dirs
from desupcon.store.published import PUBLISHED_SOURCE, file_sha256, imported_path
from desupcon.store.weights import (fingerprint, is_plain_state_dict_file, load_encoder_weights, read_state_dict,
                                    resolve_source, split_projection)

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
        return ModelOutputs(features, z @ F.normalize(self.weight, dim=1).T / self.temperature, z)


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
    run = build_run(tcfg, teacher_run_name(cfg), cfg.teacher_backbone_identity(), build_method(tcfg.method),
                    model, [{"params": model.encoder.parameters(), "lr": t.lr, "weight_decay": t.weight_decay}],
                    [t.schedule], policy, kind="teacher", data_views=1)
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
    name = teacher_run_name(cfg, with_projection=True)
    identity = {**cfg.teacher_identity(), "backbone": fingerprint(teacher.encoder)}
    run = build_run(pcfg, name, identity, build_method(pcfg.method), probe,
                    [{"params": [*teacher.head.parameters(), probe.weight], "lr": cfg.teacher.probe_lr,
                      "weight_decay": 0.0}], ["constant"], policy, kind="probe", data_views=1)
    finished, failures = train_group([run], dataset, None, paths or OutputPaths(cfg.output_dir),
                                     resume=resume, save_every=cfg.save_every)
    if failures:
        raise failures[0]
    teacher.eval()
    return finished[0].log


def _teacher_checkpoint(kind: str, name: str, identity: dict, cfg: RunConfig, teacher: Teacher,
                        metrics: dict, entries: list[dict], source: dict) -> dict:
    return teacher_checkpoint(kind, name, identity, cfg.to_dict(), teacher.encoder, teacher.head, metrics, entries,
                              source)


def _finish(teacher: Teacher, metrics: dict, policy, head_probed: bool = True) -> tuple[Teacher, dict]:
    """The teacher on the policy's device in eval mode, with its content fingerprints (backbone and
    head; backbone alone), its source and whether its projection head is the probe-trained one."""
    teacher.fingerprint = metrics["fingerprint"] = fingerprint(teacher.encoder, teacher.head)
    teacher.backbone_fingerprint = fingerprint(teacher.encoder)
    teacher.head_probed = head_probed
    teacher.source = metrics.get("source", "")
    teacher = policy.prepare(teacher).eval()
    if policy.fold_teacher_batchnorm:  # (a fixed example: the global random generators stay untouched)
        example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        teacher.fold_batchnorm(policy.inputs(example.to(policy.device)))
    if policy.cast_teacher_weights and policy.autocast_dtype is not None:
        teacher.cast_weights_once(policy.autocast_dtype)
    return teacher, metrics


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


@dataclass
class TeacherRequest:
    """What every teacher source looks at: the configuration, the data, where files live, and
    which files exist (rank 0's view, on every process)."""

    cfg: RunConfig
    dataset: data_mod.ImageDataset
    policy: object
    paths: OutputPaths
    force: bool
    resume: bool
    published_proj: Path | None
    published_plain: Path | None

    @property
    def name(self) -> str:
        return teacher_run_name(self.cfg)

    @property
    def proj_name(self) -> str:
        return teacher_run_name(self.cfg, with_projection=True)

    @property
    def own_proj(self) -> Path:
        """Our checkpoint of the teacher with its head (beside a published file, never over it)."""
        return imported_path(self.paths.models, self.proj_name) if self.published_proj \
            else self.paths.checkpoint(self.proj_name)

    @property
    def own_backbone(self) -> Path:
        return imported_path(self.paths.models, self.name) if self.published_plain \
            else self.paths.checkpoint(self.name)

    def encoder(self) -> nn.Module:
        return build_encoder(self.cfg.model.teacher_arch, self.dataset.num_classes, self.cfg.model.init)

    @functools.cached_property
    def backbone_source(self) -> dict:
        """Where the backbone comes from when it is not cached: what a cached one must match."""
        if self.published_plain is not None:
            return {"kind": PUBLISHED_SOURCE, "file": str(self.published_plain),
                    "sha256": file_sha256(self.published_plain)}
        if self.cfg.model.teacher_weights:
            return {"kind": "weights", "file": self.cfg.model.teacher_weights}
        return {"kind": "trained"}


# -- sources of the teacher with its projection head (the first that answers is used) ----------

def published_with_projection(req: TeacherRequest) -> tuple[Teacher, dict] | None:
    """A published teacher-with-projection file in pth_models/ (SPEC 11): imported once (its head
    is used as published, not re-probed), our import reused afterwards."""
    if req.published_proj is None or req.force:
        return None
    cfg, dataset, policy = req.cfg, req.dataset, as_policy(req.policy)
    source = {"kind": PUBLISHED_SOURCE, "file": str(req.published_proj), "sha256": file_sha256(req.published_proj)}
    cached = _load_if(req.own_proj, "teacher_projection", cfg.teacher_identity(), lambda c: c.get("source") == source)
    if cached is not None:
        return _from_checkpoint(cached, req.encoder(), req.proj_name, policy)
    body, head = split_projection(read_state_dict(req.published_proj))
    if not head:
        raise CheckpointError(f"{req.published_proj} has no projection.* keys; a published "
                              "teacher with projection holds projection.0/2/4 (SPEC 11)")
    teacher = Teacher(req.encoder())
    load_encoder_weights(teacher.encoder, body, str(req.published_proj), dataset.num_classes, dataset.name,
                         cfg.model.teacher_arch)
    load_matching_state_dict(teacher.head, head, source=f"{req.published_proj} (projection head)")
    teacher = policy.prepare(teacher)
    test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels, dataset, policy)
    metrics = {"test_acc": test_acc, "train_acc": None, "source": PUBLISHED_SOURCE}
    _save(req.own_proj, _teacher_checkpoint("teacher_projection", req.proj_name, cfg.teacher_identity(), cfg,
                                            teacher, metrics, [], source))
    log.info(f"[{req.proj_name}] imported the published teacher with projection {req.published_proj} "
             f"(test acc {test_acc:.2f}%; its head is used as published, not re-probed)")
    return _finish(teacher, metrics, policy)


def own_cache_with_projection(req: TeacherRequest) -> tuple[Teacher, dict] | None:
    """Our cached teacher with its probe-trained head, of exactly this configuration."""
    if req.force:
        return None
    cached = dist.broadcast_from_main(_load_if(req.own_proj, "teacher_projection", req.cfg.teacher_identity())
                                      if dist.is_main() else None)
    return None if cached is None else _from_checkpoint(cached, req.encoder(), req.proj_name, as_policy(req.policy))


WITH_PROJECTION = (published_with_projection, own_cache_with_projection)


# -- sources of the backbone and classifier (the first that answers is used; its head is probed) --

def own_cache_backbone(req: TeacherRequest):
    """Our cached backbone of this configuration and source: (encoder, log, cached=True)."""
    if req.force and req.cfg.trains_teacher:
        return None
    source = req.backbone_source
    cached = dist.broadcast_from_main(_load_if(req.own_backbone, "teacher", req.cfg.teacher_backbone_identity(),
                                               lambda c: c.get("source", source) == source)
                                      if dist.is_main() else None)
    if cached is None:
        return None
    encoder = req.encoder()
    load_matching_state_dict(encoder, cached["encoder"], source=req.name)
    log.info(f"[{req.name}] loaded from cache")
    return encoder, cached["log"], True


def published_backbone(req: TeacherRequest):
    """A published teacher file in pth_models/ (SPEC 11)."""
    if req.published_plain is None:
        return None
    encoder = req.encoder()
    load_encoder_weights(encoder, read_state_dict(req.published_plain), str(req.published_plain),
                         req.dataset.num_classes, req.dataset.name, req.cfg.model.teacher_arch)
    log.info(f"[{req.name}] using the published teacher {req.published_plain}")
    return encoder, [], False


def weights_file_or_hub(req: TeacherRequest):
    """`--teacher-weights`: a file, `hf-hub:<repo>` or `released[:FOLDER]`."""
    weights = req.cfg.model.teacher_weights
    if not weights:
        return None
    path = resolve_source(weights, req.cfg.model.teacher_arch)
    encoder = req.encoder()
    load_encoder_weights(encoder, read_state_dict(path), weights, req.dataset.num_classes, req.dataset.name,
                         req.cfg.model.teacher_arch)
    log.info(f"[{req.name}] teacher weights from {weights} ({path})")
    return encoder, [], False


def trained_with_cross_entropy(req: TeacherRequest):
    """Cross-entropy training with the teacher's own settings (resumable)."""
    encoder, entries = train_teacher_encoder(req.cfg, req.dataset, req.policy, req.paths,
                                             resume=req.resume and not req.force)
    return encoder, entries, False


BACKBONE = (own_cache_backbone, published_backbone, weights_file_or_hub, trained_with_cross_entropy)


def load_or_train_teacher(cfg: RunConfig, dataset: data_mod.ImageDataset, policy,
                          force: bool = False, resume: bool = True, projection: bool = True) -> tuple[Teacher, dict]:
    """The frozen teacher with its probe-trained projection head, from the first source that has
    it: `WITH_PROJECTION` (a published teacher-with-projection file, our cached teacher), else a
    backbone from `BACKBONE` (our cached backbone, a published teacher file, `--teacher-weights`,
    cross-entropy training) whose head is then probed. With `projection=False` (no run reads the
    head) a backbone without a probed head is returned as it is (`teacher.head_probed` False): its
    head is the seeded initial one, which nothing may read. `force` retrains (or re-probes) the teacher;
    it is the teacher's own switch. Returns (teacher, metrics); `teacher.fingerprint` identifies
    its weights. Several processes decide as rank 0 does (node-local disks may differ)."""
    validate_config(cfg, dataset)
    policy = as_policy(policy)
    paths = OutputPaths(cfg.output_dir)
    check_output_dirs(paths)
    req = TeacherRequest(cfg, dataset, policy, paths, force, resume,
                         *dist.broadcast_from_main(_published_teacher_files(cfg, paths)))
    for source in WITH_PROJECTION:
        found = source(req)
        if found is not None:
            return found
    encoder, entries, cached = next(found for found in (source(req) for source in BACKBONE) if found is not None)
    backbone_source = req.backbone_source
    encoder = policy.prepare(encoder)
    torch.manual_seed(cfg.teacher.seed)  # the projection head's initialisation
    teacher = policy.prepare(Teacher(encoder))
    test_acc = evaluate_accuracy(teacher.encoder, dataset.test_images, dataset.test_labels, dataset, policy)
    metrics = {"test_acc": test_acc, "train_acc": entries[-1]["train_acc"] if entries else None,
               "source": backbone_source["kind"] if backbone_source["kind"] != "weights" else backbone_source["file"]}
    if not cached:
        _save(req.own_backbone, _teacher_checkpoint("teacher", req.name, cfg.teacher_backbone_identity(), cfg,
                                                    teacher, metrics, entries, backbone_source))
        remove_partial(paths, req.name)
    log.info(f"[{req.name}] teacher test accuracy {test_acc:.2f}%")
    if not projection:
        return _finish(teacher, metrics, policy, head_probed=False)
    probe_log = train_projection_probe(teacher, cfg, dataset, policy, paths, resume=resume and not force)
    metrics = {**metrics, "probe_train_acc": probe_log[-1]["train_acc"] if probe_log else None}
    _save(req.own_proj, _teacher_checkpoint("teacher_projection", req.proj_name, cfg.teacher_identity(), cfg,
                                            teacher, metrics, probe_log, backbone_source))
    remove_partial(paths, req.proj_name)  # the probe's epoch checkpoint: finished, no longer needed
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
            "head": {k: v.cpu() for k, v in teacher.head.state_dict().items()}, "metrics": dict(metrics),
            "head_probed": getattr(teacher, "head_probed", True)}


def teacher_from_state(state: dict, cfg: RunConfig, num_classes: int, policy) -> tuple[Teacher, dict]:
    teacher = Teacher(build_encoder(cfg.model.teacher_arch, num_classes, cfg.model.init))
    load_matching_state_dict(teacher.encoder, state["encoder"], source="rank 0's teacher")
    teacher.head.load_state_dict(state["head"])
    return _finish(teacher, dict(state["metrics"]), as_policy(policy), state.get("head_probed", True))


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
