"""Typed configuration: one dataclass per concern, the presets, run identities and run names.

Presets (SPEC 6 and 13): `paper` (the published main table and sweeps: Adam 1e-3, no weight decay,
constant learning rate, last partial batch kept), `paper-bank` (the memory-bank ablation: weight
decay 1e-4, cosine, last partial batch dropped) and `quick` (CPU-sized, the embedded digits).

A run's *identity* is the plain-data dict of every setting that can change its result (the device
and output folder are not part of it), plus the content fingerprint of the teacher it was distilled
from. The run cache compares identities; run names encode the settings readably, so two different
configurations never share a name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

from desupcon.config import pairs

# The published CIFAR-100 ResNet-50 teacher (SPEC 6), a timm-format state dict on the model hub.
HUB_TEACHER = "hf-hub:edadaltocg/resnet50_cifar100"

# The methods are declared by their classes in methods/ (the settings each reads, its own
# defaults, its label, what it needs, its losses); these look them up.
def method_class(name: str):
    """The class declaring method `name` (None for an unknown name)."""
    from desupcon.methods.base import METHODS as declared, import_method_modules  # (methods/ imports this module)
    import_method_modules()
    return declared.get(name)


def method_names() -> tuple[str, ...]:
    from desupcon.methods.base import METHODS as declared, import_method_modules
    import_method_modules()
    return tuple(declared)


def method_fields(name: str) -> tuple[str, ...]:
    """The settings method `name` reads (the others do not enter its identity or name)."""
    cls = method_class(name)
    return tuple(s.field for s in cls.settings) if cls is not None else ()


def method_settings() -> dict:
    """field -> declaration of every method setting of the registered methods."""
    from desupcon.methods.base import declared_settings, import_method_modules
    import_method_modules()  # (when methods/ is imported first, its package is not initialised yet)
    return declared_settings()


def method_defaults(name: str) -> dict:
    """Method `name`'s own defaults where they differ from MethodConfig's (SPEC 13 and 14)."""
    cls = method_class(name)
    return dict(cls.defaults) if cls is not None else {}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
RUNTIME_FIELDS = ("device", "output_dir", "compile", "compile_mode", "fused_lockstep", "cuda_graphs",
                  "precision", "deterministic", "save_every", "sync_batchnorm", "tensorboard", "wandb")


@dataclass
class DataConfig:
    dataset: str = "cifar100"
    data_root: str = "data"
    download: bool = True
    color_jitter: float = 0.2  # brightness/contrast/saturation factors in [1 - j, 1 + j]; 0: none
    train_subset: int | None = None  # seeded subset of the training split (CPU-sized runs)
    test_subset: int | None = None
    # How the subsets are drawn: "stratified" (classes in proportion, equal counts on CIFAR) or
    # "random" (a uniform draw of images: the scheme of every run before stratified subsets).
    subset_sampling: str = "stratified"
    image_size: int | None = None  # resize every image (None: the dataset's own size)


@dataclass
class ModelConfig:
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    # A local file, `hf-hub:<repo id>`, or None to train the teacher with cross-entropy.
    teacher_weights: str | None = HUB_TEACHER
    # Convolution initialisation of every built encoder: "kaiming" (normal, fan-out: the published
    # code and the KD literature) or "pytorch" (PyTorch's own default).
    init: str = "kaiming"


class MethodConfig:
    """The method and the values of its settings. Settings are declared by the methods that read
    them (`methods/`, each with its default; a method may set its own default for a setting another
    method declares too), so this holds whatever the registered methods declare: `cfg.alpha` reads
    a value, and a setting not given takes the chosen method's default, else the declared one. Only
    the chosen method's settings are part of the configuration: they are what `to_dict` writes
    (configuration files, checkpoints, records) and what equality compares."""

    def __init__(self, method: str = "lw-supcrd", **values):
        declared = method_settings()
        unknown = set(values) - set(declared)
        if unknown:
            raise ValueError(f"unknown MethodConfig settings: {', '.join(sorted(unknown))}")
        self.method = method
        own = method_defaults(method)
        for name, setting in declared.items():
            value = values.get(name, own.get(name, setting.default))
            setattr(self, name, list(value) if isinstance(setting.kind, list) else copy.deepcopy(value))

    def __getattr__(self, name: str):
        # a setting declared after this object was made (a method registered later): its default
        setting = method_settings().get(name) if not name.startswith("_") else None
        if setting is None:
            raise AttributeError(f"MethodConfig has no setting {name!r}")
        return list(setting.default) if isinstance(setting.kind, list) else copy.deepcopy(setting.default)

    def to_dict(self) -> dict:
        """The method and its own settings (the ones it reads)."""
        return {"method": self.method, **{name: copy.deepcopy(getattr(self, name))
                                          for name in method_fields(self.method)}}

    def replace(self, **changes) -> "MethodConfig":
        """A copy with `changes`; the values of settings the method does not read travel along (a
        flag given for a sweep reaches the swept methods that read it)."""
        values = {name: copy.deepcopy(getattr(self, name)) for name in method_settings()}
        return MethodConfig(**{"method": self.method, **values, **changes})

    def __eq__(self, other) -> bool:
        return isinstance(other, MethodConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, as the other sections

    def __repr__(self) -> str:
        return f"MethodConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def relevant(self) -> dict:
        return self.to_dict()


@dataclass
class OptimConfig:
    """The student's optimisation. The online classifier and the teacher head have their own
    constant-lr Adam without weight decay (SPEC 6); a CE student's classifier is part of it."""

    epochs: int = 50
    batch_size: int = 128
    optimizer: str = "adam"  # or "sgd" (with momentum; the mdistiller protocol)
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: str = "constant"  # "cosine" (annealed to 0 over the epochs) or "step" (at milestones)
    milestones: list[int] = field(default_factory=list)  # "step": lr x lr_decay after these epochs
    lr_decay: float = 0.1
    grad_clip: float | None = None  # clip the gradient norm (None: no clipping)
    drop_last: bool = False  # drop the last partial batch of every epoch
    classifier_lr: float = 1e-3
    head_lr: float = 1e-4
    seed: int = 42


@dataclass
class TeacherConfig:
    """The teacher's own settings: cross-entropy training (when no weights are given) and the
    cosine probe of its projection head. Never borrowed from the student's."""

    epochs: int = 50
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    seed: int = 42  # student seeds (--seeds) share one teacher
    probe_epochs: int = 10  # cosine-probe epochs of the projection head
    probe_lr: float = 1e-3
    probe_temperature: float = 0.07


@dataclass
class RunConfig:
    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # How to run, not what is computed: none of these enter a run's identity or name.
    device: str = "auto"
    output_dir: str = "."
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune
    fused_lockstep: bool = False  # a lockstep group's students of one architecture as one vmapped model
    cuda_graphs: bool = False  # each epoch's training step captured once and replayed as a CUDA graph
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on GPUs that have it natively)
    deterministic: bool = False
    save_every: int = 1  # epochs between in-progress checkpoints
    sync_batchnorm: bool = False  # several GPUs: BatchNorm statistics over the global batch
    tensorboard: bool = False  # per-epoch scalars and final metrics under <output_dir>/tensorboard/
    wandb: bool = False  # the same to Weights & Biases (offline without network)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = self.method.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Rebuild from `to_dict()`; settings added since a file was written take their defaults."""
        def section(kind, values):
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} settings: {', '.join(sorted(unknown))}")
            return kind(**values)
        return cls(preset=d.get("preset", "paper"), data=section(DataConfig, d.get("data", {})),
                   model=section(ModelConfig, d.get("model", {})),
                   method=MethodConfig(**d.get("method", {})),
                   optim=section(OptimConfig, d.get("optim", {})),
                   teacher=section(TeacherConfig, d.get("teacher", {})),
                   **{k: d[k] for k in RUNTIME_FIELDS if k in d})

    def replace(self, **sections) -> "RunConfig":
        """Copy with some fields changed: `cfg.replace(method={"alpha": 2.0}, optim={"seed": 1})`."""
        out = copy.deepcopy(self)  # (not through to_dict: the method's other settings travel along)
        for section, changes in sections.items():
            if isinstance(changes, dict) and section == "method":
                out.method = out.method.replace(**changes)
            elif isinstance(changes, dict):
                setattr(out, section, dataclasses.replace(getattr(out, section), **changes))
            else:
                setattr(out, section, changes)
        return out

    def with_method(self, method: str, **settings) -> "RunConfig":
        """This configuration with another method: its own defaults (its class's, DKD's beta
        for the pair), then `settings`."""
        defaults = method_defaults(method)
        if defaults.get("dkd_beta") == pairs.DKD_DEFAULT_BETA:
            defaults["dkd_beta"] = pairs.dkd_beta(self.model.teacher_arch, self.model.student_arch)
        return self.replace(method={"method": method, **defaults, **settings})

    def with_pair(self, teacher_arch: str, student_arch: str) -> "RunConfig":
        """This configuration on another teacher -> student pair, with the pair's own settings
        (SPEC 17): the student lr of its preset's protocol and, for the DKD-based methods, DKD's
        beta. Flags given explicitly are applied after this."""
        out = self.replace(model={"teacher_arch": teacher_arch, "student_arch": student_arch})
        if self.preset in pairs.PAIR_LR_PRESETS:
            out = out.replace(optim={"lr": pairs.student_lr(self.preset, student_arch,
                                                            PRESETS[self.preset].optim.lr)})
        if method_defaults(self.method.method).get("dkd_beta") == pairs.DKD_DEFAULT_BETA:
            out = out.replace(method={"dkd_beta": pairs.dkd_beta(teacher_arch, student_arch)})
        return out

    @property
    def trains_teacher(self) -> bool:
        return self.model.teacher_weights is None

    @property
    def uses_teacher(self) -> bool:
        cls = method_class(self.method.method)
        return cls is None or cls.needs_teacher(self.method)

    @property
    def reads_teacher_projection(self) -> bool:
        cls = method_class(self.method.method)
        return cls is None or cls.reads_teacher_projection(self.method)

    # -- identities -------------------------------------------------------------------------
    def data_identity(self) -> dict:
        """The data settings that shape a result. The subset scheme enters only when a subset is
        drawn, and only when stratified: identities written before the scheme existed (random
        draws, or no subset) stay valid, and a stratified subset never matches an old random one."""
        out = {k: v for k, v in dataclasses.asdict(self.data).items()
               if k not in ("data_root", "download", "subset_sampling")}
        if (self.data.train_subset or self.data.test_subset) and self.data.subset_sampling != "random":
            out["subset_sampling"] = self.data.subset_sampling
        return out

    def teacher_backbone_identity(self) -> dict:
        """What determines the teacher's backbone and classifier."""
        t = dataclasses.asdict(self.teacher)
        training = None
        if self.trains_teacher:
            training = {k: t[k] for k in ("epochs", "optimizer", "lr", "batch_size", "weight_decay", "schedule",
                                          "seed")}
            training["init"] = self.model.init
        return {"data": self.data_identity(), "arch": self.model.teacher_arch,
                "weights": self.model.teacher_weights, "training": training}

    def teacher_identity(self) -> dict:
        """What determines the teacher with its probe-trained projection head."""
        t = self.teacher
        return {**self.teacher_backbone_identity(),
                "probe": {"epochs": t.probe_epochs, "lr": t.probe_lr, "temperature": t.probe_temperature,
                          "batch_size": t.batch_size, "seed": t.seed}}

    def identity(self, teacher_fingerprint: str | None = None) -> dict:
        """Everything that determines a student run's result. The teacher enters by content (its
        weights' fingerprint), so a retrained or replaced teacher never reuses old students."""
        out = {"data": self.data_identity(), "student_arch": self.model.student_arch,
               "init": self.model.init, "method": self.method.relevant(),
               "optim": dataclasses.asdict(self.optim)}
        if self.uses_teacher:
            out["teacher"] = {"arch": self.model.teacher_arch, "fingerprint": teacher_fingerprint}
        return out

    # "The same configuration", derived from `identity` (the run cache's test) and nothing else:
    def seedless_identity(self, teacher_fingerprint: str | None = None) -> dict:
        """The identity without the seed: runs equal in it are seeds of one configuration (the
        report's rows). Runtime settings (RUNTIME_FIELDS) are in no identity, so never split one."""
        out = self.identity(teacher_fingerprint)
        out["optim"] = {k: v for k, v in out["optim"].items() if k != "seed"}
        return out

    def lockstep_key(self) -> str:
        """Runs that can share batches (train in lockstep): the same data, data order (seed),
        batch size, epochs and teacher (with its probe)."""
        identity = self.identity()
        order = {k: identity["optim"][k] for k in ("seed", "batch_size", "drop_last", "epochs")}
        return json.dumps({"data": identity["data"], "order": order, "teacher": self.teacher_identity()},
                          sort_keys=True)


def _paper() -> RunConfig:
    return RunConfig(preset="paper")


def _paper_bank() -> RunConfig:
    return RunConfig(preset="paper-bank", optim=OptimConfig(weight_decay=1e-4, schedule="cosine",
                                                            drop_last=True))


PRESETS = {
    "paper": _paper(),
    "paper-bank": _paper_bank(),
    # CPU-sized: the embedded digits, small CIFAR ResNets, a few epochs (quick start, tests).
    "quick": RunConfig(
        preset="quick",
        data=DataConfig(dataset="digits", image_size=16),
        model=ModelConfig(teacher_arch="resnet14", student_arch="resnet8", teacher_weights=None),
        method=MethodConfig(),
        optim=OptimConfig(epochs=16, batch_size=64, lr=3e-3, weight_decay=1e-4, schedule="cosine",
                          drop_last=True, classifier_lr=3e-3, head_lr=3e-4, seed=0),
        teacher=TeacherConfig(epochs=10, lr=3e-3, batch_size=64, weight_decay=1e-4, seed=0,
                              probe_epochs=3),
    ),
}
PRESETS["mdistiller"] = RunConfig(
    # The logit-distillation literature's CIFAR-100 protocol (SPEC 13): one augmented view (crop and
    # flip, no colour jitter), SGD, step decay; resnet32x4 -> resnet8x4 by default.
    preset="mdistiller",
    data=DataConfig(color_jitter=0.0),
    model=ModelConfig(teacher_arch="resnet32x4", student_arch="resnet8x4", teacher_weights=None),
    method=MethodConfig(method="kd", **method_defaults("kd")),
    optim=OptimConfig(epochs=240, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9,
                      weight_decay=5e-4, schedule="step", milestones=[150, 180, 210], lr_decay=0.1,
                      drop_last=False, seed=0),
    teacher=TeacherConfig(epochs=240, optimizer="sgd", lr=0.05, batch_size=64, weight_decay=5e-4,
                          schedule="cosine", seed=0),
)
PRESET_HELP = {
    "paper": "the published main table and sweeps: CIFAR-100, ResNet-50 -> ResNet-18, Adam 1e-3, "
             "no weight decay, constant lr, last batch kept, the published teacher",
    "paper-bank": "the published memory-bank ablation: as paper, with weight decay 1e-4, cosine lr, "
                  "last batch dropped",
    "quick": "CPU-sized: the embedded digits at 16 px, resnet14 -> resnet8, a few epochs",
    "mdistiller": "the logit-distillation literature's CIFAR-100 protocol: resnet32x4 -> resnet8x4, "
                  "one view, SGD 0.05, weight decay 5e-4, batch 64, 240 epochs, lr x0.1 at 150/180/210",
}
PAPER_BANK_SIZE = 4096
QUICK_BANK_SIZE = 512


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name].to_dict())


def default_bank_size(preset_name: str) -> int:
    return PAPER_BANK_SIZE if preset_name.startswith("paper") else QUICK_BANK_SIZE


def bank_protocol(base: RunConfig) -> RunConfig:
    """The protocol the memory-bank ablation runs under: `paper-bank` for the paper preset (SPEC 6),
    the base itself otherwise."""
    if base.preset != "paper":
        return base
    bank = PRESETS["paper-bank"]
    return base.replace(preset="paper-bank", optim={k: getattr(bank.optim, k)
                                                    for k in ("weight_decay", "schedule", "drop_last")})


def protocol_of(cfg: RunConfig, any_pair: bool = False) -> str:
    """The preset whose protocol the run follows exactly (method and seed aside), else
    `custom (<preset>)`. With `any_pair` the teacher -> student pair and the teacher's source may
    differ from the preset's (the pair's own settings, SPEC 17, are then its protocol)."""
    ref = PRESETS.get(cfg.preset)
    if ref is None:
        return f"custom ({cfg.preset})"
    if any_pair:
        ref = ref.replace(model={k: getattr(cfg.model, k) for k in ("teacher_arch", "student_arch",
                                                                    "teacher_weights")})
    ref_optim = dataclasses.replace(ref.optim, seed=0, lr=pairs.student_lr(cfg.preset, cfg.model.student_arch,
                                                                          ref.optim.lr))
    same = (cfg.data_identity() == ref.data_identity() and cfg.model == ref.model
            and dataclasses.replace(cfg.optim, seed=0) == ref_optim
            and (cfg.teacher == ref.teacher or not cfg.trains_teacher and dataclasses.replace(
                cfg.teacher, epochs=ref.teacher.epochs, lr=ref.teacher.lr,
                batch_size=ref.teacher.batch_size, weight_decay=ref.teacher.weight_decay,
                schedule=ref.teacher.schedule) == ref.teacher))
    return cfg.preset if same else f"custom ({cfg.preset})"


def config_json(cfgs) -> str:
    """Resolved configuration(s) as JSON, the form `--config` reads back."""
    if isinstance(cfgs, RunConfig):
        return json.dumps(cfgs.to_dict(), indent=2)
    return json.dumps([c.to_dict() for c in cfgs], indent=2)


# Run names: after everything above (naming.py reads the presets).
from desupcon.config.naming import dataset_tag, run_name, teacher_run_name  # noqa: E402

__all__ = ["HUB_TEACHER", "PRESETS", "PRESET_HELP", "DataConfig", "MethodConfig", "ModelConfig", "OptimConfig",
           "COMPILE_MODES", "RunConfig", "TeacherConfig", "bank_protocol", "config_json", "dataset_tag",
           "default_bank_size", "method_class", "method_defaults", "method_fields", "method_names", "method_settings",
           "preset", "protocol_of", "run_name", "teacher_run_name"]
