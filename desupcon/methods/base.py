"""What every method shares: the step's outputs a method sees, the `Method` base class (its
declaration: settings, needs, losses), the registry, and the settings several methods read."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from desupcon import losses
from desupcon.config import MethodConfig
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
    student_feature_map: torch.Tensor | None = None  # (M, C, H, W), for methods that need it
    teacher_feature_map: torch.Tensor | None = None


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


class Method(abc.ABC):
    """Base: contrastive methods train an online linear classifier on detached view-1 features.

    A method is declared once, by its class (registered with `@register_method`): `name` (the
    `--method` value), `label` (its name in tables; `{field}` is filled from its settings),
    `settings` (the settings it reads, each with flag, tag, help, range and default: they make its
    run name and cache identity), `defaults` (its own defaults where they differ from the
    settings', applied when it is chosen, under any flag given) and its losses; and what the
    training loop must provide: `views` (augmented views per image the model sees),
    `uses_teacher` (teacher features and logits of the same views), `uses_teacher_head` (a trainable copy of the teacher's projection head), `gathers_batch` (the
    loss couples samples, so on several GPUs it needs the global batch), `needs_feature_maps` and
    `uses_every_parameter` (False when some model parameters get no gradient, e.g. CE's projector)
    and `graph_capturable` (its step does no host work and changes no Python state, so the step
    can be replayed as a CUDA graph: engine/graphs.py).
    """

    name: str = ""
    label: str = ""
    settings: tuple = ()
    defaults: dict = {}
    uses_teacher = True
    uses_teacher_head = True
    views = 2
    online_classifier = True  # classifier sees detached features and trains beside the encoder
    gathers_batch = True
    uses_every_parameter = True
    needs_feature_maps = False
    graph_capturable = True

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.uses_teacher = self.needs_teacher(cfg)
        if getattr(cfg, "logit_term", "none") != "none":
            # RepDistiller's form: the classifier trains end to end with CE and the logit term.
            self.online_classifier = False

    @classmethod
    def needs_teacher(cls, cfg: MethodConfig) -> bool:
        """Whether a run of this method with these settings depends on the teacher (a logit term
        makes every method use it)."""
        return cls.uses_teacher or getattr(cfg, "logit_term", "none") != "none"

    @classmethod
    def reads_teacher_projection(cls, cfg: MethodConfig) -> bool:
        """Whether a run of this method reads the teacher's projection head (a trainable copy of
        the probe-trained head): only then is the head probed for it, and only then does the
        head's content enter the run's identity."""
        return cls.uses_teacher_head and cls.needs_teacher(cfg)

    @property
    def uses_bank(self) -> bool:
        return False

    def setup(self, dataset, student, teacher, policy) -> None:
        """Build what the method owns (heads, banks) once the data and models are known."""

    def trainable_modules(self) -> list:
        """Modules the method owns and trains with the student (e.g. embedding heads)."""
        return []

    def after_step(self, out: StepOutputs) -> None:
        """Update the method's own state after the optimiser step (e.g. its memory banks)."""

    def state_dict(self) -> dict:
        """Training state a method keeps between steps (checkpointed with the run)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        result = self.representation_losses(out)
        c = self.cfg
        if getattr(c, "logit_term", "none") != "none":
            batch = out.student_logits.shape[0] // self.views
            labels = out.classifier_labels if out.classifier_labels is not None else out.labels[:batch]
            z_s = out.student_logits[:batch]
            z_t = out.view1_teacher_logits if out.view1_teacher_logits is not None else out.teacher_logits[:batch]
            result["ce"] = c.ce_weight * F.cross_entropy(z_s, labels)
            result[c.logit_term] = c.logit_weight * warmup_factor(c.warmup, out.epoch) * logit_term(
                c, c.logit_term, z_s, z_t, labels)
        if self.online_classifier:
            # the classifier's logits are this process's view 1 (never gathered across GPUs)
            batch = out.student_logits.shape[0] // self.views
            labels = out.classifier_labels if out.classifier_labels is not None else out.labels[:batch]
            result["online_classifier"] = F.cross_entropy(out.student_logits[:batch], labels)
        return result

    @abc.abstractmethod
    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """The method's own losses (the online classifier's is added by `losses`)."""


class BankMixin:
    @property
    def uses_bank(self) -> bool:
        return self.cfg.bank_size > 0


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
