"""FLOPs of a training step, counted (not timed): desupcon's step against the straightforward one.

Counts with `torch.utils.flop_counter.FlopCounterMode` on meta tensors (nothing is computed;
convolutions and matrix products are counted, elementwise ops and the optimiser are not) and prints:
  - per training step of the chosen setting, ours vs the baseline of `baseline_pipeline.py`:
    teacher forward, student forward (projection head, teacher head and loss), student backward,
    and the ratio (the baseline's second teacher forward and second student forward);
  - the FLOPs of one 50-epoch run of the `paper` preset (CIFAR-100, 50,000 images, test evaluation
    every epoch) and of the whole published plan, one run after another and in lockstep (one
    teacher forward per step for all students).
No time is derived from these counts: the measured times are those of bench_step.py and
bench_lockstep.py.

    python benchmarks/bench_flops.py --preset paper --method lw-supcrd --batch-size 32
"""

from __future__ import annotations

import argparse
import copy
import time

import common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import header, table
from desupcon import data as data_mod
from desupcon.config import MethodConfig, preset, run_name
from desupcon.plan import plan
from desupcon.methods import StepOutputs, build_method
from desupcon.models import Student, Teacher, build_encoder

PAPER_TRAIN_IMAGES, PAPER_TEST_IMAGES, PAPER_CLASSES = 50_000, 10_000, 100


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
    encoder = teacher.encoder
    x = views if method.needs.views == 2 else view1
    step_labels = torch.cat([labels, labels]) if method.needs.views == 2 else labels
    t_out, teacher_flops = None, 0
    if method.needs.teacher:
        with torch.no_grad():
            if baseline:  # one forward for the features, another for the logits
                f1, t_feat = _count(lambda: encoder.forward_features(views))
                f2, t_logits = _count(lambda: encoder(views))
                teacher_flops, t_out = f1 + f2, (t_feat, t_logits)
            else:  # one forward for both
                f1, t_feat = _count(lambda: encoder.forward_features(views))
                f2, t_logits = _count(lambda: encoder.fc(t_feat))
                teacher_flops, t_out = f1 + f2, (t_feat, t_logits)

    def student_forward():
        if baseline and method.needs.views == 2:
            feats = student.encoder.forward_features(x)
            proj = F.normalize(student.projector(feats), dim=1)
            with torch.no_grad():
                logits = student.classifier(student.encoder.forward_features(view1))
        else:
            s = student(x, detach_classifier=method.needs.online_classifier)
            proj, logits = s.projection, s.logits
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
    """The student runs of the published plan (desupcon.plan.plan of the paper preset),
    each distinct run once, as the sweep runs them (duplicates share a run name)."""
    experiments = plan(preset("paper"), "all")
    unique: dict[str, MethodConfig] = {}
    for e in experiments:
        unique.setdefault(run_name(e.cfg), e.cfg.method)
    return len(experiments), list(unique.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_run_options(p)
    p.add_argument("--classes", type=int, default=10, help="classes of the chosen setting (CIFAR-10: 10)")
    p.add_argument("--image-size", type=int, default=32, help="image size of the chosen setting")
    args = p.parse_args()
    began = time.perf_counter()
    cfg = preset(args.preset)
    t_arch, s_arch = args.teacher_arch or cfg.model.teacher_arch, args.student_arch or cfg.model.student_arch
    method = MethodConfig(method=args.method, bank_size=args.bank_size)
    print(f"desupcon FLOP count: preset {args.preset}, method {args.method}, {t_arch} -> {s_arch}, "
          f"batch {args.batch_size} ({2 * args.batch_size} views), {args.image_size}x{args.image_size}, "
          f"{args.classes} classes")

    header("FLOPs per training step (torch.utils.flop_counter.FlopCounterMode on meta tensors)")
    rows, per_step = [], {}
    for label, baseline in (("ours", False), ("baseline", True)):
        f = step_flops(t_arch, s_arch, method, args.batch_size, args.image_size, args.classes, baseline)
        per_step[label] = f
        rows.append([label, f"{f['teacher'] / 1e9:.1f}", f"{f['student_fwd'] / 1e9:.1f}",
                     f"{f['student_bwd'] / 1e9:.1f}", f"{f['total'] / 1e9:.1f}"])
    print(table(["step", "teacher fwd GF", "student fwd GF", "student bwd GF", "total GF"], rows))
    print(f"FLOP ratio baseline / ours: {per_step['baseline']['total'] / per_step['ours']['total']:.2f} "
          "(the baseline's second teacher forward and second student forward)")

    paper = preset("paper")
    pt, ps, bs, epochs = (paper.model.teacher_arch, paper.model.student_arch, paper.optim.batch_size,
                          paper.optim.epochs)
    steps = data_mod.batches_per_epoch(PAPER_TRAIN_IMAGES, bs, drop_last=paper.optim.drop_last)
    eval_student = forward_flops(ps, PAPER_TEST_IMAGES, 32, PAPER_CLASSES, student=True)
    eval_teacher = forward_flops(pt, PAPER_TEST_IMAGES, 32, PAPER_CLASSES, student=False)
    header(f"FLOPs of the paper preset: CIFAR-100 ({PAPER_TRAIN_IMAGES:,} train / {PAPER_TEST_IMAGES:,} "
           f"test, 32x32), {pt} -> {ps}, batch {bs}, {steps} steps/epoch, {epochs} epochs")
    rows = []
    for label, baseline in (("ours", False), ("baseline", True)):
        f = step_flops(pt, ps, method, bs, 32, PAPER_CLASSES, baseline)
        run_flops = epochs * steps * f["total"] + epochs * eval_student
        rows.append([f"one {args.method} run, {label}", f"{f['total'] / 1e12:.2f}", f"{run_flops / 1e15:.1f}"])
    n_listed, runs = published_plan()
    teacher_ce = epochs * steps * teacher_ce_step_flops(pt, bs, 32, PAPER_CLASSES) + epochs * eval_teacher
    probe = paper.teacher.probe_epochs * steps * forward_flops(pt, bs, 32, PAPER_CLASSES, student=False)
    solo = lock = teacher_ce + probe
    shared_teacher = 0.0
    for m in runs:
        f = step_flops(pt, ps, m, bs, 32, PAPER_CLASSES)
        t_part = epochs * steps * f["teacher"]
        s_part = epochs * steps * (f["student_fwd"] + f["student_bwd"]) + epochs * eval_student
        solo += t_part + s_part
        lock += s_part
        shared_teacher = max(shared_teacher, t_part)  # one teacher forward per step for the group
    lock += shared_teacher
    for label, total in ((f"plan: teacher + {len(runs)} students, one after another", solo),
                         (f"plan: teacher + {len(runs)} students, lockstep (teacher fwd shared)", lock),
                         ("plan with the teacher from weights (probe only), lockstep", lock - teacher_ce)):
        rows.append([label, "-", f"{total / 1e15:.1f}"])
    print(table(["", "TFLOP/step", "PFLOP total"], rows))
    print(f"the plan (desupcon.plan.plan) lists {n_listed} student runs, {len(runs)} distinct; "
          f"teacher training {teacher_ce / 1e15:.1f} PFLOP (50 cross-entropy epochs), projection probe "
          f"{probe / 1e15:.1f} PFLOP.")
    common.footer(began)


if __name__ == "__main__":
    main()
