"""CPU-scale comparison on the real CIFAR-10 (../shared/data/cifar10 or --data): a small CIFAR
ResNet teacher, a smaller student, a few seeds, every method of a sweep group in lockstep; prints
last-epoch test accuracy as mean ± sd over seeds and paired differences against CE and KD.

    python scripts/cpu_comparison.py --group logit --seeds 0 1 --output-dir runs/cpu_logit

Everything it trains is cached under --output-dir like any run, so a second call only reports.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from desupcon import experiments  # noqa: E402
from desupcon.config import preset  # noqa: E402
from desupcon.pipeline import Session  # noqa: E402
from desupcon.report import mean_sd, paired_difference  # noqa: E402


def base_config(args):
    """The mdistiller protocol shrunk to a CPU: SGD 0.05, cosine over the epochs, one view."""
    return preset("mdistiller").replace(
        data={"dataset": f"npz:{args.data}", "train_subset": args.train_images, "test_subset": args.test_images},
        model={"teacher_arch": args.teacher, "student_arch": args.student, "teacher_weights": None},
        optim={"epochs": args.epochs, "batch_size": 64, "schedule": "cosine", "milestones": []},
        teacher={"epochs": args.teacher_epochs, "batch_size": 64, "probe_epochs": 2},
        method={"nce_negatives": args.nce_negatives},
        device="cpu", output_dir=str(args.output_dir), save_every=max(args.epochs, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", default="logit", help="sweep group whose runs are compared (logit, two-stage)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"), help="npz dataset folder")
    p.add_argument("--train-images", type=int, default=5000, help="training images (seeded subset)")
    p.add_argument("--test-images", type=int, default=2000, help="test images (seeded subset)")
    p.add_argument("--teacher", default="resnet20", help="teacher architecture")
    p.add_argument("--student", default="resnet8", help="student architecture")
    p.add_argument("--epochs", type=int, default=6, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    p.add_argument("--nce-negatives", type=int, default=1024,
                   help="crd-nce negatives per anchor (the literature's 16,384 is more than a CPU subset holds)")
    p.add_argument("--output-dir", type=Path, default=REPO / "runs" / "cpu_comparison", help="where runs go")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = base_config(args)
    started = time.perf_counter()
    session = Session(base, pictures=False)
    planned = experiments.plan(base, args.group, args.seeds)
    results = experiments.run_experiments(base, planned, lockstep=True, session=session)
    teacher_acc = session.teacher()[1]["test_acc"]
    by_label: dict[str, dict[int, float]] = {}
    best: dict[str, dict[int, float]] = {}
    for e, r in results:
        by_label.setdefault(e.label, {})[e.cfg.optim.seed] = r.metrics["test_acc"]
        best.setdefault(e.label, {})[e.cfg.optim.seed] = r.metrics.get("best_test_acc") or float("nan")
    refs = [label for label in ("CE student", "KD") if label in by_label]
    print(f"\nCIFAR-10, {args.train_images} training / {args.test_images} test images, teacher {args.teacher} "
          f"({teacher_acc:.2f} %, {args.teacher_epochs} epochs) -> student {args.student}, {args.epochs} "
          f"epochs, seeds {args.seeds}; {time.perf_counter() - started:.0f} s\n")
    header = ["method", "test acc % (last epoch)", "best epoch"] + [f"Δ vs {r} (paired)" for r in refs]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, accs in by_label.items():
        m, sd = mean_sd(list(accs.values()))
        bm, _ = mean_sd(list(best[label].values()))
        cells = [label, f"{m:.2f} ± {sd:.2f}" if sd is not None else f"{m:.2f}", f"{bm:.2f}"]
        for ref in refs:
            d, se, n = paired_difference(accs, by_label[ref])
            cells.append("" if label == ref else f"{d:+.2f} ± {se:.2f} (n={n})" if se is not None else f"{d:+.2f}")
        print("| " + " | ".join(cells) + " |")
    sds = [statistics.stdev(a.values()) for a in by_label.values() if len(a) > 1]
    if sds:
        print(f"\nmedian seed-to-seed sd: {statistics.median(sds):.2f} points")


if __name__ == "__main__":
    main()
