"""One full training step: desupcon's against the straightforward pipeline, in one process.

Prints seconds/step and images/s (median of `--steps` after `--warmup`, the two pipelines' steps
interleaved so that a change in machine load hits both alike) of:
  - ours: `Run.step` with one shared teacher forward, the batch ready, and end to end with
    `epoch_batches` + `TwoViewAugment`;
  - the baseline of `baseline_pipeline.py`: PIL transforms in a DataLoader, a teacher forward for
    features and another for logits, a student forward for the projection and another for the
    classifier (same models, batch size, losses and optimiser groups);
and the peak extra memory of two steps of each pipeline, each measured in a fresh process.
The teacher is randomly initialised: timing does not depend on its weights.

    python benchmarks/bench_step.py --preset paper --method lw-supcrd --batch-size 32  # ResNet-50 -> 18
    python benchmarks/bench_step.py --preset quick                                       # small ResNets
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
import torch

import baseline_pipeline as base
from common import PeakRSS, banner, footer, header, load_data, make_cfg, make_teacher, setup, sync, table
from desupcon import data as data_mod
from desupcon.engine.build import make_student_run
from desupcon.engine.step import train_step
from desupcon.models import Student, build_encoder


def ours_stepper(cfg, dataset, teacher, policy):
    """One step of the training loop's body for one student; returns (data s, step s)."""
    device = policy.device
    run = make_student_run(cfg, dataset, teacher, policy)
    run.start_epoch()
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(cfg.optim.seed)

    def batches():
        while True:
            yield from data_mod.epoch_batches(dataset.train_images, dataset.train_labels,
                                              cfg.optim.batch_size, augment, gen)

    it = batches()

    def step() -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        batch = next(it)
        sync(device)
        t1 = time.perf_counter()
        train_step([run], batch, teacher, policy)  # the loop's own step (inputs moved there)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    return step


def baseline_stepper(cfg, dataset, teacher, policy, num_workers: int):
    """One step of the straightforward pipeline (PIL DataLoader + BaselineStep)."""
    device = policy.device
    torch.manual_seed(cfg.optim.seed)  # the same student initialisation as make_student_run
    student = Student(build_encoder(cfg.model.student_arch, dataset.num_classes))
    trainer = base.BaselineStep(cfg, teacher, student, len(dataset.train_labels),
                                dataset.train_labels, device)
    pil = base.TwoViewPILDataset(dataset.train_images, dataset.train_labels,
                                 base.baseline_transform(dataset.mean, dataset.std, dataset.image_size,
                                                         max(1, dataset.image_size // 8)))
    loader = base.make_loader(pil, cfg.optim.batch_size, num_workers, cfg.optim.seed,
                              pin_memory=device.type == "cuda")

    def batches():
        while True:
            yield from loader

    it = batches()

    def step() -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        view1, view2, labels, indices = next(it)
        t1 = time.perf_counter()
        trainer.step(view1, view2, labels, indices)  # ends with loss.item(): synchronised
        return t1 - t0, time.perf_counter() - t1

    return step


def memory_probe(cfg, dataset, policy, args, pipeline: str) -> dict:
    """Peak memory of two training steps of one pipeline, in a process that ran nothing else.

    CPU: peak RSS over the steps minus the RSS before them (the models, data and optimiser already
    exist, so this is the step's activations, gradients, optimiser state and workspace; DataLoader
    workers are separate processes and not counted). CUDA: max_memory_allocated.
    """
    device = policy.device
    teacher = make_teacher(cfg.model.teacher_arch, dataset.num_classes, policy)
    step = (ours_stepper(cfg, dataset, teacher, policy) if pipeline == "ours"
            else baseline_stepper(cfg, dataset, teacher, policy, args.num_workers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        peak = torch.cuda.max_memory_allocated(device)
        return {"extra_mb": (peak - before) / 2**20, "peak_mb": peak / 2**20,
                "how": "torch.cuda.max_memory_allocated over 2 steps, each pipeline in a fresh process"}
    with PeakRSS() as mem:  # loading the dataset peaked higher than a step: reset the peak first
        for _ in range(2):
            step()
    return {"extra_mb": mem.extra_mb, "peak_mb": mem.extra_mb + mem.start / 2**20,
            "how": f"{mem.how}, over 2 steps, each pipeline in a fresh process"}


def measure_memory(pipeline: str) -> dict:
    """`memory_probe` in a fresh Python process with this process's arguments."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--memory-probe", pipeline]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"extra_mb": float("nan"), "peak_mb": float("nan"), "error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_steps(cfg, dataset, teacher, policy, args) -> dict:
    """Warm-up steps, then ours and baseline steps interleaved; medians per pipeline."""
    steppers = {"ours": ours_stepper(cfg, dataset, teacher, policy),
                "baseline": baseline_stepper(cfg, dataset, teacher, policy, args.num_workers)}
    for step in steppers.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steppers}
    for _ in range(args.steps):
        for name, step in steppers.items():
            times[name].append(step())
    return {name: {"data": statistics.median(d for d, _ in ts), "step": statistics.median(s for _, s in ts),
                   "total": statistics.median(d + s for d, s in ts), "all": [round(d + s, 3) for d, s in ts]}
            for name, ts in times.items()}


def main() -> None:
    p = common.parser(__doc__)
    common.add_run_options(p)
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per pipeline")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per pipeline (median)")
    p.add_argument("--num-workers", type=int, default=2, help="baseline DataLoader workers")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--memory-probe", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = p.parse_args()
    policy = setup(args)
    began = time.perf_counter()
    dataset = load_data(args).to(policy.device)  # resident on the device, as the training loop has it
    cfg = make_cfg(args, dataset)
    if args.memory_probe:  # internal: one pipeline's peak memory in a fresh process
        print(json.dumps(memory_probe(cfg, dataset, policy, args, args.memory_probe)))
        return
    banner(f"desupcon training-step benchmark: preset {args.preset}, method {args.method}"
           f"{f' (bank {args.bank_size})' if args.bank_size else ''}, {cfg.model.teacher_arch} -> "
           f"{cfg.model.student_arch}, batch {args.batch_size} images ({2 * args.batch_size} views)",
           policy, dataset)
    header(f"Training step, median of {args.steps} steps after {args.warmup} warm-up "
           "(ours and baseline steps interleaved)")
    teacher = make_teacher(cfg.model.teacher_arch, dataset.num_classes, policy)
    res = bench_steps(cfg, dataset, teacher, policy, args)
    ours, baseline = res["ours"], res["baseline"]
    del teacher
    nan = {"extra_mb": float("nan"), "peak_mb": float("nan"), "how": "not measured (--no-memory)"}
    mem = {name: nan if args.no_memory else measure_memory(name) for name in ("ours", "baseline")}
    bs = args.batch_size
    print(table(["pipeline", "s/step", "images/s", "speed-up", "peak MB"], [
        ["ours: Run.step + 1 shared teacher fwd, batch ready", f"{ours['step']:.3f}",
         f"{bs / ours['step']:.1f}", f"{baseline['step'] / ours['step']:.2f}x", "-"],
        ["ours: end to end (epoch_batches + TwoViewAugment + step)", f"{ours['total']:.3f}",
         f"{bs / ours['total']:.1f}", f"{baseline['total'] / ours['total']:.2f}x",
         f"{mem['ours']['extra_mb']:.0f}"],
        ["baseline: step only (2 teacher fwd, 2 student fwd), batch ready", f"{baseline['step']:.3f}",
         f"{bs / baseline['step']:.1f}", "1.00x", "-"],
        [f"baseline: end to end (PIL DataLoader, {args.num_workers} workers + step)",
         f"{baseline['total']:.3f}", f"{bs / baseline['total']:.1f}", "1.00x",
         f"{mem['baseline']['extra_mb']:.0f}"]]))
    print(f"data wait per step: ours {ours['data'] * 1e3:.1f} ms, baseline {baseline['data'] * 1e3:.1f} ms. "
          f"Peak memory: {mem['ours'].get('how', '?')}; process peak ours {mem['ours']['peak_mb']:.0f} MB, "
          f"baseline {mem['baseline']['peak_mb']:.0f} MB.")
    for name in mem:
        if "error" in mem[name]:
            print(f"memory probe of {name} failed: {mem[name]['error']}")
    print(f"end-to-end seconds of each timed step: ours {ours['all']}, baseline {baseline['all']}")
    print(f"end-to-end speed-up {baseline['total'] / ours['total']:.2f}x")
    footer(began)


if __name__ == "__main__":
    main()
