"""One way to build a run: model, method, optimiser groups, schedules, teacher head copy, bank,
DDP wrap and compile."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from desupcon import data as data_mod
from desupcon.config import OptimConfig, run_name, RunConfig
from desupcon.engine.devices import as_policy, DevicePolicy, make_scheduler
from desupcon.engine.run import Run
from desupcon.memory_bank import MomentumMemoryBank
from desupcon.methods import build_method, Method
from desupcon.models import build_encoder, Student, Teacher, teacher_identity_fingerprint


def build_student(arch: str, num_classes: int, init: str = "kaiming") -> Student:
    return Student(build_encoder(arch, num_classes, init))


def make_optimizer(optim: OptimConfig, groups: list[dict], policy: DevicePolicy) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return policy.make_sgd(groups, optim.momentum)
    return policy.make_adam(groups)


def make_student_run(cfg: RunConfig, dataset: data_mod.ImageDataset, teacher: Teacher | None,
                     policy) -> Run:
    """A fresh student with its optimiser: parameters seeded by the run's seed alone.

    One optimiser, parameter groups of their own (SPEC 6): the encoder and projector (the
    student's lr, weight decay and schedule), the classifier, the teacher head and any module the
    method owns. A contrastive method's online classifier and the teacher head have their own
    constant learning rate and no weight decay; a CE student's classifier is part of the student.
    """
    policy = as_policy(policy)
    method = build_method(cfg.method)
    o = cfg.optim
    torch.manual_seed(o.seed)
    student = policy.prepare(build_student(cfg.model.student_arch, dataset.num_classes, cfg.model.init))
    classifier_ids = {id(p) for p in student.classifier.parameters()}
    groups = [{"params": [p for p in student.parameters() if id(p) not in classifier_ids],
               "lr": o.lr, "weight_decay": o.weight_decay}]
    schedules = [o.schedule]
    if method.needs.online_classifier:
        groups.append({"params": list(student.classifier.parameters()), "lr": o.classifier_lr,
                       "weight_decay": 0.0})
        schedules.append("constant")
    else:
        groups.append({"params": list(student.classifier.parameters()), "lr": o.lr,
                       "weight_decay": o.weight_decay})
        schedules.append(o.schedule)
    return assemble_run(cfg, run_name(cfg), None, method, student, groups, schedules, dataset, teacher, policy)


def assemble_run(cfg: RunConfig, name: str, identity: dict | None, method: Method, student: Student,
                 groups: list[dict], schedules: list[str], dataset: data_mod.ImageDataset,
                 teacher: Teacher | None, policy: DevicePolicy, kind: str = "student") -> Run:
    """A student run from its model and the parameter groups of the student itself: adds the
    teacher head's and the method's own groups, the optimiser, schedule and memory bank.
    `identity=None`: the run's configuration identity with the teacher's fingerprint."""
    o = cfg.optim
    teacher_head = None
    needs = method.needs
    reads_projection = needs.teacher and needs.teacher_head
    if reads_projection:
        if not getattr(teacher, "head_probed", True):
            raise ValueError(f"{cfg.method.method} reads the teacher's projection, but this teacher's head "
                             "was never probe-trained: load the teacher with its projection")
        teacher_head = copy.deepcopy(teacher.head).to(policy.device)
        groups.append({"params": list(teacher_head.parameters()), "lr": o.head_lr, "weight_decay": 0.0})
        schedules.append("constant")
    method.setup(dataset, student, teacher)
    policy.prepare(method)
    owned = [p for p in method.parameters() if p.requires_grad]
    if owned:  # what the method owns and trains: the student's settings unless it declares its own
        own = method.optimizer_overrides
        groups.append({"params": owned, "lr": own.get("lr", o.lr), "weight_decay": own.get("weight_decay",
                                                                                           o.weight_decay)})
        schedules.append(own.get("schedule", o.schedule))
    bank = None
    if needs.bank:
        bank = MomentumMemoryBank(len(dataset.train_labels), teacher_head[-1].out_features,
                                  dataset.train_labels, cfg.method.bank_momentum, device=policy.device)
    if cfg.compile:
        student.forward = torch.compile(student.forward, mode=cfg.compile_mode)
    fp = teacher_identity_fingerprint(teacher, reads_projection) if needs.teacher else None
    return build_run(cfg, name, identity if identity is not None else cfg.identity(fp), method, student, groups,
                     schedules, policy, kind=kind, teacher_head=teacher_head, bank=bank, teacher_fingerprint=fp)


def build_run(cfg: RunConfig, name: str, identity: dict, method: Method, model: nn.Module, groups: list[dict],
              schedules: list[str], policy: DevicePolicy, kind: str = "student", data_views: int = 2,
              teacher_head: nn.Module | None = None, bank: MomentumMemoryBank | None = None,
              teacher_fingerprint: str | None = None) -> Run:
    """Every run is made here (students, two-stage phases, the teacher's cross-entropy training, its
    cosine probe, linear and KD probes): the optimiser `cfg.optim` names over `groups`, one
    learning-rate schedule per group (`cfg.optim`'s epochs, milestones and decay), the bank's
    generator (seeded by the run's seed), and the run, which wraps its model for DDP. `data_views`:
    augmented views per image the loop draws (students 2 whatever their method, so that runs of
    one-view and two-view methods share batches in lockstep; teacher training and probes 1)."""
    o = cfg.optim
    optimizer = make_optimizer(o, groups, policy)
    scheduler = make_scheduler(optimizer, schedules, o.epochs, tuple(o.milestones), o.lr_decay)
    return Run(cfg, name, identity, method, model, teacher_head, optimizer, scheduler, policy, o, bank,
               torch.Generator().manual_seed(o.seed + 1), data_views=data_views, kind=kind,
               teacher_fingerprint=teacher_fingerprint)
