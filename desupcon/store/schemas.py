"""The checkpoint schemas, in one place: what a student's, a teacher's and an in-progress run's
`.pth` hold. Every checkpoint is a plain dict of tensors and plain data (`torch.load(...,
weights_only=True)` reads it), tagged with the format and its kind, and written once, by the run
it belongs to; what is measured on it later goes to the records (`store/records.py`)."""

from __future__ import annotations

import torch.nn as nn

from desupcon.store.checkpoint import CHECKPOINT_FORMAT


def cpu_state(module: nn.Module | None) -> dict | None:
    return None if module is None else {k: v.detach().cpu() for k, v in module.state_dict().items()}


def student_checkpoint(name: str, identity: dict, config: dict, student: nn.Module, metrics: dict, log: list,
                       teacher_fingerprint: str | None = None, teacher_head: nn.Module | dict | None = None,
                       method_state: dict | None = None, **extra) -> dict:
    """A finished student: its weights (`Student` layout), the trainable teacher-head copy, the
    method's own state, final metrics and per-epoch log; `extra`: `source` (an imported published
    file) or `two_stage` (both phases' settings and logs)."""
    head = teacher_head if isinstance(teacher_head, dict) or teacher_head is None else cpu_state(teacher_head)
    return {"format": CHECKPOINT_FORMAT, "kind": "student", "name": name, "identity": identity, "config": config,
            "teacher_fingerprint": teacher_fingerprint, "student_arch": config["model"]["student_arch"],
            "num_classes": student.classifier.out_features, "student": cpu_state(student), "teacher_head": head,
            "method_state": method_state, "metrics": metrics, "log": log, **extra}


def teacher_checkpoint(kind: str, name: str, identity: dict, config: dict, encoder: nn.Module,
                       head: nn.Module | None, metrics: dict, log: list, source: dict) -> dict:
    """The teacher's backbone and classifier (`teacher`), with its probe-trained projection head
    (`teacher_projection`)."""
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": kind, "name": name, "identity": identity, "config": config,
            "arch": config["model"]["teacher_arch"], "num_classes": encoder.fc.out_features,
            "encoder": cpu_state(encoder), "metrics": metrics, "log": log, "source": source}
    if kind == "teacher_projection":
        ckpt["head"] = cpu_state(head)
    return ckpt


def in_progress_checkpoint(name: str, identity: dict, config: dict, epoch: int, log: list, **state) -> dict:
    """A run between epochs: everything needed to continue bit-identically (`state`: model,
    teacher head, method state, optimiser, scheduler, scaler, bank, generators)."""
    return {"format": CHECKPOINT_FORMAT, "kind": "in_progress", "name": name, "identity": identity,
            "config": config, "epoch": epoch, "log": log, **state}
