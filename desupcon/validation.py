"""Checks of a run configuration before any training, with messages naming setting and range."""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import BANK_MODES, HYBRID_SCALINGS, INITS, METHODS, OPTIMIZERS, SCHEDULES, RunConfig
from .devices import PRECISIONS
from .data import DATASETS, SUBSET_SAMPLINGS
from .errors import DesupconError
from .models import ARCHITECTURES


class ConfigError(DesupconError, ValueError):
    """An invalid setting; the message names it, its value and the allowed range."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_device(name: str) -> None:
    """A device name torch knows, and CUDA only where there is CUDA (what select_device needs)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    _require(device.type != "cuda" or torch.cuda.is_available(),
             f"--device {name}: CUDA is not available on this machine; use --device cpu")


def validate_config(cfg: RunConfig, dataset=None) -> None:
    """Raise ConfigError on the first invalid setting. With `dataset`, also check sizes against it."""
    m, o = cfg.method, cfg.optim
    _check_device(cfg.device)
    _require(m.method in METHODS, f"--method {m.method!r} is unknown; known: {', '.join(METHODS)}")
    for flag, arch in (("--teacher-arch", cfg.model.teacher_arch), ("--student-arch", cfg.model.student_arch)):
        _require(arch in ARCHITECTURES, f"{flag} {arch!r} is unknown; known: "
                 f"{', '.join(sorted(ARCHITECTURES, key=str.lower))} (any case where unambiguous)")
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
    _check_logit_settings(m)
    _require(o.epochs >= 1, f"--epochs must be >= 1, got {o.epochs}")
    _require(o.batch_size >= 2, f"--batch-size must be >= 2 (contrastive losses need pairs), got {o.batch_size}")
    _require(o.lr > 0, f"--lr must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}")
    _require(o.optimizer in OPTIMIZERS, f"--optimizer {o.optimizer!r} is unknown; known: {', '.join(OPTIMIZERS)}")
    _require(0 <= o.momentum < 1, f"--momentum must be in [0, 1), got {o.momentum}")
    _require(o.grad_clip is None or o.grad_clip > 0, f"--grad-clip must be > 0, got {o.grad_clip}")
    _require(o.schedule != "step" or bool(o.milestones),
             "--schedule step needs --milestones (epochs after which the lr is multiplied by --lr-decay)")
    _require(all(isinstance(m, int) and 0 < m for m in o.milestones),
             f"--milestones must be positive epoch numbers, got {o.milestones}")
    _require(0 < o.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {o.lr_decay}")
    _require(cfg.precision in PRECISIONS, f"--precision {cfg.precision!r} is unknown; known: {', '.join(PRECISIONS)}")
    _require(cfg.save_every >= 1, f"--save-every must be >= 1, got {cfg.save_every}")
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
    _require(cfg.teacher.optimizer in OPTIMIZERS,
             f"--teacher-optimizer {cfg.teacher.optimizer!r} is unknown; known: {', '.join(OPTIMIZERS)}")
    _require(cfg.teacher.lr > 0, f"--teacher-lr must be > 0, got {cfg.teacher.lr}")
    _require(cfg.teacher.weight_decay >= 0, f"--teacher-weight-decay must be >= 0, got {cfg.teacher.weight_decay}")
    _require(cfg.teacher.batch_size >= 2, f"--teacher-batch-size must be >= 2, got {cfg.teacher.batch_size}")
    _require(cfg.teacher.epochs >= 1 or cfg.model.teacher_weights is not None,
             f"--teacher-epochs must be >= 1 when the teacher is trained (--train-teacher), got {cfg.teacher.epochs}")
    _require(cfg.teacher.probe_epochs >= 0, f"--probe-epochs must be >= 0, got {cfg.teacher.probe_epochs}")
    _require(cfg.teacher.probe_lr > 0, f"teacher.probe_lr must be > 0, got {cfg.teacher.probe_lr}")
    _require(cfg.teacher.probe_temperature > 0,
             f"teacher.probe_temperature must be > 0, got {cfg.teacher.probe_temperature}")
    _require(cfg.data.subset_sampling in SUBSET_SAMPLINGS,
             f"--subset-sampling {cfg.data.subset_sampling!r} is unknown; choose {' or '.join(SUBSET_SAMPLINGS)}")
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


LOGIT_TERMS = ("none", "kd", "dkd")
MAX_SDD_SCALE = 8  # SDD's own levels are 1, 2, 4; finer grids only upsample the usual 4x4-8x8 maps


def _check_logit_settings(m) -> None:
    """The logit distillers' (SPEC 13) and crd-nce's (SPEC 14) settings, each with its range."""
    _require(m.logit_term in LOGIT_TERMS, f"--logit-term {m.logit_term!r} is unknown; known: {', '.join(LOGIT_TERMS)}")
    for flag, value in (("--logit-weight", m.logit_weight), ("--ce-weight", m.ce_weight),
                        ("--kd-weight", m.kd_weight), ("--dkd-alpha", m.dkd_alpha), ("--dkd-beta", m.dkd_beta),
                        ("--complementary-weight", m.complementary_weight), ("--nce-weight", m.nce_weight)):
        _require(value >= 0, f"{flag} must be >= 0 (a weight), got {value}")
    _require(m.logit_temperature > 0, f"--logit-temperature must be > 0 (it divides the logits), got "
                                      f"{m.logit_temperature}")
    _require(m.warmup >= 0, f"--warmup must be >= 0 epochs, got {m.warmup}")
    scales = list(m.sdd_scales)
    _require(bool(scales) and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_SDD_SCALE
                                  for k in scales),
             f"--sdd-scales must be grid sizes between 1 and {MAX_SDD_SCALE} (SDD's: 1 2 4), got {scales}")
    try:
        from .losses import _check_scales
        _check_scales(scales)
    except ValueError as exc:
        raise ConfigError(f"--sdd-scales {' '.join(map(str, scales))}: {str(exc).split(': ', 1)[1]}") from None
    _require(m.nce_negatives >= 1, f"--nce-negatives must be >= 1 (negatives per anchor), got {m.nce_negatives}")
    _require(m.nce_dim >= 1, f"nce_dim must be >= 1, got {m.nce_dim}")
    _require(0 <= m.nce_momentum < 1, f"nce_momentum must be in [0, 1), got {m.nce_momentum}")
    _require(m.nce_temperature > 0, f"nce_temperature must be > 0, got {m.nce_temperature}")


_PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _checked_value(annotation, value, where: str):
    """`value` if it fits the field's annotation (`int | None`, `list[int]`, ...; an int where a
    float is expected becomes a float), else ConfigError. An annotation not understood here
    accepts anything (validate_config checks the ranges later)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = []
    for part in text.replace(" ", "").split("|"):
        if part.startswith("list["):
            kinds.append(list)
        elif part in _PLAIN_TYPES:
            kinds.append(_PLAIN_TYPES[part])
        else:
            return value
    if isinstance(value, bool):  # a bool is an int to Python, never to a setting
        fits = bool in kinds
    elif isinstance(value, int) and int not in kinds and float in kinds:
        return float(value)
    else:
        fits = isinstance(value, tuple(kinds))
    _require(fits, f"{where} must be {text}, got {value!r}")
    return value


def checked_config_dict(d, source: str) -> dict:
    """`d` (a configuration read from a file) checked to have the shape of `RunConfig.to_dict()`:
    known sections and settings, each of its type; a setting left out takes its default.
    Returns a copy with ints in float settings made floats. `source` names the file."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected one configuration (a JSON object, as written by "
                          f"`train --print-config`), got a JSON {type(d).__name__}")
    default = RunConfig()
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - set(fields))
    _require(not unknown, f"{source}: unknown setting(s) {', '.join(unknown)}; a configuration has "
                          f"{', '.join(fields)}")
    out = {}
    for name, value in d.items():
        section = getattr(default, name)
        if not dataclasses.is_dataclass(section):
            out[name] = _checked_value(fields[name].type, value, f"{source}: {name}")
            continue
        _require(isinstance(value, dict), f"{source}: {name} must be an object of settings, got {value!r}")
        known = {f.name: f for f in dataclasses.fields(section)}
        unknown = sorted(set(value) - set(known))
        _require(not unknown, f"{source}: unknown {name} setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(known)}")
        out[name] = {key: _checked_value(known[key].type, item, f"{source}: {name}.{key}")
                     for key, item in value.items()}
    return out
