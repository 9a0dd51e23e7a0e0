"""Two-stage distillation (SPEC 12, seed 004): one run, two phases, through the one training loop.

Phase 1 trains the student's encoder and projector with a representation method only (CRD
in-batch by default; any contrastive method): the student's classifier is left out of the
optimiser, has requires_grad False and no loss term (no online classifier, no CE), so it stays
bit-identical to its initialisation. Phase 2 is the KD probe (`probes.KDProbeMethod`) on the frozen,
eval-mode encoder: it trains that still initial classifier with 0.7 * T^2 KL(teacher || student)
+ 0.3 CE, T = 4, Adam 1e-3 without weight decay, constant lr. The seed's variants are settings: its
SGD phase-1 optimiser (`phase1_optimizer="sgd"`), its partial fine-tune of the last stage at lr
1e-5 with BatchNorm in train mode (`finetune_last_stage`), and two-level CRD (`two_level_crd`).

Files (under the run's output folder, `<name>` the two-stage run's name):
  pth_models/in_progress/<name>__phase1.pth        phase 1's epoch checkpoint
  pth_models/in_progress/<name>__phase1_done.pth   phase 1's final state (a student checkpoint),
                                                   written before phase 2 starts
  pth_models/in_progress/<name>__phase2.pth        phase 2's epoch checkpoint
  pth_models/<name>.pth                            the finished run (kind "student"), cached
A run stopped in phase 2 resumes phase 2 from its epoch checkpoint without redoing phase 1. The
intermediate files are removed once the final checkpoint is written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import data as data_mod, losses
from desupcon.config import run_name, RunConfig
from desupcon.config.validation import ConfigError, validate_config
from desupcon.engine import distributed as dist
from desupcon.engine.build import assemble_run, build_student
from desupcon.engine.devices import as_policy
from desupcon.engine.loop import train_group
from desupcon.engine.run import final_metrics, Run, RunResult
from desupcon.methods import build_method, Method, StepOutputs, two_stage_phase1_methods
from desupcon.models import load_matching_state_dict, Student
from desupcon.probes import fit_probe, FrozenEncoderProbe, knn_probe, ProbeConfig
from desupcon.store.cache import load_cached_student
from desupcon.store.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, remove_partial
from desupcon.store.schemas import student_checkpoint
from desupcon.store.paths import check_output_dirs, OutputPaths
from desupcon.store.records import read_record, save_log
from desupcon.store.weights import fingerprint


log = logging.getLogger("desupcon")

__all__ = ["TwoStageConfig", "RepresentationPhase", "PHASE1_METHODS", "two_stage_name",
           "two_stage_identity", "phase1_config", "train_two_stage"]

# Representation methods phase 1 can use (crd-nce's own CE term is dropped there).
PHASE1_METHODS = two_stage_phase1_methods()  # the methods declare it
# Loss terms of a method that train the classifier: never part of phase 1.
CLASSIFIER_TERMS = ("ce", "online_classifier")
PHASE1_OPTIMIZERS = ("run", "adam", "sgd")
ADAM_MAX_LR = 0.01  # Adam is run at 1e-4..1e-3; a larger lr is an SGD one carried over by mistake
# The seed's phase-1 SGD table (SPEC 12).
SEED_SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64}
MAP_EMBED_DIM = 128  # two-level CRD: the linear embeddings of the per-channel pooled final map
PHASE1_KIND, PHASE2_KIND = "two-stage-phase1", "two-stage-phase2"  # `Run.kind` of each phase


def _kd_probe_defaults() -> ProbeConfig:
    return ProbeConfig(schedule="constant")


@dataclass
class TwoStageConfig:
    """Settings of a two-stage run beyond its `RunConfig` (which holds phase 1's data, model,
    method settings, optimiser and epochs).

    phase1_method: the representation method of phase 1 (its settings: the RunConfig's method
      section; `with_method` defaults apply when it differs from the RunConfig's method).
    phase1_optimizer: "run": the RunConfig's own optimiser and settings (Adam 1e-3 under `paper`,
      SGD 0.05 under `mdistiller`), so phase 1 trains what an end-to-end run of the same method
      trains; "adam": those settings with Adam (its lr must suit Adam: an SGD lr such as 0.05 is
      refused); "sgd": the seed's table (SGD momentum 0.9, lr 0.05, weight decay 5e-4, batch 64;
      epochs and schedule the RunConfig's).
    phase2: the KD probe's settings (50 epochs, Adam 1e-3, batch 128, constant lr, T = 4, 0.7 KL +
      0.3 CE; its seed None: the run's seed).
    finetune_last_stage: the seed's variant of phase 2 (last stage at phase2.finetune_lr, 1e-5,
      BatchNorm in train mode there); the same switch as phase2.finetune_last_stage (either sets both).
    two_level_crd (phase1_method "crd" only): CRD on two levels, summed: the method's in-batch CRD
      between the student's projector and the teacher head (the pooled features through the MLP
      projections), plus an in-batch CRD between trainable linear embeddings (dim 128, L2-normalised,
      as in the CRD paper) of the student's and the teacher's final feature maps pooled per channel.
    """

    phase1_method: str = "crd"
    phase1_optimizer: str = "run"
    phase2: ProbeConfig = field(default_factory=_kd_probe_defaults)
    finetune_last_stage: bool = False
    two_level_crd: bool = False

    def __post_init__(self):
        if isinstance(self.phase2, dict):
            self.phase2 = ProbeConfig(**self.phase2)
        both = self.finetune_last_stage or self.phase2.finetune_last_stage
        self.finetune_last_stage = both
        self.phase2 = dataclasses.replace(self.phase2, finetune_last_stage=both,
                                          schedule=self.phase2.schedule or "constant")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TwoStageConfig":
        return cls(**{**d, "phase2": ProbeConfig(**d.get("phase2", {}))})

    def check(self) -> None:
        if self.phase1_method not in PHASE1_METHODS:
            raise ConfigError(f"two-stage: phase 1 needs a representation method ({', '.join(PHASE1_METHODS)}), "
                              f"got {self.phase1_method!r}")
        if self.phase1_optimizer not in PHASE1_OPTIMIZERS:
            raise ConfigError(f"two-stage: phase1_optimizer must be one of {', '.join(PHASE1_OPTIMIZERS)}, "
                              f"got {self.phase1_optimizer!r}")
        if self.two_level_crd and self.phase1_method != "crd":
            raise ConfigError("two-stage: two_level_crd needs phase1_method crd")
        self.phase2.check()


class RepresentationPhase(Method):
    """Phase 1's method: `inner`'s representation losses only (terms on the student's classifier
    dropped, no online classifier), plus with `two_level` the map-level in-batch CRD."""

    def __init__(self, inner: Method, two_level: bool = False):
        if getattr(inner.cfg, "logit_term", "none") != "none":
            raise ConfigError("two-stage: phase 1 takes a representation loss only; set logit_term none")
        super().__init__(inner.cfg)
        self.inner, self.two_level = inner, two_level
        # the inner method's needs; no classifier term (the classifier is never used)
        self.needs = replace(inner.needs, online_classifier=False, every_parameter=False,
                             teacher=inner.needs.teacher or two_level)

    def setup(self, dataset, student, teacher) -> None:
        self.inner.setup(dataset, student, teacher)
        if self.two_level:
            self.map_student = nn.Linear(student.encoder.feature_dim, MAP_EMBED_DIM)
            self.map_teacher = nn.Linear(teacher.encoder.feature_dim, MAP_EMBED_DIM)

    def after_step(self, out: StepOutputs) -> None:
        self.inner.after_step(out)

    def map_level_loss(self, out: StepOutputs) -> torch.Tensor:
        """In-batch CRD between the linear embeddings of the final feature maps pooled per channel.
        Every encoder here pools its final map by a per-channel global average, so the pooled map
        is the backbone feature vector the loop already provides (no second map forward)."""
        v_s = F.normalize(self.map_student(out.student_features), dim=1)
        v_t = F.normalize(self.map_teacher(out.teacher_features), dim=1)
        return losses.crd_loss(v_s, v_t, self.cfg.temperature)

    def representation_losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        result = {k: v for k, v in self.inner.representation_losses(out).items() if k not in CLASSIFIER_TERMS}
        if self.two_level:
            result["crd_map"] = self.map_level_loss(out)
        return result

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        return self.representation_losses(out)


# ----------------------------------------------------------------------------------------------
# Configuration, names, identities
# ----------------------------------------------------------------------------------------------

def phase1_config(cfg: RunConfig, ts: TwoStageConfig) -> RunConfig:
    """The RunConfig phase 1 trains under: `ts.phase1_method` and the chosen optimiser."""
    p1 = cfg if cfg.method.method == ts.phase1_method else cfg.with_method(ts.phase1_method)
    if ts.phase1_optimizer == "sgd":
        return p1.replace(optim=SEED_SGD)
    if ts.phase1_optimizer == "run":
        return p1
    if p1.optim.lr > ADAM_MAX_LR:
        raise ConfigError(f"two-stage: phase1_optimizer adam would run Adam at the run's lr {p1.optim.lr} "
                          f"({p1.optim.optimizer}'s); pass an Adam lr (--lr 0.001), or phase1_optimizer "
                          "run (the run's own optimiser) or sgd (the seed's table)")
    return p1.replace(optim={"optimizer": "adam"})


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, float) else str(value)


_PHASE2_TAGS = {"epochs": "ep", "lr": "lr", "batch_size": "bs", "seed": "seed", "schedule": "sched",
                "temperature": "T", "kd_weight": "kdw", "ce_weight": "ce", "finetune_lr": "ftlr"}


def two_stage_name(cfg: RunConfig, ts: TwoStageConfig) -> str:
    """`student_twostage_<phase-1 run name without "student_">`, plus a tag per two-stage setting
    that differs from the defaults (`p2ep10`, `ft`, `twolevel`, ...)."""
    base = run_name(phase1_config(cfg, ts))
    name = "student_twostage_" + base[len("student_"):] if base.startswith("student_") else "twostage_" + base
    default = TwoStageConfig()
    tags = [f"p2{_PHASE2_TAGS[k]}{_fmt(getattr(ts.phase2, k))}" for k in _PHASE2_TAGS
            if getattr(ts.phase2, k) != getattr(default.phase2, k)]
    if ts.finetune_last_stage:
        tags.append("ft")
    if ts.two_level_crd:
        tags.append("twolevel")
    return "_".join([name, *tags])


def two_stage_identity(cfg: RunConfig, ts: TwoStageConfig, teacher_fingerprint: str | None) -> dict:
    """Everything that determines the two-stage run's result."""
    return {**phase1_config(cfg, ts).identity(teacher_fingerprint), "two_stage": ts.to_dict()}


def _phase1_identity(identity: dict) -> dict:
    return {**identity, "phase": 1}


# ----------------------------------------------------------------------------------------------
# Phase 1
# ----------------------------------------------------------------------------------------------

def _phase1_run(p1cfg: RunConfig, ts: TwoStageConfig, name: str, identity: dict,
                dataset: data_mod.ImageDataset, teacher, policy) -> Run:
    """A fresh student (the same initialisation as an end-to-end run of the same seed) whose
    optimiser holds everything but the classifier. Parameter groups as in `make_student_run`."""
    method = RepresentationPhase(build_method(p1cfg.method), two_level=ts.two_level_crd)
    o = p1cfg.optim
    torch.manual_seed(o.seed)
    student = policy.prepare(build_student(p1cfg.model.student_arch, dataset.num_classes, p1cfg.model.init))
    for p in student.classifier.parameters():
        p.requires_grad_(False)
    classifier_ids = {id(p) for p in student.classifier.parameters()}
    groups = [{"params": [p for p in student.parameters() if id(p) not in classifier_ids],
               "lr": o.lr, "weight_decay": o.weight_decay}]
    schedules = [o.schedule]
    return assemble_run(p1cfg, name, identity, method, student, groups, schedules, dataset, teacher, policy,
                        kind=PHASE1_KIND)


def _phase1_done_path(paths: OutputPaths, name: str):
    return paths.models / "in_progress" / f"{name}__phase1_done.pth"


def _load_phase1(path, identity: dict, policy) -> tuple[Student, dict] | None:
    """Phase 1's saved final state when it is of this run, else None."""
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, expected_kind="student")
    except CheckpointError as exc:
        log.warning(f"ignoring phase 1's final state {path}: {exc}; phase 1 is trained again")
        return None
    if ckpt.get("identity") != identity:
        log.warning(f"ignoring phase 1's final state of another configuration ({path})")
        return None
    student = build_student(ckpt["student_arch"], ckpt["num_classes"])
    load_matching_state_dict(student, ckpt["student"], source=str(path))
    return policy.prepare(student), ckpt


def _phase1(p1cfg, ts, name, identity, dataset, teacher, policy, paths, resume) -> tuple[Student, dict]:
    """Phase 1's student and its final checkpoint dict: loaded when already done, else trained
    (resuming from its epoch checkpoint) and saved before phase 2 starts."""
    done_path = _phase1_done_path(paths, name)
    p1_identity = _phase1_identity(identity)
    if resume:
        found = _load_phase1(done_path, p1_identity, policy)
        if found is not None:
            log.info(f"[{name}] phase 1 loaded from {done_path}")
            return found
    p1_name = f"{name}__phase1"
    run = _phase1_run(p1cfg, ts, p1_name, p1_identity, dataset, teacher, policy)
    finished, failures = train_group([run], dataset, teacher, paths, resume=resume, save_every=p1cfg.save_every)
    if failures:
        raise failures[0]
    run = finished[0]
    metrics = {"seconds": sum(e["seconds"] for e in run.log), "epochs": run.epoch,
               "loss": run.log[-1]["loss"], "losses": run.log[-1]["losses"]}
    metrics["knn"] = knn_probe(run.model, dataset, policy)  # the phase-1 encoder's features
    ckpt = run.final_checkpoint(metrics)
    if dist.is_main():
        atomic_torch_save(done_path, ckpt)
        remove_partial(paths, p1_name)
    dist.barrier()
    return run.model, ckpt


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def _result(name: str, p1cfg: RunConfig, path, ckpt: dict, cached: bool) -> RunResult:
    return RunResult(name, p1cfg, path, ckpt["metrics"], ckpt["log"], cached,
                     (read_record(p1cfg, name) or {}).get("metrics") or None, "trained")


def train_two_stage(cfg: RunConfig, two_stage_cfg: TwoStageConfig | None, dataset: data_mod.ImageDataset,
                    teacher, policy, force: bool = False, resume: bool = True) -> RunResult:
    """Train (or load from cache) one two-stage run: phase 1 under `phase1_config(cfg, ts)`, then
    the KD probe on its frozen encoder training its still initial classifier.

    The final checkpoint `pth_models/<two_stage_name>.pth` is a student checkpoint: its metrics
    are phase 2's (`test_acc` the KD-probed classifier's last-epoch test accuracy, `top5`, ...,
    `seconds` both phases together), its log phase 2's, `ckpt["two_stage"]` holds the settings and
    phase 1's log and metrics (k-NN accuracy of its encoder included), and `ckpt["config"]` is
    phase 1's RunConfig with a `two_stage` entry (ignored by `RunConfig.from_dict`, kept in the
    records so that the report tells two-stage runs from end-to-end ones). `force` retrains both
    phases; `resume` False ignores epoch checkpoints and phase 1's saved state.
    """
    ts = two_stage_cfg or TwoStageConfig()
    ts.check()
    if teacher is None:
        raise ConfigError("two-stage needs the teacher (phase 2 distils its logits)")
    policy = as_policy(policy)
    p1cfg = phase1_config(cfg, ts)
    validate_config(p1cfg, dataset)
    paths = OutputPaths(cfg.output_dir)
    check_output_dirs(paths)
    fp = getattr(teacher, "fingerprint", None)
    name, identity = two_stage_name(cfg, ts), two_stage_identity(cfg, ts, fp)
    final_path = paths.checkpoint(name)
    cached = None if force else load_cached_student(final_path, identity, name)
    if cached is not None:
        log.info(f"[{name}] loaded from cache: test acc {cached['metrics']['test_acc']:.2f}%")
        return _result(name, p1cfg, final_path, cached, True)
    resume = resume and not force

    student, p1ckpt = _phase1(p1cfg, ts, name, identity, dataset, teacher, policy, paths, resume)

    # Phase 2: the KD probe on the frozen encoder, trained into the student's own classifier.
    p2cfg = ts.phase2.resolved("kd", p1cfg.optim.seed)
    p2_identity = {**identity, "phase": 2, "phase1_student": fingerprint(student)}
    probe = FrozenEncoderProbe(student.encoder, head=copy.deepcopy(student.classifier),
                               finetune_last_stage=ts.finetune_last_stage)
    result = fit_probe(probe, "kd", dataset, policy, p2cfg, teacher=teacher, run_config=p1cfg, paths=paths,
                       name=f"{name}__phase2", identity=p2_identity, resume=resume, run_kind=PHASE2_KIND)
    student.classifier.load_state_dict(probe.head.state_dict())
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()

    p2log = result["log"]
    metrics = final_metrics(p2log, p2cfg.epochs)
    metrics.update({"top5": result["top5"], "phase1_seconds": p1ckpt["metrics"]["seconds"],
                    "phase2_seconds": metrics["seconds"], "phase1_epochs": p1ckpt["metrics"]["epochs"],
                    "phase1_knn_top1": p1ckpt["metrics"]["knn"]["top1"]})
    metrics["seconds"] = metrics["phase1_seconds"] + metrics["phase2_seconds"]
    ckpt = student_checkpoint(name, identity, {**p1cfg.to_dict(), "two_stage": ts.to_dict()}, student, metrics,
                              p2log, fp, p1ckpt.get("teacher_head"), p1ckpt.get("method_state"),
                              two_stage={"config": ts.to_dict(), "phase2": dataclasses.asdict(p2cfg),
                                         "phase1": {"name": p1ckpt["name"], "log": p1ckpt["log"],
                                                    "metrics": p1ckpt["metrics"], "config": p1cfg.to_dict()}})
    if dist.is_main():
        atomic_torch_save(final_path, ckpt)
        save_log(paths, name, p2log)
        _phase1_done_path(paths, name).unlink(missing_ok=True)
        remove_partial(paths, f"{name}__phase1")
    dist.barrier()
    log.info(f"[{name}] two-stage: phase-2 test acc {metrics['test_acc']:.2f}% (top-5 {metrics['top5']:.2f}%), "
             f"phase-1 k-NN {metrics['phase1_knn_top1']:.2f}%")
    return _result(name, p1cfg, final_path, ckpt, False)

