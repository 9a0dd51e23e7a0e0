"""Profile of one `paper`-shaped training step (issue 23, "profile first"): kernel launches per
step, host (CPU) and device (GPU) time per step, images/s, peak memory and the FLOP rate achieved
against the step's FLOP count.

The step is the training loop's own (`train_step`: inputs moved by the device policy, the
teacher's forward, the student's forward, losses, backward, optimiser). Images are random 32x32
uint8 tensors (100 classes): the timing does not depend on their content. On a GPU:
  - device time per step from CUDA events around each step, host time from the wall clock until
    the step's work is queued (before synchronising);
  - kernel launches per step from torch.profiler (CUDA kernels, over `--profile-steps` steps);
  - peak memory from torch.cuda.max_memory_allocated;
  - FLOPs per step counted once by FlopCounterMode (convolutions and matrix products), TFLOP/s
    = FLOPs / device time.
On the CPU the same script runs for development: "kernels" are then the operators torch.profiler
records, device time is wall time and memory the process's peak resident size.

With `--students N` the step is a lockstep group's: N students (seeds 0..N-1) on the shared
batch and teacher forward, as the training loop's Python loop over them or, with `--fused`, as one
vmapped model (`--fused-lockstep`); images/s then counts every student's images. With
`--cuda-graphs` every measured step is a replay of the step captured as a CUDA graph
(engine/graphs.py; on the CPU its eager emulation).

    python benchmarks/bench_gpu_step.py --device cuda --batch-size 128 --steps 50
    python benchmarks/bench_gpu_step.py --device cuda --students 8 [--fused] [--cuda-graphs]
    python benchmarks/bench_gpu_step.py --device cpu --preset quick --batch-size 32 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401  (before torch: the OpenMP wait policy)
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from common import PeakRSS, banner, make_teacher, sync, table
from desupcon import data as data_mod
from desupcon.engine.build import make_student_run
from desupcon.engine.fused import FusedStudents, fusable_groups
from desupcon.engine.graphs import StepGraph
from desupcon.engine.step import train_step
from desupcon.config import preset
from desupcon.engine.devices import DevicePolicy, select_device


def synthetic_dataset(n: int, classes: int, size: int = 32) -> data_mod.ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return data_mod.ImageDataset("synthetic", images, labels, images[:256].clone(), labels[:256].clone(),
                                 [str(i) for i in range(classes)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=("paper", "paper-bank", "quick", "mdistiller"))
    p.add_argument("--method", default="lw-supcrd")
    p.add_argument("--teacher-arch", default=None, help="default: the preset's")
    p.add_argument("--student-arch", default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--students", type=int, default=1, help="students in one lockstep group")
    p.add_argument("--fused", action="store_true", help="the group's students as one vmapped model")
    p.add_argument("--cuda-graphs", action="store_true", help="the step captured once and replayed as a CUDA graph")
    args = p.parse_args()

    policy = DevicePolicy.choose(select_device(args.device), args.precision)
    policy.apply_global_settings()
    device = policy.device
    cuda = device.type == "cuda"
    n = args.batch_size * (args.steps + args.warmup + args.profile_steps + 2)
    dataset = synthetic_dataset(n, args.classes).to(device)
    base = preset(args.preset)
    cfg = base.replace(data={"dataset": "synthetic", "image_size": None},
                       model={"teacher_arch": args.teacher_arch or base.model.teacher_arch,
                              "student_arch": args.student_arch or base.model.student_arch},
                       optim={"batch_size": args.batch_size, "epochs": 1}, device=str(device))
    cfg = cfg.with_method(args.method)
    group = f", {args.students} students in lockstep" + (" (fused)" if args.fused else "") if args.students > 1 else ""
    group += ", CUDA graph replays" if args.cuda_graphs else ""
    banner(f"one {args.preset} step: {cfg.model.teacher_arch} -> {cfg.model.student_arch}, {args.method}, "
           f"batch {args.batch_size}{group}", policy)
    teacher = make_teacher(cfg.model.teacher_arch, args.classes, policy)
    runs = [make_student_run(cfg.replace(optim={"seed": k}), dataset, teacher, policy) for k in range(args.students)]
    for run in runs:
        run.start_epoch()
    fused = [FusedStudents(g) for g in fusable_groups(runs)] if args.fused else []
    if args.fused and not fused:
        raise SystemExit("--fused: these students cannot be fused (see engine/fused.fusable)")
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    batches = data_mod.epoch_batches(dataset.train_images, dataset.train_labels, args.batch_size, augment,
                                     torch.Generator().manual_seed(0), views=runs[0].data_views)

    if args.cuda_graphs:  # its 2 eager steps and the capture within the warm-up: every timed step a replay
        graph = StepGraph(runs, teacher, policy, teacher_views=2, fused=fused, warmup=2)
        args.warmup = max(args.warmup, 3)

        def step():
            graph(next(batches))
    else:
        def step():
            train_step(runs, next(batches), teacher, policy, fused=fused)

    for _ in range(args.warmup):
        step()
    sync(device)

    # FLOPs of one step (counted, not timed), on the unfused step: the same arithmetic, and
    # FlopCounterMode counts a grouped convolution's backward (vmap's form) twice over
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(runs, next(batches), teacher, policy)
    flops = counter.get_total_flops()
    sync(device)

    # kernel launches (CUDA kernels; on the CPU the operators)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(device)
    events = prof.events()
    if cuda:
        launches = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        launches = sum(1 for e in events if e.name.startswith("aten::"))
    launches_per_step = launches / args.profile_steps

    host, device_times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        for _ in range(args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            if cuda:
                end.record()
                end.synchronize()
                device_times.append(start.elapsed_time(end) / 1000)
            else:
                device_times.append(host[-1])
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else rss.extra_mb
    host_ms, device_ms = 1000 * statistics.median(host), 1000 * statistics.median(device_times)
    rows = [["kernel launches per step" if cuda else "aten operators per step (CPU, nested calls included)",
             f"{launches_per_step:.0f}"],
            ["host time per step (ms, median)", f"{host_ms:.2f}"],
            ["device time per step (ms, median)", f"{device_ms:.2f}"],
            ["images/s (device time, every student's)", f"{args.students * args.batch_size / (device_ms / 1000):.0f}"],
            ["peak memory (MB)" if cuda else "peak resident memory above the start (MB)", f"{peak_mb:.0f}"],
            ["FLOPs per step (counted)", f"{flops / 1e9:.1f} G"],
            ["achieved TFLOP/s", f"{flops / (device_ms / 1000) / 1e12:.3f}"]]
    print(table(["", "value"], rows))
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(device)}")


if __name__ == "__main__":
    main()
