"""The training step replayed as a CUDA graph (`--cuda-graphs`): one capture per epoch, then one
graph launch per batch instead of hundreds of kernel launches from Python.

Within an epoch of a lockstep group, `StepGraph` steps the first `warmup` full batches eagerly
(on a side stream: lazy allocations such as cuDNN workspaces and optimiser state are made outside
the capture), captures the group's whole `train_step` (teacher forward, student forwards, losses,
backward, clipping, the finiteness bookkeeping, every optimiser step, the epoch's sums) on the next
full batch copied into static input buffers, and from then on copies each full batch into those
buffers and replays the graph. A last partial batch steps eagerly (its shape differs). The graph
is captured anew each epoch, because the epoch number (warm-ups) and the learning rates (per-epoch
schedules) enter the step as Python numbers, constant within an epoch.

What makes the step capturable is kept so on every device: no host synchronisation, every
accumulator the epoch's end reads updated in place, the step counter a device tensor, autocast
without its weight-cast cache, Adam's `capturable` flag set for the epoch, and a memory bank's
host work (its draw from the CPU generator, the grouping of its update) done before each step
and handed to the step as device tensors (`Run.stage_bank_step`: the same draws as eager steps);
a step whose bank draws fewer slots than its size (while few slots are written) steps eagerly.
The CPU has no graphs: `StepGraph` there (or with `emulate=True`) runs the same schedule of eager
steps, capture and replays, each replay executed eagerly, and checks what a real replay needs:
after every replay no Python state of a run or its method has changed and every tensor the
epoch's end or a checkpoint reads is still the same tensor (a graph would keep writing the old one);
each replay sees the host step count of the capture (the value a graph would have baked in), so a
result that depended on it would differ from the eager step's.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from desupcon.engine import distributed as dist
from desupcon.engine.step import train_step
from desupcon.memory_bank import BankStep

CAPTURABLE_WARNING = "This instance was constructed with capturable=True"


class GraphCaptureError(RuntimeError):
    """The step cannot be replayed as a CUDA graph; the message says what and how to run instead."""


def capture_blocker(runs: list, policy) -> str | None:
    """Why this lockstep group's step cannot be captured as a CUDA graph, or None if it can."""
    if policy.device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {policy.device})"
    if dist.world_size() > 1:
        return "several processes (DDP's gradient all-reduce is not captured)"
    if policy.precision == "fp16":
        return "fp16's loss scaler checks for overflow on the host every step (bf16 or fp32 can be captured)"
    for run in runs:
        if run.cfg.compile:
            return f"{run.name} is compiled (--compile)"
        if not run.method.needs.graph_capturable:
            return f"{run.name}: method {run.method.name} does host work in its step"
    return None


# set by the StepGraph around every step: the host step count, the bank's staged work
_MANAGED = ("_steps", "bank_step")


def _host_state(runs: list) -> dict:
    """What a replay must leave unchanged, by name: each run's and method's plain Python values,
    and the identity of every tensor the epoch's end, a checkpoint or the next step reads."""
    state = {}
    for k, run in enumerate(runs):
        for owner, where in ((run, "run"), (run.method, "method")):
            for key, value in vars(owner).items():
                if isinstance(value, (bool, int, float, str, type(None))) and key not in _MANAGED:
                    state[(k, where, key)] = value
                elif isinstance(value, torch.Tensor):
                    state[(k, where, key)] = id(value)
        state.update({(k, "loss sum", key): id(value) for key, value in run._loss_sums.items()})
        state.update({(k, "optimiser state", f"{id(p)}.{name}"): id(t) for p, st in run.optimizer.state.items()
                      for name, t in st.items() if isinstance(t, torch.Tensor)})
        state.update({(k, "lr", str(g)): group["lr"] for g, group in enumerate(run.optimizer.param_groups)})
    return state


class StepGraph:
    """One epoch of a lockstep group's training steps, replayed as a CUDA graph after `warmup`
    eager steps. Call it with each batch of `data.epoch_batches`; `release()` at the epoch's end."""

    def __init__(self, runs: list, teacher, policy, teacher_views: int, fused=(), warmup: int = 2,
                 emulate: bool | None = None):
        if warmup < 1:  # the optimiser's state and the epoch's sums must exist before the capture
            raise ValueError(f"StepGraph: warmup must be at least 1 eager step, got {warmup}")
        emulate = policy.device.type != "cuda" if emulate is None else emulate
        if not emulate:
            reason = capture_blocker(runs, policy)
            if reason is not None:
                raise GraphCaptureError(f"--cuda-graphs: cannot capture the step: {reason}")
        self.runs, self.teacher, self.policy = list(runs), teacher, policy
        self.teacher_views, self.fused = teacher_views, list(fused)
        self.warmup, self.emulate = warmup, emulate
        self.eager_steps = 0  # full batches stepped eagerly so far this epoch
        self.full_size: int | None = None  # the epoch's first batch is a full one
        self.replays = 0
        self.graph = None
        self.static: tuple | None = None
        self.static_banks: dict[int, BankStep] = {}  # id(run) -> its bank's staged step, static
        self._host_before: dict | None = None
        self._captured_steps: list[int] = []
        self._capturable_before = [[g.get("capturable") for g in r.optimizer.param_groups] for r in self.runs]
        if not emulate:
            for run in self.runs:  # Adam keeps its step count on the device and skips host checks
                for group in run.optimizer.param_groups:
                    if "capturable" in group:
                        group["capturable"] = True
        self._side = torch.cuda.Stream() if not emulate else None

    def _device_step(self, batch: tuple) -> None:
        train_step(self.runs, batch, self.teacher, self.policy, self.teacher_views, self.fused)

    def _eager(self, batch: tuple) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
            if self._side is None:
                self._device_step(batch)
                return
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                self._device_step(batch)
            torch.cuda.current_stream().wait_stream(self._side)

    def __call__(self, batch: tuple) -> None:
        size = batch[3].shape[0]
        self.full_size = self.full_size or size
        # the banks' host work first (their draws, as the eager step would make them), on the host
        staged = {id(run): run.stage_bank_step(batch[0]) for run in self.runs if run.bank is not None}
        full = size == self.full_size and all(  # a bank draws fewer slots while few are eligible
            staged[id(run)].chosen.shape[0] == run.cfg.method.bank_size for run in self.runs if id(run) in staged)
        if not full or (self.graph is None and self.eager_steps < self.warmup):
            self._eager(batch)
            self.eager_steps += full
            return
        if self.graph is None:
            self._capture(batch, staged)
            return
        for static, value in zip(self.static, batch):
            if static is not None:
                static.copy_(value)
        for run in self.runs:
            if id(run) in staged:
                for target, value in zip(self.static_banks[id(run)].tensors(), staged[id(run)].tensors()):
                    target.copy_(value)
                run.bank_step = self.static_banks[id(run)]
        self._replay()

    def _capture(self, batch: tuple, staged: dict) -> None:
        """Static copies of `batch` (and of the banks' staged work), the step captured on them,
        and this batch's step executed."""
        self.static = tuple(None if t is None else t.clone() for t in batch)
        self.static_banks = {key: BankStep(*(t.clone() for t in step.tensors())) for key, step in staged.items()}
        for run in self.runs:
            if id(run) in staged:
                run.bank_step = self.static_banks[id(run)]
        if self.emulate:  # the capture's Python runs once, as on a GPU; here its kernels run too
            self._host_before = _host_state(self.runs)
            self._captured_steps = [run._steps for run in self.runs]
            self.graph = "emulated"
            self._replay()  # checked like a replay: a capture must not create state either
            return
        for run in self.runs:
            run.zero_grad()  # the gradients live in the graph's memory from now on
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._device_step(self.static)
        except RuntimeError as exc:
            raise GraphCaptureError(f"--cuda-graphs: capturing the step of {', '.join(r.name for r in self.runs)} "
                                    f"failed ({exc}); run without --cuda-graphs, and report it") from exc
        self.graph = graph
        for run in self.runs:  # the capture ran the Python of one step, not its kernels
            run._steps -= 1
        self._replay()

    def _replay(self) -> None:
        if self.emulate:
            steps = [run._steps for run in self.runs]
            # every replay sees the host step count of the capture, as a graph would have baked it
            for run, count in zip(self.runs, self._captured_steps):
                run._steps = count
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
                self._device_step(self.static)
            for run, count in zip(self.runs, steps):
                run._steps = count
            after, before = _host_state(self.runs), self._host_before
            changed = sorted({key[2] if key[1] in ("run", "method") else key[1]
                              for key in after.keys() | before.keys() if after.get(key) != before.get(key)})
            if changed:
                raise GraphCaptureError("the step is not capturable: a replay would not update "
                                        f"{', '.join(changed)} (keep step state in device tensors, in place)")
        else:
            self.graph.replay()
        for run in self.runs:
            run._steps += 1
        self.replays += 1

    def release(self) -> None:
        """Free the graph and its memory (the gradients it owns) and restore Adam's flags."""
        if self.graph is not None and not self.emulate:
            torch.cuda.current_stream().synchronize()
            for run in self.runs:
                run.zero_grad()
        self.graph, self.static, self.static_banks, self._host_before = None, None, {}, None
        for run in self.runs:
            run.bank_step = None
        for run, flags in zip(self.runs, self._capturable_before):
            for group, flag in zip(run.optimizer.param_groups, flags):
                if flag is not None:
                    group["capturable"] = flag


@contextlib.contextmanager
def epoch_step(runs: list, teacher, policy, teacher_views: int, fused=(), graphs: bool = False):
    """The callable that trains `runs` on one batch this epoch: the graphed step (`graphs`) or
    `train_step` itself; the graph is released when the epoch ends or fails."""
    if not graphs:
        yield lambda batch: train_step(runs, batch, teacher, policy, teacher_views, fused)
        return
    step = StepGraph(runs, teacher, policy, teacher_views, fused)
    try:
        yield step
    finally:
        step.release()
