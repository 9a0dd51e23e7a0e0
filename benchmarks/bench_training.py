"""Training-speed benchmark: desupcon's pipeline against the straightforward one, in one process.

Prints, for a preset / method / device:
  (a) images/s of data + augmentation: `epoch_batches` + `TwoViewAugment` vs torchvision PIL
      transforms per image in a DataLoader (each DataLoader worker count given);
  (b) a full training step (seconds/step and images/s, median after warm-up): `Run.step`
      with one shared teacher forward (batch ready, and end to end with augmentation) vs the
      baseline step of `baseline_pipeline.py` (same models, batch size, losses, optimiser groups),
      steps of the two interleaved; peak memory of each pipeline's steps (in a fresh process);
  FLOPs per training step (torch.utils.flop_counter on meta tensors: teacher forward, student
  forward, student backward) and the implied GPU time of a 50-epoch paper run and of the whole
  SPEC section 6 plan at a stated sustained TFLOP/s, with and without lockstep teacher sharing;
  lockstep: 4 students trained together vs one after another (`train_students`), time ratio and a
  bit-exact weight check;
  (c) the analysis metrics (helpers from bench_analysis.py).

    python benchmarks/bench_training.py --preset paper --method lw-supcrd --device cpu --batch-size 32

Images/s counts source images; each training image yields two augmented views. The script sets
OMP_WAIT_POLICY=PASSIVE unless the environment sets it (`--omp-wait-policy default` leaves the
OpenMP runtime's spinning default): on a 2-core machine shared with other busy processes, spinning
threads stall torch's 2-thread parallel regions and small ops slow down 10-100x.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the training loop's progress bars would clutter the table


def _omp_wait_policy_from_argv() -> str:
    """--omp-wait-policy must act before torch (and its OpenMP runtime) is loaded."""
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--omp-wait-policy="):
            return arg.split("=", 1)[1]
        if arg == "--omp-wait-policy" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "passive"


OMP_POLICY_ARG = _omp_wait_policy_from_argv()
if OMP_POLICY_ARG in ("passive", "active"):
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_POLICY_ARG.upper())

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from desupcon import data as data_mod  # noqa: E402
from desupcon import devices, train  # noqa: E402
from desupcon.analysis import alignment_class, analyze_embeddings, uniformity  # noqa: E402
from desupcon.config import MethodConfig, preset, run_name  # noqa: E402
from desupcon.experiments import plan  # noqa: E402
from desupcon.methods import StepOutputs, build_method  # noqa: E402
from desupcon.models import Student, Teacher, build_encoder  # noqa: E402

import baseline_pipeline as base  # noqa: E402
from bench_analysis import naive_uniformity_and_alignment, pair_count  # noqa: E402

CIFAR10_NPZ = Path("/work/shared/data/cifar10")
PAPER_TRAIN_IMAGES, PAPER_TEST_IMAGES, PAPER_CLASSES = 50_000, 10_000, 100


# ----------------------------------------------------------------------------------------------
# Small utilities: timing, memory, tables
# ----------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Peak resident memory of a code region in this process (used for the analysis metrics).

    Linux: the kernel's peak RSS (VmHWM), reset through /proc/self/clear_refs on entry, minus the
    RSS on entry. Elsewhere: the rise of getrusage ru_maxrss, which only shows a region that
    beats the process's earlier peak.
    """

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM (reset on entry) minus RSS on entry"
            self.start = self._status_kb("VmRSS") * 1024
        except (OSError, TypeError):
            self.how = "getrusage ru_maxrss delta"
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        hwm = self._status_kb("VmHWM") if self.how.startswith("VmHWM") else None
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra_mb = (peak - self.start) / 2**20


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def header(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 96 - len(title)))


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def load_data(args) -> data_mod.ImageDataset:
    name = args.dataset or (f"npz:{CIFAR10_NPZ}" if (CIFAR10_NPZ / "train.npz").is_file() else "digits")
    dataset = data_mod.load_dataset(name, image_size=args.image_size)  # digits default to 32
    return data_mod.subsample(dataset, args.train_images, args.test_images, seed=0)


def make_cfg(args, dataset):
    cfg = preset(args.preset).replace(data={"dataset": dataset.name, "image_size": None})
    model = {"teacher_arch": args.teacher_arch or cfg.model.teacher_arch,
             "student_arch": args.student_arch or cfg.model.student_arch}
    return cfg.replace(model=model, method={"method": args.method, "bank_size": args.bank_size},
                       optim={"batch_size": args.batch_size}, device=args.device)


def make_teacher(arch: str, num_classes: int, device: torch.device, seed: int = 0) -> Teacher:
    """A randomly initialised teacher: timing does not depend on its weights."""
    torch.manual_seed(seed)
    return Teacher(build_encoder(arch, num_classes)).to(device).to(
        memory_format=devices.memory_format(device)).eval()


# ----------------------------------------------------------------------------------------------
# (a) data + augmentation
# ----------------------------------------------------------------------------------------------

def bench_data(args, dataset, device) -> tuple[list[list], dict]:
    bs, n_batches = args.batch_size, args.data_batches
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    gen = torch.Generator().manual_seed(0)

    def ours_batches():
        while True:
            yield from data_mod.epoch_batches(images, labels, bs, augment, gen)

    it = ours_batches()
    next(it)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    sync(device)
    ours = n_batches * bs / (time.perf_counter() - start)
    rows = [["ours: epoch_batches + TwoViewAugment (batched tensors)", f"{ours:,.0f}", "1.00x"]]
    rates = {}
    pil = base.TwoViewPILDataset(dataset.train_images, dataset.train_labels,
                                 base.baseline_transform(dataset.mean, dataset.std, dataset.image_size,
                                                         max(1, dataset.image_size // 8)))
    for workers in args.loader_workers:
        loader = base.make_loader(pil, bs, workers)

        def loader_batches():
            while True:
                yield from loader

        it = loader_batches()
        next(it)  # worker start-up and the first batch are not timed
        start = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        rates[workers] = n_batches * bs / (time.perf_counter() - start)
        del it, loader
        rows.append([f"baseline: PIL transforms in DataLoader, num_workers={workers}",
                     f"{rates[workers]:,.0f}", f"{ours / rates[workers]:.2f}x"])
    return rows, {"ours": ours, **{f"workers{w}": r for w, r in rates.items()}}


# ----------------------------------------------------------------------------------------------
# (b) training step
# ----------------------------------------------------------------------------------------------

def ours_stepper(cfg, dataset, teacher, device):
    """One step of train._train_lockstep's loop body for one student; returns (data s, step s)."""
    run = train.make_student_run(cfg, dataset, teacher, device)
    run.start_epoch()
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(cfg.optim.seed)
    fmt = devices.memory_format(device)

    def batches():
        while True:
            yield from data_mod.epoch_batches(dataset.train_images, dataset.train_labels,
                                              cfg.optim.batch_size, augment, gen)

    it = batches()

    def step() -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        indices, view1, view2, labels = next(it)
        views = torch.cat([view1, view2]).contiguous(memory_format=fmt)
        view1 = view1.contiguous(memory_format=fmt)
        sync(device)
        t1 = time.perf_counter()
        teacher_out = None
        if run.method.uses_teacher:
            with devices.autocast_for(device):
                teacher_out = teacher(views)
        run.step(indices, view1, views, labels, teacher_out)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    return step


def baseline_stepper(cfg, dataset, teacher, device, num_workers: int):
    """One step of the straightforward pipeline (PIL DataLoader + BaselineStep)."""
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


def memory_probe(cfg, dataset, device, args, pipeline: str) -> dict:
    """Peak memory of two training steps of one pipeline, in a process that ran nothing else.

    CPU: getrusage ru_maxrss after the steps minus before them (the models, data and optimiser
    already exist, so this is the step's activations, gradients, optimiser state and workspace;
    DataLoader workers are separate processes and not counted). CUDA: max_memory_allocated.
    """
    teacher = make_teacher(cfg.model.teacher_arch, dataset.num_classes, device)
    step = (ours_stepper(cfg, dataset, teacher, device) if pipeline == "ours"
            else baseline_stepper(cfg, dataset, teacher, device, args.num_workers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        peak = torch.cuda.max_memory_allocated(device)
        return {"extra_mb": (peak - before) / 2**20, "peak_mb": peak / 2**20, "how": MEMORY_HOW["cuda"]}
    with PeakRSS() as mem:  # loading the dataset peaked higher than a step: reset the peak first
        for _ in range(2):
            step()
    return {"extra_mb": mem.extra_mb, "peak_mb": mem.extra_mb + mem.start / 2**20,
            "how": f"{mem.how}, over 2 steps, each pipeline in a fresh process"}


def measure_memory(args, pipeline: str) -> dict:
    """Run `memory_probe` in a fresh Python process with the same arguments."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--memory-probe", pipeline]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"extra_mb": float("nan"), "peak_mb": float("nan"), "error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


MEMORY_HOW = {"cuda": "torch.cuda.max_memory_allocated over 2 steps, each pipeline in a fresh process"}


def bench_steps(cfg, dataset, teacher, device, args) -> dict:
    """Warm-up steps, then ours and baseline steps interleaved so that a change in machine load
    hits both alike. Returns medians per pipeline."""
    steppers = {"ours": ours_stepper(cfg, dataset, teacher, device),
                "baseline": baseline_stepper(cfg, dataset, teacher, device, args.num_workers)}
    for step in steppers.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steppers}
    for _ in range(args.steps):
        for name, step in steppers.items():
            times[name].append(step())
    out = {}
    for name, ts in times.items():
        out[name] = {"data": statistics.median(d for d, _ in ts), "step": statistics.median(s for _, s in ts),
                     "total": statistics.median(d + s for d, s in ts),
                     "all": [round(d + s, 3) for d, s in ts]}
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs (meta tensors: nothing is computed, shapes only)
# ----------------------------------------------------------------------------------------------

def _count(fn) -> tuple[int, object]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops(), out


def step_flops(teacher_arch: str, student_arch: str, method_cfg: MethodConfig, batch: int,
               image_size: int, num_classes: int, baseline: bool = False) -> dict:
    """FLOPs of one training step: teacher forward, student forward (with projection head, teacher
    head and loss), student backward. `baseline=True` counts the straightforward step instead.
    The memory bank's extra columns (K x 64 per anchor) are not included (well under 1 %)."""
    method = build_method(method_cfg)
    with torch.device("meta"):
        teacher = Teacher(build_encoder(teacher_arch, num_classes))
        student = Student(build_encoder(student_arch, num_classes))
        head = copy.deepcopy(teacher.head)
        view1 = torch.randn(batch, 3, image_size, image_size)
        views = torch.randn(2 * batch, 3, image_size, image_size)
        labels = torch.randint(0, num_classes, (batch,))
    x = views if method.views == 2 else view1
    step_labels = torch.cat([labels, labels]) if method.views == 2 else labels
    t_out = None
    teacher_flops = 0
    if method.uses_teacher:
        if baseline:
            f1, t_feat = _count(lambda: teacher.encoder.forward_features(views))
            f2, t_logits = _count(lambda: teacher.encoder(views))
            teacher_flops, t_out = f1 + f2, (t_feat, t_logits)
        else:
            teacher_flops, t_out = _count(lambda: teacher(views))

    def student_forward():
        if baseline and method.views == 2:
            feats = student.encoder.forward_features(x)
            proj = F.normalize(student.projector(feats), dim=1)
            with torch.no_grad():
                logits = student.classifier(student.encoder.forward_features(view1))
        else:
            _, proj, logits = student(x, detach_classifier=method.online_classifier)
        out = StepOutputs(step_labels, proj, logits)
        if t_out is not None:
            out.teacher_projection = F.normalize(head(t_out[0]), dim=1)
            out.teacher_logits = t_out[1]
        return sum(method.losses(out).values())

    fwd, loss = _count(student_forward)
    bwd, _ = _count(loss.backward)
    return {"teacher": teacher_flops, "student_fwd": fwd, "student_bwd": bwd,
            "total": teacher_flops + fwd + bwd}


def forward_flops(arch: str, n: int, image_size: int, num_classes: int, student: bool) -> int:
    with torch.device("meta"):
        enc = build_encoder(arch, num_classes)
        model = Student(enc) if student else enc
        x = torch.randn(n, 3, image_size, image_size)
    return _count(lambda: model(x))[0]


def teacher_ce_step_flops(arch: str, batch: int, image_size: int, num_classes: int) -> int:
    with torch.device("meta"):
        enc = build_encoder(arch, num_classes)
        x = torch.randn(batch, 3, image_size, image_size)
        y = torch.randint(0, num_classes, (batch,))
    fwd, loss = _count(lambda: F.cross_entropy(enc(x), y))
    return fwd + _count(loss.backward)[0]


def published_plan() -> tuple[int, list[MethodConfig]]:
    """The student runs of SPEC section 6 (desupcon.experiments.plan of the paper preset), each
    distinct run once, as the sweep runs them (duplicates share a run name)."""
    experiments = plan(preset("paper"), "all")
    unique: dict[str, MethodConfig] = {}
    for e in experiments:
        unique.setdefault(run_name(e.cfg), e.cfg.method)
    return len(experiments), list(unique.values())


def flops_section(args, cfg, dataset, measured: dict) -> None:
    header("FLOPs per training step (torch.utils.flop_counter.FlopCounterMode on meta tensors)")
    size = dataset.image_size
    rows = []
    per_step = {}
    for label, baseline in (("ours", False), ("baseline", True)):
        f = step_flops(cfg.model.teacher_arch, cfg.model.student_arch, cfg.method, cfg.optim.batch_size,
                       size, dataset.num_classes, baseline)
        per_step[label] = f
        sec = measured.get(label)
        rows.append([f"{label}: {cfg.model.teacher_arch} -> {cfg.model.student_arch}, batch "
                     f"{cfg.optim.batch_size}", f"{f['teacher'] / 1e9:.1f}", f"{f['student_fwd'] / 1e9:.1f}",
                     f"{f['student_bwd'] / 1e9:.1f}", f"{f['total'] / 1e9:.1f}",
                     f"{f['total'] / sec / 1e9:.1f}" if sec else "-"])
    print(table(["step (as measured above)", "teacher fwd GF", "student fwd GF", "student bwd GF",
                 "total GF", "achieved GFLOP/s"], rows))
    print(f"FLOP ratio baseline / ours: {per_step['baseline']['total'] / per_step['ours']['total']:.2f} "
          "(the baseline's second teacher forward and second student forward)")

    # -- the paper preset on a GPU ---------------------------------------------------------------
    paper = preset("paper")
    t_arch, s_arch, bs = paper.model.teacher_arch, paper.model.student_arch, paper.optim.batch_size
    epochs = paper.optim.epochs
    steps = data_mod.batches_per_epoch(PAPER_TRAIN_IMAGES, bs)
    eval_student = forward_flops(s_arch, PAPER_TEST_IMAGES, 32, PAPER_CLASSES, student=True)
    eval_teacher = forward_flops(t_arch, PAPER_TEST_IMAGES, 32, PAPER_CLASSES, student=False)

    def run_parts(m: MethodConfig) -> tuple[float, float]:
        """(teacher-forward FLOPs, everything else) of one 50-epoch student run."""
        f = step_flops(t_arch, s_arch, m, bs, 32, PAPER_CLASSES)
        return (epochs * steps * f["teacher"],
                epochs * steps * (f["student_fwd"] + f["student_bwd"]) + epochs * eval_student)

    print(f"\nGPU estimate for the paper preset: CIFAR-100 ({PAPER_TRAIN_IMAGES:,} train / "
          f"{PAPER_TEST_IMAGES:,} test, 32x32), {t_arch} -> {s_arch}, batch {bs} ({2 * bs} views), "
          f"{steps} steps/epoch, {epochs} epochs, test evaluation every epoch.")
    print("ASSUMPTION: sustained " + " / ".join(f"{t:g}" for t in args.tflops) +
          " TFLOP/s (bf16, H100-class GPU at realistic utilisation); time = FLOPs / rate. "
          "An ESTIMATE, not a measurement: data movement, kernel launches, optimiser and Python "
          "overhead are not modelled.")
    f_paper = step_flops(t_arch, s_arch, MethodConfig(method=args.method, bank_size=args.bank_size),
                         bs, 32, PAPER_CLASSES)
    f_base = step_flops(t_arch, s_arch, MethodConfig(method=args.method, bank_size=args.bank_size),
                        bs, 32, PAPER_CLASSES, baseline=True)
    rows = []
    for label, f in (("ours", f_paper), ("baseline", f_base)):
        run_flops = epochs * steps * f["total"] + epochs * eval_student
        rows.append([f"{args.method} 50-epoch run, {label}", f"{f['total'] / 1e12:.2f}",
                     f"{run_flops / 1e15:.1f}", *[fmt_time(run_flops / (t * 1e12)) for t in args.tflops]])

    # -- the whole published plan ---------------------------------------------------------------
    n_listed, runs = published_plan()
    teacher_ce = epochs * steps * teacher_ce_step_flops(t_arch, bs, 32, PAPER_CLASSES) + epochs * eval_teacher
    probe = paper.teacher.probe_epochs * steps * forward_flops(t_arch, bs, 32, PAPER_CLASSES, student=False)
    shared_teacher = 0.0
    solo_total = lock_total = teacher_ce + probe
    for m in runs:
        t_part, s_part = run_parts(m)
        solo_total += t_part + s_part
        lock_total += s_part
        shared_teacher = max(shared_teacher, t_part)  # one teacher forward per step for the group
    lock_total += shared_teacher
    n_teacher_users = sum(build_method(m).uses_teacher for m in runs)
    for label, total in ((f"plan: teacher + {len(runs)} students, one after another", solo_total),
                         (f"plan: teacher + {len(runs)} students, lockstep (teacher fwd shared)", lock_total),
                         ("plan with teacher from weights (probe only), lockstep", lock_total - teacher_ce)):
        rows.append([label, "-", f"{total / 1e15:.1f}", *[fmt_time(total / (t * 1e12)) for t in args.tflops]])
    print(table(["", "TFLOP/step", "PFLOP total", *[f"time @ {t:g} TFLOP/s" for t in args.tflops]], rows))
    print(f"plan: desupcon.experiments.plan (SPEC 6) lists {n_listed} student runs; "
          f"{n_listed - len(runs)} repeat another run (alpha 1, beta 10, tau 0.07 and no-bank LW-SupCRD "
          f"are one run; no-bank CRD is CRD), leaving {len(runs)} students ({n_teacher_users} use the "
          f"teacher) plus the teacher "
          f"(50 CE epochs = {teacher_ce / 1e15:.1f} PFLOP, projection probe {probe / 1e15:.1f} PFLOP). "
          f"Targets: one run < 5 min, the plan < 1.5 h.")


# ----------------------------------------------------------------------------------------------
# Lockstep
# ----------------------------------------------------------------------------------------------

def bench_lockstep(args, dataset, device) -> None:
    header("Lockstep: 4 students sharing each batch's teacher forward vs the same 4 one after another")
    bs, k = args.lockstep_batch, args.lockstep_steps
    ds = data_mod.subsample(dataset, bs * k, args.lockstep_test, seed=1)
    cfg = preset(args.preset).replace(
        data={"dataset": dataset.name, "image_size": None},
        model={"teacher_arch": args.lockstep_teacher, "student_arch": args.lockstep_student},
        optim={"epochs": 1, "batch_size": bs}, device=args.device)
    variants = [{"method": "lw-supcrd", "alpha": 1.0}, {"method": "lw-supcrd", "alpha": 2.0},
                {"method": "lw-supcrd", "alpha": 5.0}, {"method": "crd"}]
    cfgs = [cfg.replace(method=v) for v in variants]
    teacher = make_teacher(args.lockstep_teacher, ds.num_classes, device)

    # cost of one teacher forward vs one student step, on a throwaway run (after warm-up)
    run = train.make_student_run(cfgs[0], ds, teacher, device)
    run.start_epoch()
    augment = data_mod.TwoViewAugment.for_size(ds.mean, ds.std, ds.image_size)
    idx, v1, v2, y = next(data_mod.epoch_batches(ds.train_images, ds.train_labels, bs, augment,
                                                 torch.Generator().manual_seed(0)))
    views = torch.cat([v1, v2])
    t_times, s_times = [], []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        with devices.autocast_for(device):
            out = teacher(views)
        sync(device)
        t1 = time.perf_counter()
        run.step(idx, v1, views, y, out)
        sync(device)
        t_times.append(t1 - t0)
        s_times.append(time.perf_counter() - t1)
    t_cost, s_cost = statistics.median(t_times[1:]), statistics.median(s_times[1:])
    del run

    with tempfile.TemporaryDirectory() as tmp:
        def train_group(group, out):
            sub = [c.replace(output_dir=str(Path(tmp) / out)) for c in group]
            sync(device)
            start = time.perf_counter()
            results = train.train_students(sub, ds, teacher, device, force=True, resume=False)
            sync(device)
            return time.perf_counter() - start, results

        train_group([cfgs[0]], "warmup")  # untimed: first evaluation, checkpoint write, allocations
        # order: solo 0, solo 1, lockstep, solo 2, solo 3 (a load drift hits both sides alike)
        solo_seconds, solo_results = [], []
        for i, c in enumerate(cfgs):
            if i == 2:
                lockstep, lock_results = train_group(cfgs, "lockstep")
            seconds, res = train_group([c], f"solo{i}")
            solo_seconds.append(seconds)
            solo_results += res
        sequential = sum(solo_seconds)

        identical = True
        for a, b in zip(solo_results, lock_results):
            sa, sb = torch.load(a.checkpoint, weights_only=True), torch.load(b.checkpoint, weights_only=True)
            for part in ("student", "teacher_head"):
                for key in sa[part]:
                    identical &= torch.equal(sa[part][key], sb[part][key])
    ratio = lockstep / sequential
    print(f"setting: {args.lockstep_teacher} teacher -> 4 x {args.lockstep_student} students "
          f"(lw-supcrd alpha 1, 2, 5; crd), {ds.image_size}x{ds.image_size}, batch {bs} "
          f"({2 * bs} views), {k} steps + a {len(ds.test_labels)}-image test evaluation, through "
          "train.train_students (checkpoints written), one process")
    print(f"teacher forward {t_cost:.3f} s vs one student step {s_cost:.3f} s "
          f"(teacher / student = {t_cost / s_cost:.2f}; the issue asks for >= 1)")
    print(table(["", "seconds", "ratio"],
                [["4 runs one after another (" + " + ".join(f"{x:.1f}" for x in solo_seconds) + ")",
                  f"{sequential:.1f}", "1.00"],
                 ["4 runs in lockstep", f"{lockstep:.1f}", f"{ratio:.2f}"]]))
    ideal = (t_cost + 4 * s_cost) / (4 * (t_cost + s_cost))
    print(f"lockstep / sequential = {ratio:.2f} (target <= 0.70; from the per-step costs above the "
          f"ideal is {ideal:.2f}); final weights (student + teacher head) identical: "
          f"{'yes' if identical else 'NO'} (torch.equal on every tensor)")


# ----------------------------------------------------------------------------------------------
# (c) analysis metrics (helpers from bench_analysis.py)
# ----------------------------------------------------------------------------------------------

def bench_analysis_metrics(args) -> None:
    header(f"(c) Analysis metrics on {args.analysis_n:,} x 64 embeddings (bench_analysis helpers)")
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(args.analysis_n, 64, generator=g), dim=1)
    labels = torch.randint(0, 100, (args.analysis_n,), generator=g)
    uniformity(z[:100]), alignment_class(z[:100], labels[:100])  # warm-up
    mem = PeakRSS()
    best = math.inf
    with mem:
        for _ in range(2):
            start = time.perf_counter()
            uniformity(z), alignment_class(z, labels)
            best = min(best, time.perf_counter() - start)
    start = time.perf_counter()
    analyze_embeddings(z, labels)
    full = time.perf_counter() - start
    m = args.naive_n
    zs, ls = z[:m].double().tolist(), labels[:m].tolist()
    start = time.perf_counter()
    naive_uniformity_and_alignment(zs, ls)
    naive_small = time.perf_counter() - start
    naive = naive_small * pair_count(args.analysis_n) / pair_count(m)
    n = args.analysis_n
    print(table(["", "seconds", "embeddings/s", "speed-up"], [
        ["uniformity + alignment_class (vectorised, best of 2)", f"{best:.3f}", f"{n / best:,.0f}",
         f"{naive / best:,.0f}x"],
        ["all section-7 metrics (analyze_embeddings)", f"{full:.3f}", f"{n / full:,.0f}", "-"],
        [f"naive Python pair loop, ESTIMATED (timed on {m} points, x pair-count ratio "
         f"{pair_count(n) / pair_count(m):,.0f})", f"{naive:.1f}", f"{n / naive:,.1f}", "1x"]]))
    print(f"target: >= 200x over the naive loops; peak memory of the vectorised metrics: "
          f"{mem.extra_mb:.0f} MB ({mem.how})")


# ----------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("quick", "paper"), default="paper",
                   help="architectures and optimiser settings come from this preset")
    p.add_argument("--method", default="lw-supcrd", choices=("ce", "supcon", "crd", "lw-supcrd", "hybrid"))
    p.add_argument("--bank-size", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-arch", help="default: the preset's")
    p.add_argument("--student-arch", help="default: the preset's")
    p.add_argument("--dataset", help="default: real CIFAR-10 from /work/shared/data/cifar10, else digits")
    p.add_argument("--image-size", type=int, default=None, help="resize (digits default to 32)")
    p.add_argument("--train-images", type=int, default=2048, help="training subset used for timing")
    p.add_argument("--test-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per pipeline")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per pipeline (median)")
    p.add_argument("--num-workers", type=int, default=2, help="baseline DataLoader workers in (b)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2],
                   help="baseline DataLoader worker counts tried in (a)")
    p.add_argument("--data-batches", type=int, default=40, help="timed batches in (a)")
    p.add_argument("--tflops", type=float, nargs="+", default=[400.0, 100.0],
                   help="sustained TFLOP/s assumed for the GPU estimate")
    p.add_argument("--lockstep-teacher", default="resnet32x4")
    p.add_argument("--lockstep-student", default="resnet8x4")
    p.add_argument("--lockstep-batch", type=int, default=16)
    p.add_argument("--lockstep-steps", type=int, default=6)
    p.add_argument("--lockstep-test", type=int, default=64)
    p.add_argument("--analysis-n", type=int, default=10_000)
    p.add_argument("--naive-n", type=int, default=300)
    p.add_argument("--skip", nargs="*", default=[], choices=("data", "step", "flops", "lockstep", "analysis"))
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "default"), default="passive",
                   help="OMP_WAIT_POLICY for this process unless already set in the environment; "
                        "'default' leaves the OpenMP runtime's own (spinning) behaviour")
    p.add_argument("--memory-probe", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = devices.select_device(args.device)
    began = time.perf_counter()
    dataset = load_data(args).to(device)  # resident on the device, as train.prepare_dataset does
    cfg = make_cfg(args, dataset)
    if args.memory_probe:  # internal: one pipeline's peak memory in a fresh process
        print(json.dumps(memory_probe(cfg, dataset, device, args, args.memory_probe)))
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"desupcon training benchmark: preset {args.preset}, method {args.method}"
          f"{f' (bank {args.bank_size})' if args.bank_size else ''}, {cfg.model.teacher_arch} -> "
          f"{cfg.model.student_arch}, batch {args.batch_size} images ({2 * args.batch_size} views), "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"1-min load at start {load:.2f}")
    print(f"data: {dataset.name}, {len(dataset.train_labels):,} training images "
          f"{dataset.image_size}x{dataset.image_size} (subsample), {dataset.num_classes} classes")

    if "data" not in args.skip:
        header(f"(a) Data + augmentation, batch {args.batch_size}, two views per image")
        rows, _ = bench_data(args, dataset, device)
        print(table(["pipeline", "images/s", "ours vs this"], rows))

    measured = {}
    if "step" not in args.skip:
        header(f"(b) Training step, median of {args.steps} steps after {args.warmup} warm-up "
               "(ours and baseline steps interleaved)")
        teacher = make_teacher(cfg.model.teacher_arch, dataset.num_classes, device)
        res = bench_steps(cfg, dataset, teacher, device, args)
        ours, baseline = res["ours"], res["baseline"]
        del teacher, res
        gc.collect()
        mem = {name: measure_memory(args, name) for name in ("ours", "baseline")}
        measured = {"ours": ours["step"], "baseline": baseline["step"]}
        bs = args.batch_size
        rows = [
            ["ours: Run.step + 1 shared teacher fwd, batch ready", f"{ours['step']:.3f}",
             f"{bs / ours['step']:.1f}", f"{baseline['step'] / ours['step']:.2f}x", "-"],
            ["ours: end to end (epoch_batches + TwoViewAugment + step)", f"{ours['total']:.3f}",
             f"{bs / ours['total']:.1f}", f"{baseline['total'] / ours['total']:.2f}x",
             f"{mem['ours']['extra_mb']:.0f}"],
            ["baseline: step only (2 teacher fwd, 2 student fwd), batch ready", f"{baseline['step']:.3f}",
             f"{bs / baseline['step']:.1f}", "1.00x", "-"],
            [f"baseline: end to end (PIL DataLoader, {args.num_workers} workers + step)",
             f"{baseline['total']:.3f}", f"{bs / baseline['total']:.1f}", "1.00x",
             f"{mem['baseline']['extra_mb']:.0f}"],
        ]
        print(table(["pipeline", "s/step", "images/s", "speed-up", "peak MB"], rows))
        print(f"data wait per step: ours {ours['data'] * 1e3:.1f} ms, baseline {baseline['data'] * 1e3:.1f} ms. "
              f"Peak memory: {mem['ours'].get('how', '?')}; process peak ours "
              f"{mem['ours']['peak_mb']:.0f} MB, baseline {mem['baseline']['peak_mb']:.0f} MB.")
        for name in mem:
            if "error" in mem[name]:
                print(f"memory probe of {name} failed: {mem[name]['error']}")
        print(f"end-to-end seconds of each timed step: ours {ours['all']}, baseline {baseline['all']}")
        speedup = baseline["total"] / ours["total"]
        issue_setting = ((cfg.model.teacher_arch, cfg.model.student_arch, bs, device.type)
                         == ("resnet50", "resnet18", 32, "cpu"))
        verdict = ('MET' if speedup >= 1.4 else 'NOT MET') if issue_setting else "n/a for this setting"
        print(f"end-to-end speed-up {speedup:.2f}x (target >= 1.4x for resnet50 -> resnet18, batch 32, "
              f"2 CPU cores): {verdict}")

    if "flops" not in args.skip:
        flops_section(args, cfg, dataset, measured)
    if "lockstep" not in args.skip:
        bench_lockstep(args, dataset, device)
    if "analysis" not in args.skip:
        bench_analysis_metrics(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntotal benchmark time {time.perf_counter() - began:.0f} s; 1-min load at end {load:.2f}")


if __name__ == "__main__":
    main()
