"""Every method's training step against KD's on one pair and batch: milliseconds per step (median)
and the peak memory the step adds, each method in a fresh process, all in one run.

    python benchmarks/bench_methods.py                       # the quick preset's pair on the digits, CPU
    python benchmarks/bench_methods.py --device cuda --teacher-arch resnet32x4 --student-arch resnet8x4

The teacher is randomly initialised (timing does not depend on its weights) and its projection head
counts as probed. Memory: on CUDA the allocator's peak over the timed steps above what was allocated
before them; on the CPU (Linux) the process's peak resident memory over the timed steps, started
afresh before them, above its resident memory then.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def status_kib(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux: VmRSS now, VmHWM its peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_resident() -> bool:
    """Start the process's peak resident memory afresh (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(args) -> dict:
    """One method's step in this process: {"ms": median ms per step, "mib": peak memory added}."""
    sys.path.insert(0, str(HERE.parent))
    from desupcon import data
    from desupcon.config import preset
    from desupcon.engine.build import make_student_run
    from desupcon.engine.devices import as_policy
    from desupcon.engine.step import train_step
    from desupcon.models import Teacher, build_encoder
    torch.set_num_threads(args.threads)
    policy = as_policy(args.device)
    cfg = preset("quick").replace(device=args.device, optim={"batch_size": args.batch_size},
                                  model={"teacher_arch": args.teacher_arch, "student_arch": args.student_arch})
    ds = data.load_dataset("digits", image_size=32)
    torch.manual_seed(0)
    teacher = policy.prepare(Teacher(build_encoder(cfg.model.teacher_arch, ds.num_classes))).eval()
    run = make_student_run(cfg.with_method(args.measure), ds, teacher, policy)
    run.start_epoch()
    aug = data.TwoViewAugment(ds.mean, ds.std)
    batch = next(data.epoch_batches(ds.train_images, ds.train_labels, args.batch_size, aug,
                                    torch.Generator().manual_seed(0)))
    for _ in range(args.warmup):
        train_step([run], batch, teacher, policy)
    cuda = policy.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        fresh_peak = reset_peak_resident()
        before = status_kib("VmRSS")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step([run], batch, teacher, policy)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        added = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:  # the peak resident memory over the timed steps above the memory before them (Linux)
        peak = status_kib("VmHWM") if fresh_peak else None
        added = (peak - before) / 1024 if peak is not None and before is not None else float("nan")
    return {"ms": 1000 * statistics.median(times), "mib": added}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: every member of the logit and feature "
                                                              "comparisons")
    p.add_argument("--teacher-arch", default="resnet14")
    p.add_argument("--student-arch", default="resnet8")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # (the child process: one method)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    sys.path.insert(0, str(HERE.parent))
    from desupcon.methods import comparison_members
    methods = args.methods or list(dict.fromkeys([*comparison_members("logit"), *comparison_members("feature")]))
    if "kd" not in methods:
        methods = ["kd", *methods]
    print(f"{args.teacher_arch} -> {args.student_arch}, batch {args.batch_size}, {args.device}, "
          f"{args.threads} thread(s), median of {args.steps} steps after {args.warmup}, torch {torch.__version__}")
    results = {}
    for method in methods:
        child = [sys.executable, __file__, "--measure", method, *sys.argv[1:]]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            results[method] = None
            print(f"{method}: failed ({done.stderr.strip().splitlines()[-1][:160] if done.stderr.strip() else '?'})")
            continue
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    kd = results["kd"]
    print("| method | ms per step | x KD | peak memory added (MiB) | x KD |")
    print("|---|---|---|---|---|")
    for method, r in results.items():
        if r is None:
            continue
        ratio_mem = r["mib"] / kd["mib"] if kd["mib"] > 0 else float("nan")
        print(f"| {method} | {r['ms']:.1f} | {r['ms'] / kd['ms']:.2f} | {r['mib']:.1f} | {ratio_mem:.2f} |")


if __name__ == "__main__":
    main()
