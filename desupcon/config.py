"""Typed configuration: one dataclass per concern, the `quick` and `paper` presets, run names.

A run's *identity* is the plain-data dict of every setting that can change its result (the device
and output folder are not part of it). The run cache compares identities; run names encode the
identity readably, so two different configurations never share a name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Method settings each method actually reads; the others do not enter its identity.
METHOD_FIELDS = {
    "ce": (),
    "supcon": ("temperature",),
    "crd": ("temperature", "bank_size", "bank_momentum"),
    "lw-supcrd": ("alpha", "beta", "temperature", "adaptive_beta", "kd_temperature",
                  "bank_size", "bank_momentum"),
    "hybrid": ("lam", "alpha", "beta", "temperature", "adaptive_beta", "kd_temperature",
               "bank_size", "bank_momentum"),
}
METHODS = tuple(METHOD_FIELDS)


@dataclass
class DataConfig:
    dataset: str = "cifar100"
    data_root: str = "data"
    download: bool = True
    train_subset: int | None = None  # seeded random subset of the training split (CPU-sized runs)
    test_subset: int | None = None
    image_size: int | None = None  # resize every image (None: the dataset's own size)


@dataclass
class ModelConfig:
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    teacher_weights: str | None = None  # torchvision/timm state dict; None trains the teacher


@dataclass
class MethodConfig:
    method: str = "lw-supcrd"
    alpha: float = 1.0
    beta: float = 10.0
    temperature: float = 0.07
    adaptive_beta: bool = True
    kd_temperature: float = 1.0
    lam: float = 0.5
    bank_size: int = 0  # 0 = no memory bank
    bank_momentum: float = 0.5

    def relevant(self) -> dict:
        return {"method": self.method, **{k: getattr(self, k) for k in METHOD_FIELDS[self.method]}}


@dataclass
class OptimConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 42


@dataclass
class TeacherConfig:
    epochs: int = 50  # cross-entropy epochs when no weights are given
    probe_epochs: int = 10  # cosine-probe epochs of the projection head
    probe_lr: float = 1e-3
    probe_temperature: float = 0.07
    seed: int = 42  # the teacher's own seed: student seeds (--seeds) share one teacher


@dataclass
class RunConfig:
    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    device: str = "auto"
    output_dir: str = "."
    compile: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(preset=d["preset"], data=DataConfig(**d["data"]), model=ModelConfig(**d["model"]),
                   method=MethodConfig(**d["method"]), optim=OptimConfig(**d["optim"]),
                   teacher=TeacherConfig(**d["teacher"]), device=d.get("device", "auto"),
                   output_dir=d.get("output_dir", "."), compile=d.get("compile", False))

    def replace(self, **sections) -> "RunConfig":
        """Copy with some fields changed: `cfg.replace(method={"alpha": 2.0}, optim={"seed": 1})`."""
        out = RunConfig.from_dict(self.to_dict())
        for section, changes in sections.items():
            if isinstance(changes, dict):
                setattr(out, section, dataclasses.replace(getattr(out, section), **changes))
            else:
                setattr(out, section, changes)
        return out

    # -- identities -------------------------------------------------------------------------
    def data_identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self.data).items() if k not in ("data_root", "download")}

    def teacher_identity(self) -> dict:
        """Everything that determines the teacher (backbone, classifier and projection head)."""
        trained = self.model.teacher_weights is None
        return {"data": self.data_identity(), "arch": self.model.teacher_arch,
                "weights": self.model.teacher_weights,
                "training": {**{k: v for k, v in dataclasses.asdict(self.optim).items()
                                if k not in ("epochs", "seed")},
                             "epochs": self.teacher.epochs, "seed": self.teacher.seed}
                if trained else None,
                "probe": {k: v for k, v in dataclasses.asdict(self.teacher).items() if k != "epochs"}}

    def identity(self) -> dict:
        """Everything that determines a student run's result."""
        return {"data": self.data_identity(), "student_arch": self.model.student_arch,
                "method": self.method.relevant(),
                "optim": dataclasses.asdict(self.optim),
                "teacher": self.teacher_identity()}


PRESETS = {
    "paper": RunConfig(preset="paper"),
    # CPU-sized: the embedded digits, small CIFAR ResNets, a few epochs (quick start, tests).
    "quick": RunConfig(
        preset="quick",
        data=DataConfig(dataset="digits", image_size=16),
        model=ModelConfig(teacher_arch="resnet14", student_arch="resnet8"),
        method=MethodConfig(),
        optim=OptimConfig(epochs=16, batch_size=64, lr=3e-3, weight_decay=1e-4, seed=0),
        teacher=TeacherConfig(epochs=10, probe_epochs=3, seed=0),
    ),
}
PAPER_BANK_SIZE = 4096
QUICK_BANK_SIZE = 512


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name].to_dict())


def default_bank_size(preset_name: str) -> int:
    return PAPER_BANK_SIZE if preset_name == "paper" else QUICK_BANK_SIZE


# ----------------------------------------------------------------------------------------------
# Run names (SPEC section 8)
# ----------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# Short tags for settings that differ from the paper protocol and are not in the base name.
_TAGS = {
    ("method", "alpha"): "alpha", ("method", "beta"): "beta", ("method", "temperature"): "temp",
    ("method", "adaptive_beta"): "adaptive", ("method", "kd_temperature"): "kdT",
    ("method", "lam"): "lam", ("method", "bank_momentum"): "bankmom",
    ("optim", "epochs"): "ep", ("optim", "batch_size"): "bs", ("optim", "lr"): "lr",
    ("optim", "weight_decay"): "wd", ("optim", "seed"): "seed",
    ("data", "train_subset"): "ntrain", ("data", "test_subset"): "ntest", ("data", "image_size"): "img",
    ("model", "teacher_arch"): "teacher",
    ("teacher", "epochs"): "tep", ("teacher", "probe_epochs"): "pep",
    ("teacher", "probe_lr"): "plr", ("teacher", "probe_temperature"): "ptemp",
    ("teacher", "seed"): "tseed",
}


def dataset_tag(dataset: str) -> str:
    if dataset.startswith("npz:"):
        return "npz-" + dataset.rstrip("/").split("/")[-1]
    return dataset


def teacher_run_name(cfg: RunConfig, with_projection: bool = False) -> str:
    name = f"teacher_{cfg.model.teacher_arch}_{dataset_tag(cfg.data.dataset)}"
    paper = PRESETS["paper"]
    tags = []
    if cfg.model.teacher_weights:
        tags.append("weights-" + cfg.model.teacher_weights.rstrip("/").split("/")[-1].rsplit(".", 1)[0])
    else:
        for section, key in (("teacher", "epochs"), ("optim", "batch_size"), ("optim", "lr"),
                             ("optim", "weight_decay"), ("teacher", "seed")):
            value = getattr(getattr(cfg, section), key)
            if value != getattr(getattr(paper, section), key):
                tags.append(f"{_TAGS[(section, key)]}{_fmt(value)}")
    for key in ("train_subset", "test_subset", "image_size"):
        if getattr(cfg.data, key) is not None:
            tags.append(f"{_TAGS[('data', key)]}{getattr(cfg.data, key)}")
    name = "_".join([name, *tags])
    if with_projection:
        for key in ("probe_epochs", "probe_lr", "probe_temperature") + (
                ("seed",) if cfg.model.teacher_weights else ()):
            value = getattr(cfg.teacher, key)
            if value != getattr(paper.teacher, key):
                name += f"_{_TAGS[('teacher', key)]}{_fmt(value)}"
        name += "_with_projection"
    return name


def run_name(cfg: RunConfig) -> str:
    """SPEC 8 names, e.g. student_alpha_1.0_beta_10.0_temp_0.07_resnet18_cifar100, plus a tag for
    every setting that differs from the paper protocol and is not already in the name."""
    m = cfg.method
    bank = m.bank_size > 0 and "bank_size" in METHOD_FIELDS[m.method]
    if m.method == "ce":
        base, named = "student_baseline_ce", set()
    elif m.method == "supcon":
        base, named = "student_baseline_supcon", set()
    elif m.method == "crd":
        base, named = ("student_crd_bank%d" % m.bank_size) if bank else "student_baseline_crd", set()
    elif m.method == "lw-supcrd" and bank:
        base, named = f"student_lwsupcrd_bank{m.bank_size}", set()
    elif m.method == "lw-supcrd":
        base = f"student_alpha_{_fmt(m.alpha)}_beta_{_fmt(m.beta)}_temp_{_fmt(m.temperature)}"
        named = {"alpha", "beta", "temperature"}
    elif m.method == "hybrid":
        base = f"student_hybrid_lam_{_fmt(m.lam)}" + (f"_bank{m.bank_size}" if bank else "")
        named = {"lam"}
    else:  # a newly added method: its settings that differ from the defaults become tags
        base = f"student_{m.method.replace('-', '')}" + (f"_bank{m.bank_size}" if bank else "")
        named = set()
    paper = PRESETS["paper"]
    tags = []
    for (section, key), tag in _TAGS.items():
        if section == "method" and (key not in METHOD_FIELDS[m.method] or key in named):
            continue
        if section == "teacher" and key == "epochs" and cfg.model.teacher_weights:
            continue
        value = getattr(getattr(cfg, section), key)
        if value != getattr(getattr(paper, section), key):
            tags.append(f"{tag}{_fmt(value)}")
    if cfg.model.teacher_weights:
        tags.append("tweights-" + cfg.model.teacher_weights.rstrip("/").split("/")[-1].rsplit(".", 1)[0])
    parts = [base, cfg.model.student_arch, dataset_tag(cfg.data.dataset), *tags]
    return "_".join(parts)
