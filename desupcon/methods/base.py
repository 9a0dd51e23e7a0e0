"""What every method shares: the step's outputs a method sees, the `Method` base class (its
declaration: settings, needs, losses), the registry, and the settings several methods read."""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import losses
from desupcon.config import MethodConfig
from desupcon.models.stages import NO_STAGES, Stages, StageNeeds
from desupcon.config.settings import BANK_MODES, FRACTION, LOGIT_TERMS, POSITIVE, WEIGHT, method_setting


@dataclass
class StepOutputs:
    """What a method sees of one step. Views are stacked [view1; view2] (M = 2B rows)."""

    labels: torch.Tensor  # (M,) labels of the stacked views (or (B,) for single-view methods)
    student_projection: torch.Tensor  # (M, D) normalised
    student_logits: torch.Tensor  # (M, C); rows :B are view 1
    teacher_projection: torch.Tensor | None = None  # (M, D) normalised, head trainable
    teacher_logits: torch.Tensor | None = None  # (M, C), detached
    bank_embeddings: torch.Tensor | None = None  # (K, D) teacher embeddings from the memory bank
    bank_labels: torch.Tensor | None = None  # (K,)
    epoch: int = 1  # the epoch this step belongs to (1-based), for warm-ups
    indices: torch.Tensor | None = None  # (B,) training-set indices of the batch's images (CPU)
    classifier_labels: torch.Tensor | None = None  # (B,) labels of view 1 on this process
    view1_teacher_logits: torch.Tensor | None = None  # (B,) rows of view 1 on this process
    student_features: torch.Tensor | None = None  # (M, C) pooled backbone features
    teacher_features: torch.Tensor | None = None  # (M, C_t), detached
    student_feature_map: torch.Tensor | None = None  # (M, C, H, W) final map, when the method's needs ask
    teacher_feature_map: torch.Tensor | None = None
    student_stages: Stages | None = None  # the student's stage maps (model dtype), when asked
    teacher_stages: Stages | None = None  # the teacher's, detached (model dtype), when asked


@dataclass(frozen=True)
class Needs:
    """What a method's step needs from the training loop, declared by the method (`Method.needs`)
    and adjusted to its settings (`Method.needs_of`).

    - `views`: augmented views per image the student sees (1 or 2);
    - `teacher`: the teacher's features and logits of the same views;
    - `teacher_head`: a trainable copy of the teacher's probe-trained projection head;
    - `online_classifier`: the student's classifier reads detached features and trains beside the
      encoder (contrastive methods); else it trains end to end with the method's losses;
    - `bank`: the memory bank of teacher embeddings (the engine keeps, draws and writes it);
    - `student_stages`, `teacher_stages`: which intermediate maps of each model the losses read
      (final map, stage entries, pre-activations: `StageNeeds`);
    - `gathers_batch`: the loss couples samples, so on several GPUs it needs the global batch;
    - `every_parameter`: every student parameter gets a gradient (False for CE's projector: DDP
      must then look for unused parameters);
    - `graph_capturable`: the step does no host work and changes no Python state, so it can be
      replayed as a CUDA graph (engine/graphs.py);
    - `calls_student_modules`: the losses call the student's own modules outside its forward (SDD's
      classifier on regions), which a fused lockstep forward cannot hand gradients for.
    """

    views: int = 2
    teacher: bool = True
    teacher_head: bool = True
    online_classifier: bool = True
    bank: bool = False
    student_stages: StageNeeds = NO_STAGES
    teacher_stages: StageNeeds = NO_STAGES
    gathers_batch: bool = True
    every_parameter: bool = True
    graph_capturable: bool = True
    calls_student_modules: bool = False


# The settings several methods read, declared once here; each method lists the ones it reads in
# `settings` (what it reads makes its run name and cache identity).
TEMPERATURE = method_setting("temperature", "--temperature", float, "contrastive temperature tau", "temp",
                             POSITIVE, 0.07)
BANK = (
    method_setting("bank_size", "--bank-size", int, "memory-bank entries drawn per step (0: no bank)", None,
                   (lambda v: v >= 0, ">= 0 (0 = no bank)"), 0),
    method_setting("bank_momentum", "--bank-momentum", float, "memory-bank momentum m", "bankmom", FRACTION, 0.5),
    # class-aware: slots written at least once, the anchor's class positive (SPEC 5);
    # negatives-only: every bank entry a negative, drawn from all slots (the published README)
    method_setting("bank_mode", "--bank-mode", str,
                   "class-aware (default: written slots, same class positive) or negatives-only (the published "
                   "README: every entry a negative, drawn from all slots)", "bank", default="class-aware",
                   choices=BANK_MODES),
)
CE_WEIGHT = method_setting("ce_weight", "--ce-weight", float,
                           "weight of the student's cross-entropy in logit distillers", "ce", WEIGHT, 1.0)
# The feature distillers' weight of their feature term beside CE; each method sets its own default
# (`defaults`), the originals' weight for it.
FEAT_WEIGHT = method_setting("feat_weight", "--feat-weight", float,
                             "weight of a feature distiller's feature term beside CE (each method has its own "
                             "default, the originals': --print-config shows it)", "fw", WEIGHT, 1.0)
KD_WEIGHT = method_setting("kd_weight", "--kd-weight", float, "weight of the KD term (kd: 0.9; kd-ls: 9)", "kdw",
                           WEIGHT, 0.9)
LOGIT_TEMPERATURE = method_setting("logit_temperature", "--logit-temperature", float,
                                   "temperature T of KD/DKD/SDD (4; LS: 2)", "T",
                                   (lambda v: v > 0, "> 0 (it divides the logits)"), 4.0)
DKD_ALPHA = method_setting("dkd_alpha", "--dkd-alpha", float, "DKD's weight of the target-class term (TCKD)", "a",
                           WEIGHT, 1.0)
DKD_BETA = method_setting("dkd_beta", "--dkd-beta", float,
                          "DKD's weight of the non-target term (NCKD; default: the pair's, SPEC 17)", "b", WEIGHT, 8.0)
WARMUP = method_setting("warmup", "--warmup", int, "epochs over which the distillation term ramps up (DKD: 20)",
                        "warm", (lambda v: v >= 0, ">= 0 epochs"), 0)
# Any representation method may add a logit term (RepDistiller's gamma CE + alpha KD + beta rep):
# `logit_weight * <logit_term>`, and its classifier then trains end to end with `ce_weight * CE`.
COMBO = (
    method_setting("logit_term", "--logit-term", str, "add a logit term to a representation method: none, kd "
                   "or dkd (the classifier then trains end to end with --ce-weight CE)", "plus", default="none",
                   choices=LOGIT_TERMS),
    method_setting("logit_weight", "--logit-weight", float, "weight of --logit-term", "lw", WEIGHT, 1.0),
    CE_WEIGHT, LOGIT_TEMPERATURE, DKD_ALPHA, DKD_BETA, WARMUP,
)
KD = (CE_WEIGHT, KD_WEIGHT, LOGIT_TEMPERATURE, WARMUP)
DKD = (CE_WEIGHT, DKD_ALPHA, DKD_BETA, LOGIT_TEMPERATURE, WARMUP)

# Every method by its `--method` name, in the order of tables and help texts (`register_method`).
METHODS: dict[str, type] = {}

# The modules of this folder imported first, in the order of tables and help texts; any other file after
# them, by name: a new method is a new file and nothing else.
BUILT_IN = ("ce", "supcon", "crd", "lw_supcrd", "hybrid", "logit", "sdd", "crd_nce")
_IMPORTED: list[bool] = []


def import_method_modules() -> None:
    """Import (and so register) every method module of this folder, once. Called by the package and
    by the configuration layer, whichever is imported first: each needs every method declared."""
    if _IMPORTED:
        return
    import importlib
    import pkgutil
    from pathlib import Path
    package = __name__.rsplit(".", 1)[0]
    others = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                    if m.name not in (*BUILT_IN, "base"))
    for module in (*BUILT_IN, *others):
        importlib.import_module(f"{package}.{module}")
    _IMPORTED.append(True)


@dataclass(frozen=True)
class Comparison:
    """Methods compared on one teacher -> student pair under one protocol: a sweep group (`sweep
    NAME`, which also takes `--pair/--pairs`) and the report table of the same name. Its members are
    the methods whose class lists it in `comparisons`, in the positions they give; `reference` is
    the row the differences are taken against, and `context` the members that do not make the table
    appear by themselves (the references and the headline method)."""

    name: str
    title: str
    reference: str
    context: tuple[str, ...]


COMPARISONS = {c.name: c for c in (
    Comparison("logit", "Logit distillers (each published figure says which epoch its source reports: compare it "
                        "with that column)", "kd", ("ce", "lw-supcrd")),
    Comparison("feature", "Feature distillers (published figures of RepDistiller's runs: last epoch)",
               "kd", ("ce", "kd", "crd-nce", "lw-supcrd")),
)}


def comparison_members(comparison: str) -> tuple[str, ...]:
    """The methods of a comparison in their declared positions (a class's own declaration: a
    subclass is a method of its own and declares its own)."""
    members = []
    for i, (name, cls) in enumerate(METHODS.items()):
        own = cls.__dict__.get("comparisons", {})
        if comparison in own:
            members.append((own[comparison], i, name))
    return tuple(name for _, _, name in sorted(members))


def two_stage_phase1_methods() -> tuple[str, ...]:
    """The methods that can be a two-stage run's phase 1 (a representation loss without the classifier)."""
    return tuple(name for name, cls in METHODS.items() if cls.__dict__.get("two_stage_phase1", False))


def register_method(cls):
    """Class decorator: make `cls` a method of the command line, the plan and the report."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` (its --method value)")
    METHODS[cls.name] = cls
    return cls


def declared_settings() -> dict:
    """field -> Setting of every registered method's settings, in registry order (one declaration
    per field: two different declarations of one field are refused)."""
    out: dict = {}
    for cls in METHODS.values():
        for setting in cls.settings:
            known = out.setdefault(setting.field, setting)
            if known is not setting:
                raise ValueError(f"method setting {setting.field!r} is declared twice ({cls.__name__} and "
                                 "another method); declare it once and list it in both methods' settings")
    return out


class Method(nn.Module, abc.ABC):
    """A training method: turns one step's outputs into named losses. Contrastive methods train an
    online linear classifier on detached view-1 features (added here).

    A method is declared once, by its class (registered with `@register_method`): `name` (the
    `--method` value), `label` (its name in tables; `{field}` is filled from its settings),
    `settings` (the settings it reads, each with flag, tag, help, range and default: they make its
    run name and cache identity), `defaults` (its own defaults where they differ from the
    settings', applied when it is chosen, under any flag given), `needs` (what the loop must
    provide: `Needs`), the comparisons it takes part in (`comparisons`: sweep groups and report
    tables), whether it can be a two-stage phase 1 (`two_stage_phase1`), and its losses.

    A method is an `nn.Module`: what it owns and trains (connectors, embedding heads) are its
    submodules, made in `setup` once the data and models are known. The engine moves it with the
    run, trains its parameters in a group of their own (the student's lr, weight decay and schedule,
    unless `optimizer_overrides` says otherwise), averages their gradients across processes, and
    checkpoints `state_dict()` (Python state such as a generator goes through
    `get_extra_state`/`set_extra_state`). Modules it reads but does not own (the student's
    classifier) are held with `refer_to`, so they are neither optimised nor saved twice.
    """

    name: str = ""
    label: str = ""
    settings: tuple = ()
    defaults: dict = {}
    needs: Needs = Needs()
    optimizer_overrides: dict = {}  # e.g. {"lr": 0.01, "weight_decay": 0.0, "schedule": "constant"}
    comparisons: dict = {}  # comparison name -> this method's position in it (`COMPARISONS`)
    two_stage_phase1 = False  # can be phase 1 of a two-stage run

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg
        self.needs = self.needs_of(cfg)

    @classmethod
    def needs_of(cls, cfg: MethodConfig) -> Needs:
        """The class's `needs` under these settings: a logit term (RepDistiller's form) makes the
        method read the teacher's logits and train its classifier end to end."""
        needs = cls.needs
        if getattr(cfg, "logit_term", "none") != "none":
            needs = replace(needs, teacher=True, online_classifier=False)
        return needs

    @classmethod
    def needs_teacher(cls, cfg: MethodConfig) -> bool:
        """Whether a run of this method with these settings depends on the teacher."""
        return cls.needs_of(cfg).teacher

    @classmethod
    def reads_teacher_projection(cls, cfg: MethodConfig) -> bool:
        """Whether a run of this method reads the teacher's projection head (a trainable copy of
        the probe-trained head): only then is the head probed for it, and only then does the
        head's content enter the run's identity."""
        needs = cls.needs_of(cfg)
        return needs.teacher_head and needs.teacher

    def refer_to(self, **modules: nn.Module) -> None:
        """Keep references to modules the method reads but does not own (not submodules: the engine
        neither optimises nor saves them with the method)."""
        self.__dict__.update(modules)

    def setup(self, dataset, student, teacher) -> None:
        """Build what the method owns (connectors, heads, memories) once the data and models are
        known, on the CPU: the engine then moves the method to the run's device."""

    def after_step(self, out: StepOutputs) -> None:
        """Update the method's own state after the optimiser step (e.g. its memory banks)."""

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        result = self.representation_losses(out)
        c = self.cfg
        views = self.needs.views
        if getattr(c, "logit_term", "none") != "none":
            batch = out.student_logits.shape[0] // views
            labels = out.classifier_labels if out.classifier_labels is not None else out.labels[:batch]
            z_s = out.student_logits[:batch]
            z_t = out.view1_teacher_logits if out.view1_teacher_logits is not None else out.teacher_logits[:batch]
            result["ce"] = c.ce_weight * F.cross_entropy(z_s, labels)
            result[c.logit_term] = c.logit_weight * warmup_factor(c.warmup, out.epoch) * logit_term(
                c, c.logit_term, z_s, z_t, labels)
        if self.needs.online_classifier:
            # the classifier's logits are this process's view 1 (never gathered across GPUs)
            batch = out.student_logits.shape[0] // views
            labels = out.classifier_labels if out.classifier_labels is not None else out.labels[:batch]
            result["online_classifier"] = F.cross_entropy(out.student_logits[:batch], labels)
        return result

    @abc.abstractmethod
    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """The method's own losses (the online classifier's is added by `losses`)."""


class FeatureDistillationMethod(Method):
    """Feature distillers: ce_weight * CE on the student's own classifier plus feat_weight times the
    method's feature term (`feature_loss`, named after the method), one view. They read the stage
    maps of both models; one that reads only the pooled features declares `POOLED_FEATURES`."""

    settings = (CE_WEIGHT, FEAT_WEIGHT)
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False,
                  student_stages=StageNeeds(stages=True), teacher_stages=StageNeeds(stages=True))

    @abc.abstractmethod
    def feature_loss(self, out: StepOutputs) -> torch.Tensor:
        """The feature term before its weight."""

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        c = self.cfg
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                self.name.replace("-", "_"): c.feat_weight * self.feature_loss(out)}


# what a feature distiller reading only the pooled features (always in the step's outputs) needs
POOLED_FEATURES = replace(FeatureDistillationMethod.needs, student_stages=NO_STAGES, teacher_stages=NO_STAGES)


def stage_outputs(out: StepOutputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The stage outputs feats[1..n] of the student and the teacher, in float32."""
    return ([f.float() for f in out.student_stages.feats[1:]], [f.float() for f in out.teacher_stages.feats[1:]])


class BankMixin:
    """Methods that read the memory bank when `bank_size` > 0."""

    @classmethod
    def needs_of(cls, cfg: MethodConfig) -> Needs:
        return replace(super().needs_of(cfg), bank=cfg.bank_size > 0)


def warmup_factor(warmup: int, epoch: int) -> float:
    """min(epoch / W, 1): the distillation term's linear warm-up (epochs are 1-based)."""
    return min(epoch / warmup, 1.0) if warmup > 0 else 1.0


def logit_term(c: MethodConfig, base: str, z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor,
               standardize: bool = False) -> torch.Tensor:
    """kd: kd_weight * KD; dkd: alpha TCKD + beta NCKD (both with T^2), optionally on z-scored logits."""
    if standardize:
        z_s, z_t = losses.standardize_logits(z_s), losses.standardize_logits(z_t)
    if base == "kd":
        return c.kd_weight * losses.kd_loss(z_s, z_t, c.logit_temperature)
    return losses.dkd_loss(z_s, z_t, labels, c.dkd_alpha, c.dkd_beta, c.logit_temperature)
