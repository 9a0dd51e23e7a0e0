"""CPU-scale comparison on the real CIFAR-10 (../shared/data/cifar10 or --data): a small CIFAR
ResNet teacher, a smaller student, a few seeds; prints last-epoch test accuracy as mean ± sd over
seeds and paired differences.

    python scripts/cpu_comparison.py --group logit --seeds 0 1 --output-dir runs/cpu_logit
    python scripts/cpu_comparison.py --group two-stage --train-images 10000 --seeds 0 1 2

`logit`: every method of the logit sweep group in lockstep, against CE and KD.
`two-stage`: end-to-end CE, KD, CRD, crd-nce and LW-SupCRD against two-stage runs with CRD and
LW-SupCRD as phase 1 (the seed's SGD phase-1 optimiser, which is the base protocol's), and the
linear, k-NN and KD probes of every run (SPEC 12) beside each run's own accuracy.

Everything it trains is cached under --output-dir like any run (probes inside their checkpoints),
so a second call only reports. The per-seed figures also go to <output-dir>/comparison_<group>.json;
`--merge A.json B.json ...` prints one table from several such files (seeds run on separate calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from desupcon import experiments  # noqa: E402
from desupcon.checkpoint import atomic_write_text, load_checkpoint  # noqa: E402
from desupcon.config import preset  # noqa: E402
from desupcon.pipeline import Session  # noqa: E402
from desupcon.probes import ProbeConfig, probe_checkpoint  # noqa: E402
from desupcon.report import mean_sd, paired_difference  # noqa: E402
from desupcon.two_stage import TwoStageConfig, train_two_stage  # noqa: E402

END_TO_END = (("CE student", "ce"), ("KD", "kd"), ("CRD", "crd"), ("crd-nce", "crd-nce"),
              ("LW-SupCRD", "lw-supcrd"))
TWO_STAGE = (("two-stage CRD", "crd"), ("two-stage LW-SupCRD", "lw-supcrd"))
PROBES = ("linear", "knn", "kd")


def base_config(args):
    """The mdistiller protocol shrunk to a CPU: SGD 0.05, cosine over the epochs, one view."""
    return preset("mdistiller").replace(
        data={"dataset": f"npz:{args.data}", "train_subset": args.train_images, "test_subset": args.test_images},
        model={"teacher_arch": args.teacher, "student_arch": args.student, "teacher_weights": None},
        optim={"epochs": args.epochs, "batch_size": 64, "schedule": "cosine", "milestones": []},
        teacher={"epochs": args.teacher_epochs, "batch_size": 64, "probe_epochs": 2},
        method={"nce_negatives": args.nce_negatives},
        device=args.device, output_dir=str(args.output_dir), save_every=max(args.epochs, 1))


def print_table(rows: dict[str, dict[str, dict[int, float]]], columns: list[str],
                refs: dict[str, list[str]]) -> None:
    """One row per method: mean ± sd of each column over seeds, then paired differences of the
    first column against each reference row (`refs`: label -> reference label(s) for that row)."""
    header = ["method", *columns, "Δ (paired, first column)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, cols in rows.items():
        cells = [label]
        for c in columns:
            m, sd = mean_sd(list(cols.get(c, {}).values()))
            cells.append("" if m is None else f"{m:.2f} ± {sd:.2f}" if sd is not None else f"{m:.2f}")
        diffs = []
        for ref in refs.get(label, []):
            d, se, n = paired_difference(cols[columns[0]], rows[ref][columns[0]])
            if d is not None:
                diffs.append(f"{d:+.2f} ± {se:.2f} vs {ref}" if se is not None else f"{d:+.2f} vs {ref}")
        cells.append("; ".join(diffs))
        print("| " + " | ".join(cells) + " |")
    sds = [statistics.stdev(v.values()) for cols in rows.values() for v in cols.values() if len(v) > 1]
    if sds:
        print(f"\nmedian seed-to-seed sd: {statistics.median(sds):.2f} points (standard errors after ±)")


def logit_comparison(args, base, session) -> dict:
    planned = experiments.plan(base, "logit", args.seeds)
    results = experiments.run_experiments(base, planned, lockstep=True, session=session)
    rows: dict[str, dict[str, dict[int, float]]] = {}
    for e, r in results:
        cols = rows.setdefault(e.label, {"test acc % (last epoch)": {}, "best epoch": {}})
        cols["test acc % (last epoch)"][e.cfg.optim.seed] = r.metrics["test_acc"]
        cols["best epoch"][e.cfg.optim.seed] = r.metrics.get("best_test_acc") or float("nan")
    return {"rows": rows, "columns": ["test acc % (last epoch)", "best epoch"], "refs": references("logit", rows)}


def _probe(path: Path, kind: str, session, config: ProbeConfig) -> dict:
    """The probe's recorded result when its checkpoint already holds one with these settings."""
    ckpt = load_checkpoint(path, expected_kind="student")
    seed = ckpt["config"]["optim"]["seed"]
    known = (ckpt.get("probes") or {}).get(kind)
    if known and (kind == "knn" or known.get("config") == dataclasses.asdict(config.resolved(kind, seed))):
        return known
    teacher = session.teacher()[0]
    return probe_checkpoint(path, kind, session.dataset, session.policy, teacher=teacher, config=config)


def two_stage_comparison(args, base, session) -> dict:
    probe_cfg = ProbeConfig(epochs=args.probe_epochs)
    rows: dict[str, dict[str, dict[int, float]]] = {}
    own = "own classifier (last epoch)"
    columns = [own, "linear probe", "k-NN (k=20)", "KD probe", "best epoch (own)"]
    for seed in args.seeds:  # seed by seed, so that an interrupted call keeps whole seeds
        cfgs = [base.with_method(m).replace(optim={"seed": seed}) for _, m in END_TO_END]
        finished = [(label, r) for (label, _), r in zip(END_TO_END, session.run_many(cfgs, lockstep=True))]
        for label, method in TWO_STAGE:
            ts = TwoStageConfig(phase1_method=method, phase1_optimizer="sgd",
                                phase2=ProbeConfig(epochs=args.probe_epochs, schedule="constant"))
            r = train_two_stage(base.replace(optim={"seed": seed}), ts, session.dataset, session.teacher()[0],
                                session.policy)
            finished.append((label, r))
        for label, r in finished:
            cols = rows.setdefault(label, {c: {} for c in columns})
            cols[own][seed] = r.metrics["test_acc"]
            cols["best epoch (own)"][seed] = r.metrics.get("best_test_acc") or float("nan")
            for kind, column in zip(PROBES, columns[1:4]):
                cols[column][seed] = _probe(Path(r.checkpoint), kind, session, probe_cfg)["top1"]
        write_json(args, rows)
    return {"rows": rows, "columns": columns, "refs": references("two-stage", rows)}


def references(group: str, rows) -> dict:
    """Which rows each row's paired difference is taken against."""
    def wanted(label: str) -> list[str]:
        if group == "logit":
            return ["CE student", "KD"]
        if label.startswith("two-stage "):  # against KD and its own end-to-end run
            return ["KD", label[len("two-stage "):]]
        return ["KD"] if label != "KD" else ["CE student"]
    return {label: [r for r in wanted(label) if r in rows and r != label] for label in rows}


def merge(files: list[Path]) -> tuple[str, dict, list[str]]:
    """The group, the rows (seeds of every file together) and the columns of saved comparisons."""
    group, rows, columns = None, {}, []
    for f in files:
        saved = json.loads(Path(f).read_text())
        group = group or saved["settings"]["group"]
        for label, cols in saved["rows"].items():
            for column, by_seed in cols.items():
                columns += [column] if column not in columns else []
                rows.setdefault(label, {}).setdefault(column, {}).update({int(k): v for k, v in by_seed.items()})
    return group, rows, columns


def write_json(args, rows) -> None:
    path = Path(args.output_dir) / f"comparison_{args.group}.json"
    atomic_write_text(path, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                       indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", default="logit", choices=("logit", "two-stage"), help="which comparison")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"), help="npz dataset folder")
    p.add_argument("--train-images", type=int, default=5000, help="training images (seeded subset)")
    p.add_argument("--test-images", type=int, default=2000, help="test images (seeded subset)")
    p.add_argument("--teacher", default="resnet20", help="teacher architecture")
    p.add_argument("--student", default="resnet8", help="student architecture")
    p.add_argument("--epochs", type=int, default=6, help="student epochs (phase 1 of two-stage runs too)")
    p.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs")
    p.add_argument("--probe-epochs", type=int, default=10,
                   help="epochs of the linear and KD probes and of two-stage phase 2 (SPEC 12: 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    p.add_argument("--nce-negatives", type=int, default=1024,
                   help="crd-nce negatives per anchor (the literature's 16,384 is more than a CPU subset holds)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--output-dir", type=Path, default=REPO / "runs" / "cpu_comparison", help="where runs go")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="print one table from saved comparison_<group>.json files and stop")
    args = p.parse_args()
    if args.merge:
        group, rows, columns = merge(args.merge)
        print_table(rows, columns, references(group, rows))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = base_config(args)
    started = time.perf_counter()
    session = Session(base, pictures=False, analyze=False)
    table = (logit_comparison if args.group == "logit" else two_stage_comparison)(args, base, session)
    write_json(args, table["rows"])
    teacher_acc = session.teacher()[1]["test_acc"]
    print(f"\nCIFAR-10, {args.train_images} training / {args.test_images} test images, teacher {args.teacher} "
          f"({teacher_acc:.2f} %, {args.teacher_epochs} epochs) -> student {args.student}, {args.epochs} "
          f"epochs, seeds {args.seeds}, {session.policy.describe()}; {time.perf_counter() - started:.0f} s\n")
    print_table(table["rows"], table["columns"], table["refs"])


if __name__ == "__main__":
    main()
