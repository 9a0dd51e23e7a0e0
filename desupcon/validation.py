"""Checks of a run configuration before any training, with messages naming setting and range."""

from __future__ import annotations

import dataclasses
import math

from .config import BANK_MODES, HYBRID_SCALINGS, INITS, METHODS, SCHEDULES, RunConfig
from .data import DATASETS
from .models import ARCHITECTURES


class ConfigError(ValueError):
    """An invalid setting; the message names it, its value and the allowed range."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: RunConfig, dataset=None) -> None:
    """Raise ConfigError on the first invalid setting. With `dataset`, also check sizes against it."""
    m, o = cfg.method, cfg.optim
    _require(m.method in METHODS, f"--method {m.method!r} is unknown; known: {', '.join(METHODS)}")
    for flag, arch in (("--teacher-arch", cfg.model.teacher_arch), ("--student-arch", cfg.model.student_arch)):
        _require(arch in ARCHITECTURES,
                 f"{flag} {arch!r} is unknown; known: {', '.join(sorted(ARCHITECTURES))}")
    d = cfg.data.dataset
    _require(d in ("cifar100", "cifar10", "digits") or (d.startswith("npz:") and len(d) > 4),
             f"--dataset {d!r} is unknown; known: {', '.join(DATASETS)}")
    for section, prefix in ((m, "--"), (o, "--"), (cfg.teacher, "teacher.")):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float):  # NaN/inf would pass every range check below
                _require(math.isfinite(value),
                         f"{prefix}{f.name.replace('_', '-') if prefix == '--' else f.name} must be a "
                         f"finite number, got {value}")
    _require(m.temperature > 0, f"--temperature must be > 0, got {m.temperature}")
    _require(m.kd_temperature > 0, f"--kd-temperature must be > 0, got {m.kd_temperature}")
    _require(m.alpha > 0, f"--alpha must be > 0, got {m.alpha}")
    _require(m.beta >= 0, f"--beta must be >= 0, got {m.beta}")
    _require(0 <= m.lam <= 1, f"--lam must be in [0, 1], got {m.lam}")
    _require(0 <= m.bank_momentum < 1, f"--bank-momentum must be in [0, 1), got {m.bank_momentum}")
    _require(m.bank_size >= 0, f"--bank-size must be >= 0 (0 = no bank), got {m.bank_size}")
    _require(o.epochs >= 1, f"--epochs must be >= 1, got {o.epochs}")
    _require(o.batch_size >= 2, f"--batch-size must be >= 2 (contrastive losses need pairs), got {o.batch_size}")
    _require(o.lr > 0, f"--lr must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}")
    _require(o.classifier_lr > 0, f"--classifier-lr must be > 0, got {o.classifier_lr}")
    _require(o.head_lr > 0, f"--head-lr must be > 0, got {o.head_lr}")
    _require(o.schedule in SCHEDULES, f"--schedule {o.schedule!r} is unknown; known: {', '.join(SCHEDULES)}")
    _require(cfg.teacher.schedule in SCHEDULES,
             f"--teacher-schedule {cfg.teacher.schedule!r} is unknown; known: {', '.join(SCHEDULES)}")
    _require(cfg.model.init in INITS, f"--init {cfg.model.init!r} is unknown; known: {', '.join(INITS)}")
    _require(m.hybrid_scaling in HYBRID_SCALINGS,
             f"--hybrid-scaling {m.hybrid_scaling!r} is unknown; known: {', '.join(HYBRID_SCALINGS)}")
    _require(m.hybrid_scale_steps >= 1, f"--hybrid-scale-steps must be >= 1, got {m.hybrid_scale_steps}")
    _require(m.bank_mode in BANK_MODES, f"--bank-mode {m.bank_mode!r} is unknown; known: {', '.join(BANK_MODES)}")
    _require(cfg.teacher.lr > 0, f"--teacher-lr must be > 0, got {cfg.teacher.lr}")
    _require(cfg.teacher.weight_decay >= 0, f"--teacher-weight-decay must be >= 0, got {cfg.teacher.weight_decay}")
    _require(cfg.teacher.batch_size >= 2, f"--teacher-batch-size must be >= 2, got {cfg.teacher.batch_size}")
    _require(cfg.teacher.epochs >= 1 or cfg.model.teacher_weights is not None,
             f"--teacher-epochs must be >= 1 when the teacher is trained (--train-teacher), got {cfg.teacher.epochs}")
    _require(cfg.teacher.probe_epochs >= 0, f"--probe-epochs must be >= 0, got {cfg.teacher.probe_epochs}")
    _require(cfg.teacher.probe_lr > 0, f"teacher.probe_lr must be > 0, got {cfg.teacher.probe_lr}")
    _require(cfg.teacher.probe_temperature > 0,
             f"teacher.probe_temperature must be > 0, got {cfg.teacher.probe_temperature}")
    for key in ("train_subset", "test_subset", "image_size"):
        value = getattr(cfg.data, key)
        _require(value is None or value > 0, f"--{key.replace('_', '-')} must be > 0, got {value}")
    if dataset is not None:
        n_train = len(dataset.train_labels)
        _require(m.bank_size <= n_train,
                 f"--bank-size {m.bank_size} is larger than the training set ({n_train} images); "
                 f"use at most {n_train}")
        _require(o.batch_size <= n_train,
                 f"--batch-size {o.batch_size} is larger than the training set ({n_train} images)")
        _require(cfg.teacher.batch_size <= n_train or cfg.model.teacher_weights is not None,
                 f"--teacher-batch-size {cfg.teacher.batch_size} is larger than the training set "
                 f"({n_train} images)")
