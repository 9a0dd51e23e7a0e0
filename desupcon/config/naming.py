"""Run names (SPEC 8 and 11): the published names, plus a tag for every setting that differs from
the run's protocol (the tags are declared with the settings), so two configurations never share a
name."""

from __future__ import annotations

import dataclasses

from desupcon.config import HUB_TEACHER, PRESETS, OptimConfig, RunConfig, method_fields
from desupcon.config.settings import tag_of


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value) or "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# The settings of each section that are tagged when they differ from the reference protocol (their
# tags are declared with them, settings.py).
_DATA_TAGGED = ("train_subset", "test_subset", "image_size", "color_jitter")
_TEACHER_TRAINING = ("epochs", "optimizer", "lr", "batch_size", "weight_decay", "schedule", "seed")


_TEACHER_PROBE = ("probe_epochs", "probe_lr", "probe_temperature")


MAX_TAG = 48  # a user-chosen name inside a run name: file names stay under the file system's 255 bytes


def bounded_tag(text: str) -> str:
    """`text` as it is up to MAX_TAG characters; a longer one cut, with 6 hex of the whole after it."""
    if len(text) <= MAX_TAG:
        return text
    import hashlib
    return f"{text[:MAX_TAG - 7]}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def dataset_tag(dataset: str) -> str:
    """The dataset's part of run names: `npz-<folder>-<6 hex of the folder's absolute path>` for an
    npz folder (two folders of one name never share a teacher's or a run's file; a long folder name
    is cut, `bounded_tag`), else the name."""
    if dataset.startswith("npz:"):
        import hashlib
        from pathlib import Path
        folder = dataset[len("npz:"):].rstrip("/")
        where = hashlib.sha1(str(Path(folder).expanduser().resolve()).encode()).hexdigest()[:6]
        return f"npz-{bounded_tag(folder.split('/')[-1])}-{where}"
    return dataset


def _weights_tag(weights: str) -> str:
    return bounded_tag(weights.rstrip("/").split("/")[-1].split(":")[-1].split(".")[0])


def _differing(cfg: RunConfig, ref: RunConfig, section: str, keys) -> list[str]:
    tags = []
    for key in keys:
        value = getattr(getattr(cfg, section), key)
        if value != getattr(getattr(ref, section), key):
            tags.append(f"{tag_of(section, key)}{_fmt(value)}")
    return tags


def _subset_tags(cfg: RunConfig, ref: RunConfig) -> list[str]:
    """The subset scheme's tag, only where a subset is drawn (it changes nothing otherwise)."""
    if not (cfg.data.train_subset or cfg.data.test_subset):
        return []
    return _differing(cfg, ref, "data", ("subset_sampling",))


def _teacher_tags(cfg: RunConfig, ref: RunConfig) -> list[str]:
    """Tags naming a teacher other than the reference's (published) one."""
    if cfg.trains_teacher:
        return (["ttrained"] if not ref.trains_teacher else []) + _differing(cfg, ref, "teacher", _TEACHER_TRAINING)
    if cfg.model.teacher_weights != ref.model.teacher_weights:
        return ["tweights-" + _weights_tag(cfg.model.teacher_weights)]
    return []


def teacher_run_name(cfg: RunConfig, with_projection: bool = False) -> str:
    """`teacher_resnet50_cifar100[.._with_projection]` for the published teacher, tagged otherwise."""
    paper = PRESETS["paper"]
    tags = _differing(cfg, paper, "data", _DATA_TAGGED) + _subset_tags(cfg, paper)
    if cfg.trains_teacher:
        tags = ["trained", *_differing(cfg, paper, "teacher", _TEACHER_TRAINING),
                *_differing(cfg, paper, "model", ("init",)), *tags]
    elif cfg.model.teacher_weights != HUB_TEACHER:
        tags = ["weights-" + _weights_tag(cfg.model.teacher_weights), *tags]
    name = "_".join([f"teacher_{cfg.model.teacher_arch}_{dataset_tag(cfg.data.dataset)}", *tags])
    if with_projection:
        probe = _differing(cfg, paper, "teacher", _TEACHER_PROBE)
        if not cfg.trains_teacher:
            probe += _differing(cfg, paper, "teacher", ("batch_size", "seed"))
        name = "_".join([name, *probe, "with_projection"])
    return name


def _base_name(cfg: RunConfig) -> tuple[str, set[str], RunConfig]:
    """(base name, method settings the base name already says, the protocol tags are relative to).

    Runs of a preset other than `paper` carry its name (`_quick`, `_paperbank`) and are tagged
    relative to it; the bank ablation's runs under `paper-bank` have the published names."""
    m = cfg.method
    bank = m.bank_size > 0 and "bank_size" in method_fields(m.method)
    bank_part = f"_bank{m.bank_size}" if bank else ""
    paper = PRESETS["paper"]
    if cfg.preset == "paper-bank" and m.method in ("crd", "lw-supcrd"):
        # The published bank-ablation names (SPEC 11), relative to the paper-bank protocol.
        arm = f"bank{m.bank_size}" if bank else "nobank"
        base = "student_baseline_crd" if m.method == "crd" else "student_lwsupcrd"
        return f"{base}_{arm}", set(), PRESETS["paper-bank"]
    if cfg.preset in PRESETS and cfg.preset != "paper":  # tags relative to the run's own preset
        paper = PRESETS[cfg.preset]
        bank_part += "_" + cfg.preset.replace("-", "")
    if m.method == "ce":
        return "student_undistilled" + bank_part.replace(f"_bank{m.bank_size}", ""), set(), paper
    if m.method == "supcon":
        return "student_baseline_supcon" + bank_part.replace(f"_bank{m.bank_size}", ""), set(), paper
    if m.method == "crd":  # (with a bank outside paper-bank: not the published bank-ablation name)
        return ("student_crd" if bank else "student_baseline_crd") + bank_part, set(), paper
    if m.method == "lw-supcrd":
        return (f"student_alpha_{_fmt(m.alpha)}_beta_{_fmt(m.beta)}_temp_{_fmt(m.temperature)}"
                + bank_part), {"alpha", "beta", "temperature"}, paper
    if m.method == "hybrid":
        return f"student_hybrid_lambda_{_fmt(m.lam)}" + bank_part, {"lam"}, paper
    return f"student_{m.method.replace('-', '')}" + bank_part, set(), paper


def run_name(cfg: RunConfig) -> str:
    """SPEC 8/11 names, e.g. student_alpha_1.0_beta_10.0_temp_0.07_resnet18_cifar100, plus a tag for
    every setting that differs from the reference protocol and is not already in the name."""
    base, named, ref = _base_name(cfg)
    m = cfg.method
    tags = []
    method_keys = [k for k in method_fields(m.method) if k not in named and k != "bank_size"]
    # method and optimiser settings are tagged against the pair's own defaults (SPEC 17)
    pair_ref = ref.with_pair(cfg.model.teacher_arch, cfg.model.student_arch)
    tags += _differing(cfg, pair_ref.with_method(m.method), "method", method_keys)
    tags += _differing(cfg, pair_ref, "optim", [f.name for f in dataclasses.fields(OptimConfig)])
    tags += _differing(cfg, ref, "data", _DATA_TAGGED) + _subset_tags(cfg, ref)
    tags += _differing(cfg, ref, "model", ("init",))
    if cfg.uses_teacher:
        tags += _differing(cfg, ref, "model", ("teacher_arch",))
        tags += _teacher_tags(cfg, ref)
        tags += _differing(cfg, ref, "teacher", _TEACHER_PROBE)
        if not cfg.trains_teacher:  # they also shape a loaded teacher's probe-trained head
            tags += _differing(cfg, ref, "teacher", ("batch_size", "seed"))
    return "_".join([base, cfg.model.student_arch, dataset_tag(cfg.data.dataset), *tags])
