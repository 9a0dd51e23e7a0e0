"""Training methods: each turns one batch's model outputs into a dict of named losses.

The training loop sums the dict. Adding a method means writing its loss in `losses.py` and one
small class here, then registering it in `METHODS`.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from desupcon import losses
from desupcon.engine import distributed
from desupcon.config import MethodConfig


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


# The method settings (MethodConfig fields, each declared in settings.py) in the groups the
# methods read them; what a method reads decides its run name and cache identity.
BANK = ("bank_size", "bank_momentum", "bank_mode")
LW = ("alpha", "beta", "temperature", "adaptive_beta", "kd_temperature")
# Any representation method may add a logit term (RepDistiller's gamma CE + alpha KD + beta rep).
COMBO = ("logit_term", "logit_weight", "ce_weight", "logit_temperature", "dkd_alpha", "dkd_beta", "warmup")
KD = ("ce_weight", "kd_weight", "logit_temperature", "warmup")
DKD = ("ce_weight", "dkd_alpha", "dkd_beta", "logit_temperature", "warmup")
SDD = ("sdd_scales", "complementary_weight")


class Method(abc.ABC):
    """Base: contrastive methods train an online linear classifier on detached view-1 features.

    A method is declared once, by its class: `name` (the `--method` value), `label` (its name in
    tables; `{field}` is filled from its settings), `reads` (the settings it reads: they make its run
    name and cache identity), `defaults` (its own defaults, applied when it is chosen, under any
    flag given) and its losses; and what the training loop must provide: `views` (augmented views
    per image the model sees), `uses_teacher` (teacher features and logits of the same views),
    `uses_teacher_head` (a trainable copy of the teacher's projection head), `gathers_batch` (the
    loss couples samples, so on several GPUs it needs the global batch), `needs_feature_maps` and
    `uses_every_parameter` (False when some model parameters get no gradient, e.g. CE's projector).
    """

    name: str = ""
    label: str = ""
    reads: tuple[str, ...] = ()
    defaults: dict = {}
    uses_teacher = True
    uses_teacher_head = True
    views = 2
    online_classifier = True  # classifier sees detached features and trains beside the encoder
    gathers_batch = True
    uses_every_parameter = True
    needs_feature_maps = False

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


class CrossEntropyMethod(Method):
    """The undistilled student: cross-entropy on its own classifier, one view."""

    name, label = "ce", "CE student"
    uses_teacher = False
    views = 1
    online_classifier = False
    gathers_batch = False
    uses_every_parameter = False  # the projector gets no gradient

    def representation_losses(self, out):
        return {"ce": F.cross_entropy(out.student_logits, out.labels)}


class SupConMethod(Method):
    name, label, reads = "supcon", "SupCon", ("temperature", *COMBO)
    uses_teacher = False

    def representation_losses(self, out):
        return {"supcon": losses.supcon_loss(out.student_projection, out.labels, self.cfg.temperature)}


class BankMixin:
    @property
    def uses_bank(self) -> bool:
        return self.cfg.bank_size > 0


class CRDMethod(BankMixin, Method):
    name, label, reads = "crd", "CRD", ("temperature", *BANK, *COMBO)

    def representation_losses(self, out):
        return {"crd": losses.crd_loss(out.student_projection, out.teacher_projection,
                                       self.cfg.temperature, bank=out.bank_embeddings)}


class LWSupCRDMethod(BankMixin, Method):
    name, label, reads = "lw-supcrd", "LW-SupCRD", (*LW, *BANK, *COMBO)

    def lw_kwargs(self, out: StepOutputs) -> dict:
        c = self.cfg
        return dict(alpha=c.alpha, beta=c.beta, temperature=c.temperature,
                    adaptive_beta=c.adaptive_beta, kd_temperature=c.kd_temperature,
                    bank=out.bank_embeddings, bank_labels=out.bank_labels,
                    bank_positives=c.bank_mode == "class-aware")

    def representation_losses(self, out):
        return {"lw_supcrd": losses.lw_supcrd_loss(out.student_projection, out.teacher_projection,
                                                   out.teacher_logits, out.labels, **self.lw_kwargs(out))}


class HybridMethod(LWSupCRDMethod):
    """lambda * SupCon + (1 - lambda) * LW-SupCRD, each term divided by a running scale of itself in
    the published ("running") form, or the plain mix of SPEC 4 ("plain").

    Running form (SPEC 6): for the first `hybrid_scale_steps` steps s <- 0.9 s + 0.1 L (s starts at
    the first L), then s is frozen; L = lambda * SupCon / s_sc + (1 - lambda) * LW-SupCRD / s_lw.
    The scales are detached (no gradient) and checkpointed.
    """

    name, label = "hybrid", "Hybrid (lambda {lam})"
    reads = ("lam", "hybrid_scaling", "hybrid_scale_steps", *LW, *BANK, *COMBO)

    SCALE_MOMENTUM = 0.9

    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.scales: torch.Tensor | None = None  # (s_sc, s_lw)
        self.scale_steps = 0

    def state_dict(self) -> dict:
        return {"scales": None if self.scales is None else self.scales.detach().cpu().clone(),
                "scale_steps": self.scale_steps}

    def load_state_dict(self, state: dict) -> None:
        scales = state.get("scales")
        self.scales = None if scales is None else scales.clone()
        self.scale_steps = int(state.get("scale_steps", 0))

    def representation_losses(self, out):
        c = self.cfg
        kwargs = self.lw_kwargs(out)
        if c.hybrid_scaling == "plain":  # SPEC 4's mix
            return {"hybrid": losses.hybrid_loss(out.student_projection, out.teacher_projection,
                                                 out.teacher_logits, out.labels, lam=c.lam, **kwargs)}
        supcon = losses.supcon_loss(out.student_projection, out.labels, c.temperature)
        lw = losses.lw_supcrd_loss(out.student_projection, out.teacher_projection, out.teacher_logits,
                                   out.labels, **kwargs)
        current = torch.stack([supcon.detach(), lw.detach()])
        if self.scale_steps < c.hybrid_scale_steps:
            if self.scales is None:
                self.scales = current
            else:
                self.scales = self.SCALE_MOMENTUM * self.scales.to(current.device) \
                    + (1 - self.SCALE_MOMENTUM) * current
            self.scale_steps += 1
        scales = self.scales.to(current.device)
        return {"hybrid": c.lam * supcon / scales[0] + (1 - c.lam) * lw / scales[1]}


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


class LogitDistillationMethod(Method):
    """Logit distillers (SPEC 13): one view, CE on the student's own classifier (weight
    `ce_weight`) plus the warmed-up distillation term on the teacher's float32 logits."""

    uses_teacher_head = False
    views = 1
    online_classifier = False
    gathers_batch = False
    uses_every_parameter = False  # the projector gets no gradient
    base = "kd"
    standardize = False

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        return logit_term(self.cfg, self.base, out.student_logits, out.teacher_logits, out.labels,
                          self.standardize)

    def representation_losses(self, out):
        c = self.cfg
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                self.cfg.method.replace("-", "_"): warmup_factor(c.warmup, out.epoch) * self.distillation(out)}


class KDMethod(LogitDistillationMethod):
    """Hinton's KD: 0.1 CE + 0.9 T^2 KL, T 4."""

    name, label, reads = "kd", "KD", KD
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "logit_temperature": 4.0, "warmup": 0}
    base = "kd"


class DKDMethod(LogitDistillationMethod):
    """Decoupled KD: CE + warm-up x (alpha TCKD + beta NCKD); beta follows the pair (SPEC 17)."""

    name, label, reads = "dkd", "DKD", DKD
    defaults = {"ce_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "logit_temperature": 4.0, "warmup": 20}
    base = "dkd"


class KDStandardizedMethod(KDMethod):
    """KD on z-scored logits with the LSKD calibration (T 2, KD weight 9)."""

    name, label = "kd-ls", "KD+LS"
    defaults = {"ce_weight": 0.1, "kd_weight": 9.0, "logit_temperature": 2.0, "warmup": 0}
    standardize = True


class DKDStandardizedMethod(DKDMethod):
    """DKD on z-scored logits with the LSKD calibration (T 2, alpha and beta x 9)."""

    name, label = "dkd-ls", "DKD+LS"
    defaults = {"ce_weight": 1.0, "dkd_alpha": 9.0, "dkd_beta": 72.0, "logit_temperature": 2.0, "warmup": 20}
    standardize = True


class ScaleDecoupledMethod(LogitDistillationMethod):
    """SDD: the base loss on every region of the final feature maps (levels `sdd_scales`), each
    model's own classifier applied per region, complementary regions weighted up."""

    needs_feature_maps = True
    base = "dkd"
    reads = (*DKD, *SDD)

    def setup(self, dataset, student, teacher, policy) -> None:
        self.student_classifier = student.classifier
        self.teacher_classifier = teacher.encoder.fc

    def distillation(self, out: StepOutputs) -> torch.Tensor:
        c = self.cfg
        scales = tuple(c.sdd_scales)
        student = losses.region_logits(out.student_feature_map, self.student_classifier, scales)
        teacher = losses.region_logits(out.teacher_feature_map, self.teacher_classifier, scales)
        weight = c.kd_weight if self.base == "kd" else 1.0
        return weight * losses.sdd_loss(student, teacher, out.labels, base=self.base, alpha=c.dkd_alpha,
                                         beta=c.dkd_beta, temperature=c.logit_temperature,
                                         complementary_weight=c.complementary_weight,
                                         standardize=self.standardize)


class SDKDMethod(ScaleDecoupledMethod):
    name, label, reads = "sd-kd", "SD-KD", (*KD, *SDD)
    defaults = {**KDMethod.defaults, "sdd_scales": [1, 2]}  # the published SD-KD used M = [1, 2]
    base = "kd"


class SDDKDMethod(ScaleDecoupledMethod):
    name, label = "sd-dkd", "SD-DKD"
    defaults = DKDMethod.defaults
    base = "dkd"


class SDDLSKDMethod(ScaleDecoupledMethod):
    """The fusion (seed 003): SDD with DKD as base on z-score standardised region logits, with the
    seed's settings (alpha 1, beta 8, T 4, W 20, M 1 2 4)."""

    name, label = "sdd-lskd", "SDD-LSKD"
    defaults = DKDMethod.defaults
    base = "dkd"
    standardize = True


class SDDLSKDCalibratedMethod(SDDLSKDMethod):
    """The fusion with the LSKD calibration (alpha 9, beta 72, T 2, W 20)."""

    name, label = "sdd-lskd-calibrated", "SDD-LSKD (LSKD calibration)"
    defaults = DKDStandardizedMethod.defaults


class CRDNCEMethod(Method):
    """The literature's CRD (SPEC 14): Linear(d, nce_dim) + L2 embedding heads on the student's
    and teacher's pooled features, two momentum banks, class-aware negatives, the NCE loss with
    its fixed normalising constants; CE + nce_weight * CRD. One view."""

    name, label = "crd-nce", "CRD (NCE, Tian et al.)"
    reads = ("ce_weight", "nce_weight", "nce_dim", "nce_negatives", "nce_momentum", "nce_temperature")
    defaults = {"ce_weight": 1.0}
    uses_teacher_head = False
    views = 1
    online_classifier = False
    gathers_batch = False
    uses_every_parameter = False

    def setup(self, dataset, student, teacher, policy) -> None:
        from desupcon.crd_memory import CRDMemory
        c = self.cfg
        self.embed_student = torch.nn.Linear(student.encoder.feature_dim, c.nce_dim).to(policy.device)
        self.embed_teacher = torch.nn.Linear(teacher.encoder.feature_dim, c.nce_dim).to(policy.device)
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        self.memory = CRDMemory(dataset.train_labels.cpu(), dim=c.nce_dim, momentum=c.nce_momentum,
                                device=policy.device, generator=self.generator)
        # more negatives than the training set holds bring nothing new (they repeat)
        self.negatives = min(c.nce_negatives, len(dataset.train_labels))
        self._pending = None

    def trainable_modules(self) -> list:
        return [self.embed_student, self.embed_teacher]

    def representation_losses(self, out):
        c = self.cfg
        v_s = F.normalize(self.embed_student(out.student_features), dim=1)
        v_t = F.normalize(self.embed_teacher(out.teacher_features), dim=1)
        crd = self.memory.loss(v_s, v_t, out.indices, None, self.negatives, self.generator,
                               c.nce_temperature)
        self._pending = (out.indices, v_s.detach(), v_t.detach())
        return {"ce": c.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                "crd_nce": c.nce_weight * crd}

    def after_step(self, out: StepOutputs) -> None:
        if self._pending is not None:
            indices, v_s, v_t = self._pending
            if distributed.active():  # every rank applies the global batch's update: identical banks
                indices = distributed.all_gather_no_grad(indices.to(v_s.device)).cpu()
                v_s, v_t = distributed.all_gather_no_grad(v_s), distributed.all_gather_no_grad(v_t)
            self.memory.update(indices, v_s, v_t)
            self._pending = None

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "embed_student": self.embed_student.state_dict(),
                "embed_teacher": self.embed_teacher.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.memory.load_state_dict(state["memory"])
        self.embed_student.load_state_dict(state["embed_student"])
        self.embed_teacher.load_state_dict(state["embed_teacher"])
        self.generator.set_state(state["generator"])


# Every method, by its `--method` name (the order of tables and help texts).
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    CrossEntropyMethod, SupConMethod, CRDMethod, LWSupCRDMethod, HybridMethod, KDMethod, KDStandardizedMethod,
    DKDMethod, DKDStandardizedMethod, SDKDMethod, SDDKDMethod, SDDLSKDMethod, SDDLSKDCalibratedMethod,
    CRDNCEMethod)}
LOGIT_METHODS = tuple(name for name, cls in METHODS.items() if issubclass(cls, LogitDistillationMethod))


def method_label(cfg: MethodConfig) -> str:
    """The method's name in tables, its settings filled in (`Hybrid (lambda 0.3)`)."""
    cls = METHODS.get(cfg.method)
    return cls.label.format(**dataclasses.asdict(cfg)) if cls else cfg.method


def build_method(cfg: MethodConfig) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
