"""Finished runs: our cached checkpoints, published students imported once, trained students
loaded back."""

from __future__ import annotations

import logging
from pathlib import Path

from desupcon import data as data_mod
from desupcon.config import run_name, RunConfig
from desupcon.engine.build import build_student
from desupcon.engine.dataset import evaluate_accuracy
from desupcon.engine.devices import as_policy, DevicePolicy
from desupcon.engine.run import RunResult
from desupcon.models import load_matching_state_dict, Student
from desupcon.store.checkpoint import CheckpointError, atomic_torch_save, identity_diff, load_checkpoint
from desupcon.store.paths import OutputPaths
from desupcon.store.schemas import student_checkpoint
from desupcon.store.published import (PUBLISHED_SOURCE, file_sha256, imported_path, load_plain_state,
                                      published_config, published_names, student_state_from_published)
from desupcon.store.records import read_record


log = logging.getLogger("desupcon")


def result_from_checkpoint(cfg: RunConfig, path: Path, ckpt: dict, cached: bool) -> RunResult:
    analysis = (read_record(cfg, ckpt["name"]) or {}).get("metrics") or None  # None: not analysed yet
    source = (ckpt.get("source") or {}).get("kind", "trained")
    return RunResult(ckpt["name"], cfg, path, ckpt["metrics"], ckpt["log"], cached, analysis, source)


def is_published(ckpt: dict) -> bool:
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
    test_acc = evaluate_accuracy(lambda x: student(x).logits, dataset.test_images, dataset.test_labels,
                                 dataset, policy)
    metrics = {"test_acc": test_acc, "train_acc": None, "train_test_gap": None, "best_test_acc": None,
               "best_epoch": None, "seconds": None, "epochs": cfg.optim.epochs}
    ckpt = student_checkpoint(name, identity if identity is not None else {"unnamed": name}, cfg.to_dict(), student,
                              metrics, [], (identity or {}).get("teacher", {}).get("fingerprint"),
                              source={"kind": PUBLISHED_SOURCE, "file": str(original), "sha256": sha,
                                      "described_run": published_config(name) is not None})
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
