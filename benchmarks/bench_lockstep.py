"""Lockstep: several students sharing each batch's teacher forward, against the same students
trained one after another.

Prints the cost of one teacher forward against one student step, then the seconds of 4 runs
(LW-SupCRD alpha 1, 2, 5 and CRD) trained through `train_students` one after another, together
in lockstep, and in fused lockstep (`--fused-lockstep`: the four students as one vmapped model;
checkpoints written, a test evaluation at the end), their ratios, the ideal lockstep ratio
implied by the per-step costs, whether lockstep's final weights equal the solo runs' (torch.equal
on every tensor of the student and teacher head) and the largest difference of fused lockstep's.

    python benchmarks/bench_lockstep.py [--teacher-arch resnet32x4 --student-arch resnet8x4]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
import torch

from common import banner, footer, header, load_data, make_teacher, setup, sync, table
from desupcon import data as data_mod
from desupcon.engine.build import make_student_run
from desupcon.engine.students import train_students
from desupcon.config import preset

VARIANTS = [{"method": "lw-supcrd", "alpha": 1.0}, {"method": "lw-supcrd", "alpha": 2.0},
            {"method": "lw-supcrd", "alpha": 5.0}, {"method": "crd"}]


def main() -> None:
    p = common.parser(__doc__)
    p.set_defaults(train_images=None, test_images=64)
    p.add_argument("--preset", choices=("quick", "paper"), default="paper",
                   help="optimiser settings come from this preset")
    p.add_argument("--teacher-arch", default="resnet32x4", help="the shared teacher")
    p.add_argument("--student-arch", default="resnet8x4", help="every student")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (two views each)")
    p.add_argument("--steps", type=int, default=6, help="training steps per run (one epoch of them)")
    args = p.parse_args()
    policy = setup(args)
    device, bs, k = policy.device, args.batch_size, args.steps
    began = time.perf_counter()
    args.train_images = bs * k
    ds = load_data(args).to(device)
    banner("desupcon lockstep benchmark", policy, ds)
    header(f"{len(VARIANTS)} students sharing each batch's teacher forward vs the same one after another")
    cfg = preset(args.preset).replace(
        data={"dataset": ds.name, "image_size": None},
        model={"teacher_arch": args.teacher_arch, "student_arch": args.student_arch},
        optim={"epochs": 1, "batch_size": bs}, device=args.device,
        teacher={"batch_size": bs})  # the teacher is given (random), never trained: only checked
    cfgs = [cfg.replace(method=v) for v in VARIANTS]
    teacher = make_teacher(args.teacher_arch, ds.num_classes, policy)

    # cost of one teacher forward vs one student step, on a throwaway run (after a warm-up)
    run = make_student_run(cfgs[0], ds, teacher, policy)
    run.start_epoch()
    augment = data_mod.TwoViewAugment.for_size(ds.mean, ds.std, ds.image_size)
    idx, v1, v2, y = next(data_mod.epoch_batches(ds.train_images, ds.train_labels, bs, augment,
                                                 torch.Generator().manual_seed(0)))
    v1 = policy.inputs(v1)
    views = policy.inputs(torch.cat([v1, v2]))
    t_times, s_times = [], []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        out = teacher.features_and_logits(views, policy)
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
            results = train_students(sub, ds, teacher, policy, force=True, resume=False)
            sync(device)
            return time.perf_counter() - start, results

        train_group([cfgs[0]], "warmup")  # untimed: first evaluation, checkpoint write, allocations
        # order: solo 0, solo 1, lockstep, solo 2, solo 3 (a load drift hits both sides alike)
        solo_seconds, solo_results = [], []
        for i, c in enumerate(cfgs):
            if i == 2:
                lockstep, lock_results = train_group(cfgs, "lockstep")
                fused, fused_results = train_group([c.replace(fused_lockstep=True) for c in cfgs], "fused")
            seconds, res = train_group([c], f"solo{i}")
            solo_seconds.append(seconds)
            solo_results += res
        identical, fused_diff = True, 0.0
        for a, b, f in zip(solo_results, lock_results, fused_results):
            sa, sb, sf = (torch.load(r.checkpoint, weights_only=True) for r in (a, b, f))
            for part in ("student", "teacher_head"):
                for key in sa[part]:
                    identical &= torch.equal(sa[part][key], sb[part][key])
                    if sa[part][key].is_floating_point():
                        fused_diff = max(fused_diff, float((sa[part][key] - sf[part][key]).abs().max()))
    sequential = sum(solo_seconds)
    ratio = lockstep / sequential
    print(f"setting: {args.teacher_arch} teacher -> {len(cfgs)} x {args.student_arch} students (lw-supcrd "
          f"alpha 1, 2, 5; crd), {ds.image_size}x{ds.image_size}, batch {bs} ({2 * bs} views), {k} steps + a "
          f"{len(ds.test_labels)}-image test evaluation, through train_students, one process")
    print(f"teacher forward {t_cost:.3f} s vs one student step {s_cost:.3f} s "
          f"(teacher / student = {t_cost / s_cost:.2f})")
    print(table(["", "seconds", "ratio"],
                [[f"{len(cfgs)} runs one after another (" + " + ".join(f"{x:.1f}" for x in solo_seconds) + ")",
                  f"{sequential:.1f}", "1.00"],
                 [f"{len(cfgs)} runs in lockstep", f"{lockstep:.1f}", f"{ratio:.2f}"],
                 [f"{len(cfgs)} runs in fused lockstep", f"{fused:.1f}", f"{fused / sequential:.2f}"]]))
    n = len(cfgs)
    ideal = (t_cost + n * s_cost) / (n * (t_cost + s_cost))
    print(f"lockstep / sequential = {ratio:.2f} (from the per-step costs above the ideal is {ideal:.2f}); "
          f"final weights (student + teacher head) identical: {'yes' if identical else 'NO'}; fused lockstep's "
          f"largest difference from the solo weights {fused_diff:.2e}")
    footer(began)


if __name__ == "__main__":
    main()
