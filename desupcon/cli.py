"""Command line: `python desupcon.py <command> ...` (or the `desupcon` console script)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from . import pipeline
from .checkpoint import CheckpointError, check_json_records, check_writable
from .config import METHODS, PRESETS, RunConfig, preset
from .data import DatasetNotFoundError
from .models import CheckpointMismatchError
from .runs import NonFiniteLossError, OutputPaths
from .validation import ConfigError, validate_config

log = logging.getLogger("desupcon")

# flag -> (section, field, type); every one overrides the preset only when given.
RUN_FLAGS = {
    "--dataset": ("data", "dataset", str),
    "--data-root": ("data", "data_root", str),
    "--train-subset": ("data", "train_subset", int),
    "--test-subset": ("data", "test_subset", int),
    "--image-size": ("data", "image_size", int),
    "--teacher-arch": ("model", "teacher_arch", str),
    "--student-arch": ("model", "student_arch", str),
    "--teacher-weights": ("model", "teacher_weights", str),
    "--method": ("method", "method", str),
    "--alpha": ("method", "alpha", float),
    "--beta": ("method", "beta", float),
    "--temperature": ("method", "temperature", float),
    "--kd-temperature": ("method", "kd_temperature", float),
    "--lam": ("method", "lam", float),
    "--bank-size": ("method", "bank_size", int),
    "--bank-momentum": ("method", "bank_momentum", float),
    "--epochs": ("optim", "epochs", int),
    "--batch-size": ("optim", "batch_size", int),
    "--lr": ("optim", "lr", float),
    "--weight-decay": ("optim", "weight_decay", float),
    "--seed": ("optim", "seed", int),
    "--teacher-epochs": ("teacher", "epochs", int),
    "--probe-epochs": ("teacher", "probe_epochs", int),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_common_flags(p: argparse.ArgumentParser, with_run_flags: bool = True) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="starting configuration: quick (CPU, digits) or paper (SPEC 6)")
    p.add_argument("--output-dir", default=".", help="root of pth_models/, json_results/, plots/")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--force", action="store_true", help="retrain even when a cached run exists")
    p.add_argument("--no-resume", action="store_true", help="ignore epoch checkpoints, start over")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (GPU)")
    if not with_run_flags:
        return
    for flag, (_, _, kind) in RUN_FLAGS.items():
        p.add_argument(flag, type=kind, default=None, dest=_dest(flag))
    p.add_argument("--download", dest="download", action="store_true", default=None,
                   help="download torchvision datasets when missing (default)")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--adaptive-beta", dest="adaptive_beta", action="store_true", default=None)
    p.add_argument("--no-adaptive-beta", dest="adaptive_beta", action="store_false")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset with every explicitly given flag applied."""
    cfg = preset(args.preset)
    changes: dict[str, dict] = {}
    for flag, (section, key, _) in RUN_FLAGS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            changes.setdefault(section, {})[key] = value
    if getattr(args, "download", None) is not None:
        changes.setdefault("data", {})["download"] = args.download
    if getattr(args, "adaptive_beta", None) is not None:
        changes.setdefault("method", {})["adaptive_beta"] = args.adaptive_beta
    cfg = cfg.replace(**changes)
    return cfg.replace(device=args.device, output_dir=str(args.output_dir), compile=args.compile)


def preflight(cfgs: list[RunConfig]) -> None:
    """Everything that can be checked before loading data or training: the settings, that the
    output folders are writable and that the results files the runs will update are readable
    (a corrupted one is reported now, not after hours of training)."""
    from .evaluation import comprehensive_results_path
    for cfg in cfgs:
        validate_config(cfg)
    for cfg in cfgs:
        paths = OutputPaths(cfg.output_dir)
        for folder in (paths.models, paths.results):
            check_writable(folder)
        check_json_records(comprehensive_results_path(paths, cfg.model.student_arch, cfg.data.dataset))


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def cmd_quickstart(args) -> None:
    cfg = config_from_args(args)
    preflight([c for _, c in pipeline.quickstart_configs(cfg)])
    pipeline.quickstart(cfg, force=args.force)


def cmd_teacher(args) -> None:
    cfg = config_from_args(args)
    if args.weights:
        cfg = cfg.replace(model={"teacher_weights": args.weights})
    preflight([cfg])
    session = pipeline.Session(cfg)
    _, metrics = session.teacher(force=args.force, resume=not args.no_resume)
    print(f"teacher {cfg.model.teacher_arch} on {cfg.data.dataset}: test accuracy {metrics['test_acc']:.2f}%")


def cmd_train(args) -> None:
    cfg = config_from_args(args)
    preflight([cfg])
    session = pipeline.Session(cfg)
    result = session.run(cfg, force=args.force, resume=not args.no_resume)
    m = result.metrics
    how = "cached" if result.cached else f"{m['seconds']:.0f} s"
    print(f"{result.name}: test {m['test_acc']:.2f}%  train {m['train_acc']:.2f}%  ({how})"
          f"  -> {result.checkpoint}")


def cmd_analyze(args) -> None:
    """Re-analyse a saved student (a checkpoint path or a run name under --output-dir)."""
    path = Path(args.run)
    if not path.is_file():
        path = Path(args.output_dir) / "pth_models" / f"{args.run}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{args.run}: neither a checkpoint file nor a run name with a "
                                f"checkpoint in {Path(args.output_dir) / 'pth_models'}")
    metrics = pipeline.analyze_checkpoint(path, device=args.device, output_dir=args.output_dir,
                                          data_root=args.data_root, pictures=not args.no_plots)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        if not isinstance(value, dict):
            print(f"{key:<{width}}  {value if value is None else f'{value:.6f}'}")


def cmd_report(args) -> None:
    text, path = pipeline.report(args.output_dir)
    print(text)
    print(f"written to {path}")


def cmd_sweep(args) -> None:
    from . import experiments
    base = config_from_args(args)
    preflight([base])
    _, text = experiments.sweep(base, args.group, seeds=args.seeds, force=args.force,
                                force_bank=args.force_bank, lockstep=args.lockstep,
                                pictures=not args.no_plots)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desupcon", description="Logit-weighted supervised contrastive representation distillation.",
        epilog="Without a command, runs the whole published plan like the notebook: "
               "`desupcon [--preset quick] ...` = `desupcon sweep all ...`.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("quickstart", help="teacher + every method on the embedded digits, with a table")
    add_common_flags(p)
    p.set_defaults(func=cmd_quickstart, preset="quick")

    p = sub.add_parser("teacher", help="train or load the teacher and its projection head")
    add_common_flags(p)
    p.add_argument("--weights", default=None, help="teacher state dict (torchvision/timm layout)")
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("train", help=f"train one student run (methods: {', '.join(METHODS)})")
    add_common_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run a group of the published plan (missing runs only)")
    p.add_argument("group", choices=["alpha", "beta", "temp", "lambda", "bank", "baselines", "all"])
    add_common_flags(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every configuration once per seed (default: the preset's seed)")
    p.add_argument("--force-bank", action="store_true", help="retrain only the bank ablation")
    p.add_argument("--lockstep", action="store_true",
                   help="train runs that share a seed together (one teacher forward per batch)")
    p.add_argument("--no-plots", action="store_true", help="metrics only, no per-run pictures")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze", help="re-analyse a saved run (metrics, plots) without retraining")
    p.add_argument("run", help="a student checkpoint (.pth) or a run name")
    p.add_argument("--output-dir", default=".", help="where plots/ and json_results/ go")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the run's own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="results tables from every run on disk")
    p.add_argument("--output-dir", default=".")
    p.set_defaults(func=cmd_report)
    return parser


USER_ERRORS = (ConfigError, CheckpointError, CheckpointMismatchError, DatasetNotFoundError,
               NonFiniteLossError, FileNotFoundError, PermissionError, OSError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        # No command: the whole plan (paper preset unless --preset), like the notebook top to bottom.
        argv = ["sweep", "all", *argv]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with logging_redirect_tqdm():
            args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished epochs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
