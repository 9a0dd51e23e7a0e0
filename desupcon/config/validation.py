"""Checks of a run configuration before any training, with messages naming setting and range."""

from __future__ import annotations

import dataclasses
import math
import reprlib

import torch

from desupcon.config import COMPILE_MODES, RunConfig
from desupcon.engine.devices import PRECISIONS
from desupcon.data import DATASETS
from desupcon.errors import ConfigError  # noqa: F401  (re-exported: the configuration layer raises it)
from desupcon.models import ARCHITECTURES
from desupcon.config.settings import all_settings


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
    _require(device.type in ("cpu", "cuda", "mps"),
             f"--device {name!r} is not a device to train on; use auto, cpu, cuda or cuda:N")
    _require(device.type != "cuda" or torch.cuda.is_available(),
             f"--device {name}: CUDA is not available on this machine; use --device cpu")


def validate_config(cfg: RunConfig, dataset=None) -> None:
    """Raise ConfigError on the first invalid setting. With `dataset`, also check sizes against it."""
    m, o = cfg.method, cfg.optim
    _check_device(cfg.device)
    for flag, arch in (("--teacher-arch", cfg.model.teacher_arch), ("--student-arch", cfg.model.student_arch)):
        _require(arch in ARCHITECTURES, f"{flag} {arch!r} is unknown; known: "
                 f"{', '.join(sorted(ARCHITECTURES, key=str.lower))} (any case where unambiguous)")
    d = cfg.data.dataset
    _require(d in ("cifar100", "cifar10", "digits") or (d.startswith("npz:") and len(d) > 4),
             f"--dataset {d!r} is unknown; known: {', '.join(DATASETS)}")
    for values, prefix in ((m.to_dict(), "--"), (dataclasses.asdict(o), "--"),
                           (dataclasses.asdict(cfg.teacher), "teacher.")):
        for name, value in values.items():
            if isinstance(value, float):  # NaN/inf would pass every range check below
                _require(math.isfinite(value),
                         f"{prefix}{name.replace('_', '-') if prefix == '--' else name} must be a "
                         f"finite number, got {value}")
    for setting in all_settings():  # every declared range and choice (settings.py, methods/)
        value = getattr(getattr(cfg, setting.section), setting.field)
        if setting.valid is not None:
            test, rule = setting.valid
            _require(test(value), f"{setting.name} must be {rule}, got {value}")
        allowed = setting.allowed()
        if allowed:
            _require(value in allowed, f"{setting.name} {value!r} is unknown; known: {', '.join(allowed)}")
    _check_sdd_scales(list(m.sdd_scales))
    # settings that only make sense together
    _require(o.schedule != "step" or bool(o.milestones),
             "--schedule step needs --milestones (epochs after which the lr is multiplied by --lr-decay)")
    _require(all(isinstance(k, int) and 0 < k for k in o.milestones),
             f"--milestones must be positive epoch numbers, got {o.milestones}")
    _require(cfg.teacher.epochs >= 1 or cfg.model.teacher_weights is not None,
             f"--teacher-epochs must be >= 1 when the teacher is trained (--train-teacher), got {cfg.teacher.epochs}")
    # how to run (not part of a run's identity)
    _require(cfg.precision in PRECISIONS, f"--precision {cfg.precision!r} is unknown; known: {', '.join(PRECISIONS)}")
    _require(cfg.save_every >= 1, f"--save-every must be >= 1, got {cfg.save_every}")
    _require(cfg.compile_mode in COMPILE_MODES,
             f"--compile-mode {cfg.compile_mode!r} is unknown; known: {', '.join(COMPILE_MODES)}")
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


MAX_SDD_SCALE = 8  # SDD's own levels are 1, 2, 4; finer grids only upsample the usual 4x4-8x8 maps


def _check_sdd_scales(scales: list) -> None:
    """SDD's levels (SPEC 13): grid sizes 1..8 that divide the grid pooled to first, 1 among them."""
    _require(bool(scales) and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_SDD_SCALE
                                  for k in scales),
             f"--sdd-scales must be grid sizes between 1 and {MAX_SDD_SCALE} (SDD's: 1 2 4), got {scales}")
    try:
        from desupcon.losses import _check_scales
        _check_scales(scales)
    except ValueError as exc:
        raise ConfigError(f"--sdd-scales {' '.join(map(str, scales))}: {str(exc).split(': ', 1)[1]}") from None


_PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _short(value) -> str:
    """A bounded rendering of any value read from a file (a nested alias bomb prints in a line)."""
    return reprlib.repr(value)


def _checked_value(annotation, value, where: str):
    """`value` if it fits the field's annotation (`int | None`, `list[int]`, ...; an int where a
    float is expected becomes a float; every element of a list checked), else ConfigError. An
    annotation not understood here accepts anything (validate_config checks the ranges later)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds, element = [], None
    for part in text.replace(" ", "").split("|"):
        if part.startswith("list["):
            kinds.append(list)
            element = part[len("list["):-1]
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
    if not fits:
        raise ConfigError(f"{where} must be {text}, got {_short(value)}")
    if isinstance(value, list) and element is not None:
        return [_checked_value(element, item, f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def _setting_annotation(setting) -> str:
    """The annotation `_checked_value` reads for a declared setting's kind."""
    if isinstance(setting.kind, list):
        return f"list[{setting.kind[0].__name__}]"
    return setting.kind.__name__ + ("|None" if setting.default is None else "")


def _checked_method_section(value, source: str) -> dict:
    """The `method` section of a configuration file: the method's name and declared method settings,
    each of its declared type."""
    from desupcon.config import method_settings
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: method must be an object of method settings (method: NAME and its "
                          f"settings), got {_short(value)}")
    declared = method_settings()
    out = {}
    for key, item in value.items():
        if key == "method":
            if not isinstance(item, str):
                raise ConfigError(f"{source}: method.method must be a method name, got {_short(item)}")
            out[key] = item
            continue
        if key not in declared:
            raise ConfigError(f"{source}: unknown method setting {_short(key)}; known: {', '.join(declared)}")
        out[key] = _checked_value(_setting_annotation(declared[key]), item, f"{source}: method.{key}")
    return out


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
        if name == "method":
            out[name] = _checked_method_section(value, source)
            continue
        if not dataclasses.is_dataclass(section):
            out[name] = _checked_value(fields[name].type, value, f"{source}: {name}")
            continue
        _require(isinstance(value, dict), f"{source}: {name} must be an object of settings, got {_short(value)}")
        known = {f.name: f for f in dataclasses.fields(section)}
        unknown = sorted(set(value) - set(known))
        _require(not unknown, f"{source}: unknown {name} setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(known)}")
        out[name] = {key: _checked_value(known[key].type, item, f"{source}: {name}.{key}")
                     for key, item in value.items()}
    return out
