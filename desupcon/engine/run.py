"""A run: everything one training run owns (model, method, optimiser, teacher head, bank,
log), its step, its epoch's close and its checkpoints."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from desupcon import data as data_mod
from desupcon.config import OptimConfig, RunConfig
from desupcon.engine import distributed as dist
from desupcon.engine.dataset import evaluate_accuracy
from desupcon.engine.devices import DevicePolicy
from desupcon.engine.finite import check_finite, grads_finite, non_finite_error, params_finite
from desupcon.engine.rng import global_rng_state, set_global_rng_state
from desupcon.memory_bank import BankStep, MomentumMemoryBank
from desupcon.methods import Method, StepOutputs
from desupcon.models import CheckpointMismatchError, ModelOutputs, NO_STAGES
from desupcon.store.schemas import in_progress_checkpoint, student_checkpoint

log = logging.getLogger("desupcon")


@dataclass
class Run:
    """Everything one run owns during training: model, optimiser, teacher head, bank, log.

    `model(x, detach_classifier=...)` returns `ModelOutputs` (features, logits, normalised
    projection, and the maps the method's needs ask for): a `Student`, or the teacher's cosine
    probe. `data_views` is how many augmented views of each image the loop draws for it (2 for
    students, 1 for teacher training and probes).
    """

    cfg: RunConfig
    name: str
    identity: dict
    method: Method
    model: nn.Module
    teacher_head: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    policy: DevicePolicy
    optim: OptimConfig
    bank: MomentumMemoryBank | None = None
    bank_generator: torch.Generator = field(default_factory=torch.Generator)
    data_views: int = 2
    kind: str = "student"
    teacher_fingerprint: str | None = None
    log: list[dict] = field(default_factory=list)
    epoch: int = 0  # epochs completed

    def __post_init__(self):
        self.scaler = self.policy.grad_scaler()
        # the bank's host work for the coming step (`stage_bank_step`), consumed by the step
        self.bank_step: BankStep | None = None
        self.tracker = None
        if (self.cfg.tensorboard or self.cfg.wandb) and dist.is_main():
            from desupcon.engine.tracking import RunTracker
            self.tracker = RunTracker(self.name, self.cfg.output_dir, self.cfg.tensorboard, self.cfg.wandb,
                                      self.cfg.to_dict())
        self.forward_model = dist.wrap_model(self.model, self.policy, self.method, self.cfg.sync_batchnorm)

    @property
    def student(self) -> nn.Module:
        """The model a student run trains (its `Student`)."""
        return self.model

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m in (self.model, self.teacher_head, self.method) if m is not None]

    # Per-epoch accumulators, kept on the device and updated in place (no host sync inside the
    # step, and the same tensors at every step, so a CUDA graph of the step keeps them: graphs.py).
    def start_epoch(self) -> None:
        for module in self.modules:
            module.train()
        device = self.policy.device
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._total = torch.zeros((), device=device)
        self._correct = torch.zeros((), dtype=torch.long, device=device)
        self._seen = torch.zeros((), dtype=torch.long, device=device)
        self._steps = 0  # steps taken, on the host (the failure-injecting tests read it)
        self._step_number = torch.zeros((), dtype=torch.long, device=device)  # the same, on the device
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)  # step, 0 = none
        self._bad_loss = torch.zeros((), dtype=torch.bool, device=device)  # the loss itself was bad
        self._bad_value = torch.zeros((), device=device)
        self._started = time.perf_counter()

    def step(self, indices: torch.Tensor, view1: torch.Tensor, views: torch.Tensor | None,
             labels: torch.Tensor, teacher_out: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """One training step: forward, losses, backward, optimiser (`train_step` splits these
        phases when students are fused)."""
        student_out = self.forward(view1, views)
        outputs, losses, total = self.losses_of(student_out, indices, labels, teacher_out)
        self.zero_grad()
        self.scaler.scale(total).backward()
        self.finish_step(outputs, losses, total, labels, student_out.logits)

    def stage_bank_step(self, indices: torch.Tensor) -> BankStep:
        """The bank's host work for the step on the batch `indices` (all processes' under torchrun):
        the draw from the run's bank generator and the update's grouping, so that the step itself
        only reads and writes the bank on the device. The step does it itself before its losses;
        a CUDA graph's caller does it before each replay (graphs.py), with the same draws."""
        self.bank_step = self.bank.stage_step(self.cfg.method.bank_size, indices, 2, self.bank_generator,
                                              written_only=self.cfg.method.bank_mode == "class-aware")
        return self.bank_step

    def model_kwargs(self) -> dict:
        """The keywords of this run's model call: the maps its method reads, only when it reads any."""
        needs = self.method.needs
        return {"detach_classifier": needs.online_classifier,
                **({"needs": needs.student_stages} if needs.student_stages != NO_STAGES else {})}

    def model_input(self, view1: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        return views if self.method.needs.views == 2 else view1

    def forward(self, view1: torch.Tensor, views: torch.Tensor | None) -> ModelOutputs:
        with self.policy.autocast():
            return self.forward_model(self.model_input(view1, views), **self.model_kwargs())

    def losses_of(self, student_out: ModelOutputs, indices: torch.Tensor, labels: torch.Tensor,
                  teacher_out: ModelOutputs | None
                  ) -> tuple[StepOutputs, dict[str, torch.Tensor], torch.Tensor]:
        """The method's losses (float32) on the model's outputs: (outputs, losses, total)."""
        policy, method = self.policy, self.method
        needs = method.needs
        batch = labels.shape[0]
        two_views = needs.views == 2
        s = student_out
        step_labels = torch.cat([labels, labels]) if two_views else labels
        outputs = StepOutputs(step_labels, s.projection.float(), s.logits.float(), epoch=self.epoch + 1,
                              indices=indices, classifier_labels=labels, student_features=s.features.float(),
                              student_feature_map=s.final_map.float() if s.final_map is not None else None,
                              student_stages=s.stages)
        if needs.teacher:
            rows = slice(None) if two_views else slice(0, batch)  # the teacher saw both views
            t_features, t_logits = teacher_out.features[rows], teacher_out.logits[rows]
            if self.teacher_head is not None:
                with policy.autocast():
                    t_proj = F.normalize(self.teacher_head(t_features), dim=1)
                outputs.teacher_projection = t_proj.float()
            outputs.teacher_logits = t_logits.float()
            outputs.view1_teacher_logits = outputs.teacher_logits[:batch]
            outputs.teacher_features = t_features.float()
            if needs.teacher_stages.final_map:
                outputs.teacher_feature_map = teacher_out.final_map[rows].float()
            if teacher_out.stages is not None and (needs.teacher_stages.stages or needs.teacher_stages.preact):
                outputs.teacher_stages = teacher_out.stages.rows(rows)
        outputs = dist.gather_step_outputs(outputs, needs)
        if self.bank is not None:
            if self.bank_step is None:  # staged here, unless the step's caller staged it (graphs.py)
                self.stage_bank_step(outputs.indices)
            outputs.bank_embeddings, outputs.bank_labels = self.bank.gather(self.bank_step.chosen)
        with policy.full_precision():
            losses = method.losses(outputs)
        return outputs, losses, sum(losses.values())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finish_step(self, outputs: StepOutputs, losses: dict[str, torch.Tensor], total: torch.Tensor,
                    labels: torch.Tensor, logits: torch.Tensor) -> None:
        """After the backward: gradients averaged over processes, clipped and checked, the
        optimiser's step, the bank's update and the epoch's sums (`logits`: this process's model
        logits, the first view's rows counted for the training accuracy)."""
        batch = labels.shape[0]
        self._steps += 1
        self._step_number += 1
        dist.average_gradients([m for m in self.modules if m is not self.model])  # DDP does the model's
        self.scaler.unscale_(self.optimizer)
        if self.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for m in self.modules for p in m.parameters()],
                                           self.optim.grad_clip)
        # One finiteness path on every device: remember the first bad step on the device; the
        # epoch end reports it. With fp16 the scaler skips steps whose gradients overflow.
        loss_finite = torch.isfinite(total.detach())
        finite = loss_finite if self.scaler.is_enabled() else loss_finite & grads_finite(self.optimizer)
        first = ~finite & (self._first_bad == 0)
        self._first_bad.copy_(torch.where(first, self._step_number, self._first_bad))
        self._bad_loss.copy_(torch.where(first, ~loss_finite, self._bad_loss))
        self._bad_value.copy_(torch.where(first, total.detach().float(), self._bad_value))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.bank is not None:
            staged, self.bank_step = self.bank_step, None
            self.bank.write(staged.slots, staged.inverse, staged.counts, outputs.teacher_projection.detach())
        self.method.after_step(outputs)
        for key, value in losses.items():
            if key not in self._loss_sums:
                self._loss_sums[key] = torch.zeros((), device=value.device)
            self._loss_sums[key] += value.detach() * batch
        self._total += total.detach() * batch
        self._correct += (logits[:batch].argmax(1) == labels).sum()
        self._seen += batch

    def finish_epoch(self, dataset: data_mod.ImageDataset, seconds: float | None = None,
                     group: tuple[float, int] | None = None) -> dict:
        """Close the epoch (raising NonFiniteLossError before anything is recorded if it went bad)."""
        epoch = self.epoch + 1
        totals = dist.sum_over_ranks([self._total, self._correct.double(), self._seen.double(),
                                      *self._loss_sums.values()])
        total, correct, seen, *loss_sums = totals
        first_bad = int(dist.max_over_ranks(self._first_bad))
        if first_bad:
            what = f"loss ({float(self._bad_value)})" if bool(self._bad_loss) else "gradients"
            raise non_finite_error(self.name, what, epoch, first_bad)
        check_finite(total, self.name, epoch, self._steps)
        if not params_finite(self.modules):
            raise non_finite_error(self.name, "weights", epoch, self._steps)
        self.epoch = epoch
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for module in self.modules:
            module.eval()
        test_acc = evaluate_accuracy(lambda x: self.model(x).logits, dataset.test_images,
                                     dataset.test_labels, dataset, self.policy, shared=True)
        seen = seen.item()
        entry = {"epoch": self.epoch, "loss": total.item() / seen,
                 "losses": {k: v.item() / seen for k, v in zip(self._loss_sums, loss_sums)},
                 "train_acc": 100.0 * correct.item() / seen, "test_acc": test_acc, "lr": lr,
                 "seconds": seconds if seconds is not None else time.perf_counter() - self._started}
        if group is not None:  # lockstep: `seconds` is an equal share of the group's wall time
            entry["group_seconds"], entry["group_size"] = group
        self.log.append(entry)
        return entry

    # -- checkpoints ----------------------------------------------------------------------
    def training_state(self, data_generator: torch.Generator) -> dict:
        """Everything needed to continue bit-identically from the end of `self.epoch`."""
        return in_progress_checkpoint(
            self.name, self.identity, self.cfg.to_dict(), self.epoch, self.log, model=self.model.state_dict(),
            teacher_head=self.teacher_head.state_dict() if self.teacher_head is not None else None,
            method_state=on_cpu(self.method.state_dict()), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            bank=self.bank.state_dict() if self.bank is not None else None,
            rng={"data": data_generator.get_state(), "bank": self.bank_generator.get_state(), **global_rng_state()})

    def load_training_state(self, state: dict, data_generator: torch.Generator) -> None:
        self.epoch = state["epoch"]
        self.log = list(state["log"])
        self.model.load_state_dict(state["model"])
        if self.teacher_head is not None:
            self.teacher_head.load_state_dict(state["teacher_head"])
        try:
            self.method.load_state_dict(state.get("method_state") or {})
        except RuntimeError as exc:
            raise CheckpointMismatchError(
                f"{self.name}: the saved state of method {self.method.name!r} does not fit this version's "
                f"({str(exc).splitlines()[0][:160]}); rerun with --force to start the run again") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        data_generator.set_state(state["rng"]["data"])
        self.bank_generator.set_state(state["rng"]["bank"])
        set_global_rng_state(state["rng"])

    def final_checkpoint(self, metrics: dict) -> dict:
        """A student's final checkpoint (the teacher writes its own format from `model`); its metrics
        say whether the run read the teacher's projection head (a trainable copy of it)."""
        metrics = {**metrics, "teacher_projection_used": self.teacher_head is not None}
        return student_checkpoint(self.name, self.identity, self.cfg.to_dict(), self.model, metrics, self.log,
                                  self.teacher_fingerprint, self.teacher_head, on_cpu(self.method.state_dict()))


def on_cpu(state: dict) -> dict:
    """A state dict with every tensor (nested ones included) detached on the CPU."""
    return tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, dict(state))


@dataclass
class RunResult:
    name: str
    config: RunConfig
    checkpoint: Path
    metrics: dict
    log: list[dict]
    cached: bool
    analysis: dict | None = None  # section 7 metrics once analysed
    source: str = "trained"  # or "published checkpoint"


def final_metrics(entries: list[dict], epochs: int) -> dict:
    """Last-epoch accuracies (the headline) and, separately, the best epoch by test accuracy."""
    last = entries[-1]
    best = max(entries, key=lambda e: e["test_acc"])
    return {"test_acc": last["test_acc"], "train_acc": last["train_acc"],
            "train_test_gap": last["train_acc"] - last["test_acc"],
            "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
            "seconds": sum(e["seconds"] for e in entries),
            # trained in lockstep: `seconds` is this run's equal share of the group's time
            "seconds_shared": any("group_seconds" in e for e in entries), "epochs": epochs}
