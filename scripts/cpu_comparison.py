"""CPU-scale comparisons on the real CIFAR-100 (../shared/data/cifar100, or --data): a small CIFAR
ResNet teacher trained once on every training image, smaller students on a stratified subset, a few
seeds; prints last-epoch test accuracy (and the best epoch apart) as mean ± sd over seeds with
paired differences ± standard error.

    python scripts/cpu_comparison.py --group published --data ../shared/data/cifar100 --seeds 0 1 2
    python scripts/cpu_comparison.py --group logit --data ../shared/data/cifar100 --seeds 0 1 2
    python scripts/cpu_comparison.py --group two-stage --data ../shared/data/cifar100 --seeds 0 1 2

`published`: the published comparison: CE, SupCon, CRD, LW-SupCRD (alpha 1, beta 10, tau 0.07) and
the hybrid (lambda 0.3) under `paper`, CRD and LW-SupCRD without and with a memory bank under
`paper-bank`; with the geometry and the superclass structure of every run.
`logit`: every method of the logit sweep group in lockstep, against CE and KD, under the
mdistiller protocol shrunk to a CPU (SGD 0.05, cosine over the epochs, batch 64, one view).
`two-stage`: end-to-end CE, KD, CRD, crd-nce and LW-SupCRD against two-stage runs with CRD and
LW-SupCRD as phase 1 (the seed's SGD phase-1 optimiser, which is the base protocol's), and the
linear, k-NN and KD probes of every run (SPEC 12) beside each run's own accuracy.

The teacher is trained on all training images (`--teacher-train-images` for fewer) and handed to
every student as a weights file, so all three groups share it (students identify it by content).
Everything is cached under --output-dir like any run (probes inside their checkpoints), so a second
call only reports. The per-seed figures also go to <output-dir>/comparison_<group>.json;
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

from desupcon import plan as experiments  # noqa: E402
from desupcon.store.checkpoint import atomic_write_text, load_checkpoint  # noqa: E402
from desupcon.analysis.compare import prediction_statistics  # noqa: E402
from desupcon.analysis.compare_models import load_saved_model, run_test_pass  # noqa: E402
from desupcon.config import preset, teacher_run_name  # noqa: E402
from desupcon.session import Session  # noqa: E402
from desupcon.store.paths import OutputPaths  # noqa: E402
from desupcon.probes import ProbeConfig, probe_checkpoint  # noqa: E402
from desupcon.report import mean_sd, paired_difference  # noqa: E402
from desupcon.two_stage import TwoStageConfig, train_two_stage  # noqa: E402

END_TO_END = (("CE student", "ce"), ("KD", "kd"), ("CRD", "crd"), ("crd-nce", "crd-nce"),
              ("LW-SupCRD", "lw-supcrd"))
TWO_STAGE = (("two-stage CRD", "crd"), ("two-stage LW-SupCRD", "lw-supcrd"))
PROBES = ("linear", "knn", "kd")


def dataset_spec(args) -> dict:
    """--data: a dataset name (cifar100, cifar10 with --data-root) or an npz folder."""
    if args.data in ("cifar100", "cifar10"):
        return {"dataset": args.data, "data_root": args.data_root, "download": False}
    return {"dataset": f"npz:{args.data}"}


def teacher_config(args):
    """The teacher, trained once with cross-entropy (SGD, cosine) on every training image."""
    return preset("mdistiller").replace(
        data={**dataset_spec(args), "train_subset": args.teacher_train_images, "test_subset": None},
        model={"teacher_arch": args.teacher, "teacher_weights": None},
        teacher={"epochs": args.teacher_epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine",
                 "probe_epochs": args.probe_head_epochs},
        device=args.device, output_dir=str(args.output_dir))


def trained_teacher_file(args) -> tuple[Path, dict]:
    """The teacher's checkpoint (trained now or loaded from the cache) and its metrics."""
    cfg = teacher_config(args)
    _, metrics = Session(cfg, analyze=False, pictures=False).teacher()
    return OutputPaths(cfg.output_dir).checkpoint(teacher_run_name(cfg)), metrics


def base_config(args, teacher_file: Path):
    """Students on a stratified subset, distilled from the teacher file. `published`: the `paper`
    protocol (its bank arms under `paper-bank`); otherwise the mdistiller protocol shrunk to a CPU
    (SGD 0.05, cosine over the epochs, batch 64, one view)."""
    common = dict(
        data={**dataset_spec(args), "train_subset": args.train_images, "test_subset": args.test_images},
        model={"teacher_arch": args.teacher, "student_arch": args.student, "teacher_weights": str(teacher_file)},
        teacher={"probe_epochs": args.probe_head_epochs, "batch_size": 128},
        device=args.device, output_dir=str(args.output_dir), save_every=max(args.epochs, 1))
    if args.group == "published":
        return preset("paper").replace(optim={"epochs": args.epochs}, **common)
    return preset("mdistiller").replace(
        optim={"epochs": args.epochs, "batch_size": 64, "schedule": "cosine", "milestones": []},
        method={"nce_negatives": args.nce_negatives}, **common)


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
            if c == MCNEMAR:  # p-values are listed per seed, never averaged
                cells.append(", ".join(f"{p:.2g}" for p in cols.get(c, {}).values()))
                continue
            d = 4 if any(word in c for word in ("alignment", "uniformity", "margin")) else 2
            cells.append("" if m is None else f"{m:.{d}f} ± {sd:.{d}f}" if sd is not None else f"{m:.{d}f}")
        diffs = []
        for ref in refs.get(label, []):
            d, se, n = paired_difference(cols[columns[0]], rows[ref][columns[0]])
            if d is not None:
                diffs.append(f"{d:+.2f} ± {se:.2f} vs {ref}" if se is not None else f"{d:+.2f} vs {ref}")
        cells.append("; ".join(diffs))
        print("| " + " | ".join(cells) + " |")
    sds = [statistics.stdev(v.values()) for cols in rows.values() for v in [cols.get(columns[0], {})] if len(v) > 1]
    if sds:
        print(f"\nmedian seed-to-seed sd: {statistics.median(sds):.2f} points (standard errors after ±)")


ACC, BEST = "test acc % (last epoch)", "best epoch"
GEOMETRY = (("alignment (class, proj)", "alignment_class", "projection", 1),
            ("uniformity (proj)", "uniformity", "projection", 1),
            ("superclass margin (proj)", "superclass_margin", "projection", 1),
            ("superclass margin (backbone)", "superclass_margin", "backbone", 1),
            ("nearest centroid in superclass % (backbone)", "superclass_nearest_rate", "backbone", 100))


def accuracy_rows(results, geometry: bool = False) -> dict:
    """label -> column -> seed -> value for finished (experiment, result) pairs."""
    rows: dict[str, dict[str, dict[int, float]]] = {}
    for e, r in results:
        cols = rows.setdefault(e.label, {})
        seed = e.cfg.optim.seed
        cols.setdefault(ACC, {})[seed] = r.metrics["test_acc"]
        cols.setdefault(BEST, {})[seed] = r.metrics.get("best_test_acc") or float("nan")
        for column, key, space, scale in GEOMETRY if geometry else ():
            metrics = (r.analysis or {}) if space == "projection" else (r.analysis or {}).get("backbone") or {}
            if metrics.get(key) is not None:
                cols.setdefault(column, {})[seed] = scale * metrics[key]
    return rows


def published_plan(base):
    """The published comparison: baselines and the hybrid (lambda 0.3) under `paper`, the bank
    ablation's four arms under `paper-bank` (bank size --bank-size)."""
    baselines = experiments.group_plan(base, "baselines")
    hybrid = [dataclasses.replace(e, label="Hybrid (lambda 0.3)")
              for e in experiments.group_plan(base, "lambda") if e.value == 0.3]
    bank = experiments.group_plan(base, "bank")
    return [experiments.Experiment(e.group, e.label + (" (paper-bank)" if e.group == "bank" else ""), e.value,
                                   e.cfg) for e in baselines + hybrid + bank]


def teacher_row(session) -> dict:
    """The teacher's own figures on the students' test images (one model: no seeds)."""
    metrics, acc = session.analyze_teacher(), session.teacher()[1]["test_acc"]
    row = {ACC: {0: acc}}
    for column, key, space, scale in GEOMETRY:
        value = (metrics if space == "projection" else metrics.get("backbone") or {}).get(key)
        if value is not None:
            row[column] = {0: scale * value}
    return row


def published_comparison(args, base, session) -> dict:
    planned = experiments.with_seeds(published_plan(base), args.seeds)
    if args.bank_size:
        planned = [dataclasses.replace(e, cfg=e.cfg.replace(method={"bank_size": args.bank_size}))
                   if e.cfg.method.bank_size else e for e in planned]
    results = []
    for seed in args.seeds:  # seed by seed, so that an interrupted call keeps whole seeds
        results += experiments.run_experiments(base, [e for e in planned if e.cfg.optim.seed == seed],
                                               lockstep=True, session=session)
        write_json(args, accuracy_rows(results, geometry=True))
    rows = {f"teacher {args.teacher}": teacher_row(session), **accuracy_rows(results, geometry=True)}
    return {"rows": rows, "columns": [ACC, BEST, *(g[0] for g in GEOMETRY)], "refs": references("published", rows)}


def logit_comparison(args, base, session) -> dict:
    results = []
    for seed in args.seeds:
        results += experiments.run_experiments(base, experiments.plan(base, "logit", [seed]), lockstep=True,
                                               session=session)
        write_json(args, accuracy_rows(results))
    rows = accuracy_rows(results)
    return {"rows": rows, "columns": [ACC, BEST], "refs": references("logit", rows)}


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
        by_label = dict(finished)
        for label, _ in TWO_STAGE:  # the same test images, image by image, against its end-to-end run
            end_to_end = by_label[label[len("two-stage "):]]
            rows[label].setdefault(MCNEMAR, {})[seed] = mcnemar_p(by_label[label], end_to_end, session)
        write_json(args, rows)
    return {"rows": rows, "columns": [*columns, MCNEMAR], "refs": references("two-stage", rows)}


MCNEMAR = "McNemar p vs its end-to-end run"


def mcnemar_p(a, b, session) -> float:
    """Exact McNemar p-value of two finished runs' own classifiers on the test set."""
    first, second = (load_saved_model(str(r.checkpoint), session.cfg.output_dir, session.policy) for r in (a, b))
    result = run_test_pass(first, second, session.dataset, session.policy, layers=False)
    return prediction_statistics(*result.predictions, result.labels)["mcnemar_p"]


def references(group: str, rows) -> dict:
    """Which rows each row's paired difference is taken against."""
    def wanted(label: str) -> list[str]:
        if group == "logit":
            return ["CE student", "KD"]
        if group == "published":  # against CE; a bank arm also against its own no-bank arm
            return ["CE student"] + ([label.replace(" + bank", "")] if " + bank" in label else [])
        if label.startswith("two-stage "):  # against KD and its own end-to-end run
            return ["KD", label[len("two-stage "):]]
        return ["KD"] if label != "KD" else ["CE student"]
    return {label: [r for r in wanted(label) if r in rows and r != label] for label in rows
            if not label.startswith("teacher ")}


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
    p.add_argument("--group", default="published", choices=("published", "logit", "two-stage"),
                   help="which comparison")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar100"),
                   help="an npz dataset folder, or cifar100 / cifar10 (torchvision files under --data-root)")
    p.add_argument("--data-root", default="data", help="torchvision root when --data is cifar100 or cifar10")
    p.add_argument("--train-images", type=int, default=5000, help="students' training images (stratified subset)")
    p.add_argument("--test-images", type=int, default=2000, help="test images (stratified subset)")
    p.add_argument("--teacher", default="resnet20", help="teacher architecture")
    p.add_argument("--student", default="resnet8", help="student architecture")
    p.add_argument("--epochs", type=int, default=6, help="student epochs (phase 1 of two-stage runs too)")
    p.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs (SGD 0.1, cosine, batch 128)")
    p.add_argument("--teacher-train-images", type=int, default=None,
                   help="the teacher's training images (stratified subset; default: all of them)")
    p.add_argument("--probe-head-epochs", type=int, default=2,
                   help="cosine-probe epochs of the teacher's projection head")
    p.add_argument("--probe-epochs", type=int, default=10,
                   help="epochs of the linear and KD probes and of two-stage phase 2 (SPEC 12: 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    p.add_argument("--bank-size", type=int, default=4096, help="memory-bank entries of the bank arms (published)")
    p.add_argument("--nce-negatives", type=int, default=1024,
                   help="crd-nce negatives per anchor (the literature's 16,384 is more than a CPU subset holds)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--output-dir", type=Path, default=REPO / "runs" / "cifar100", help="where runs go")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="print one table from saved comparison_<group>.json files and stop")
    args = p.parse_args()
    if args.merge:
        group, rows, columns = merge(args.merge)
        print_table(rows, columns, references(group, rows))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    teacher_file, teacher_metrics = trained_teacher_file(args)
    base = base_config(args, teacher_file)
    session = Session(base, pictures=False, analyze=args.group == "published")
    compare = {"published": published_comparison, "logit": logit_comparison,
               "two-stage": two_stage_comparison}[args.group]
    table = compare(args, base, session)
    write_json(args, table["rows"])
    data = session.dataset
    print(f"\n{data.name}: {len(data.train_labels)} training / {len(data.test_labels)} test images "
          f"(stratified); teacher {args.teacher} trained {args.teacher_epochs} epochs on "
          f"{args.teacher_train_images or 'all'} training images ({teacher_metrics['test_acc']:.2f} % on the full "
          f"test set) -> student {args.student}, {args.epochs} epochs, seeds {args.seeds}, "
          f"{session.policy.describe()}; {time.perf_counter() - started:.0f} s\n")
    print_table(table["rows"], table["columns"], table["refs"])


if __name__ == "__main__":
    main()
