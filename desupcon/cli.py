"""Command line: `python desupcon.py <command> ...` (or the `desupcon` console script)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import stat
import sys
from pathlib import Path

import traceback
from tqdm.contrib.logging import logging_redirect_tqdm

from desupcon.config import COMPILE_MODES, config_json, method_names, preset, PRESET_HELP, PRESETS, run_name, RunConfig
from desupcon.config.settings import flagged, switches
from desupcon.config.validation import checked_config_dict, ConfigError, validate_config
from desupcon.engine.devices import PRECISIONS
from desupcon.errors import DesupconError, InputFileError, MissingInputsError
from desupcon.models import canonical_arch
from desupcon.store.checkpoint import check_json_records, check_writable, CheckpointError, load_checkpoint
from desupcon.store.paths import OutputPaths


def _help(setting) -> str:
    return setting.help.format(choices=", ".join(setting.allowed())) if "{choices}" in setting.help else setting.help


def run_flags() -> dict:
    """flag -> (section, field, type, help), from the settings' declarations (settings.py and the
    methods'); every one overrides the preset only when given."""
    return {st.flag: (st.section, st.field, st.kind, _help(st)) for st in flagged()}


def bool_flags() -> dict:
    """flag pairs -> (section, field, help of the positive flag, help of the negative flag)."""
    return {(st.flag, st.off_flag): (st.section, st.field, st.help, st.off_help) for st in switches()}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_common_flags(p: argparse.ArgumentParser, with_run_flags: bool = True) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    p.add_argument("--output-dir", default=".", help="root of pth_models/, json_results/, plots/")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--force", action="store_true",
                   help="retrain student runs even when cached (each once; never the teacher)")
    p.add_argument("--force-teacher", action="store_true",
                   help="retrain (or re-probe) the teacher even when cached")
    p.add_argument("--no-resume", action="store_true", help="ignore epoch checkpoints, start over")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (GPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile's mode (implies --compile): default, reduce-overhead (its CUDA graphs, "
                        "the student's forward and backward only; --cuda-graphs captures the whole step) or "
                        "max-autotune")
    p.add_argument("--fused-lockstep", action="store_true",
                   help="train the students of one architecture in a lockstep group as one batched model "
                        "(torch.func.vmap; one process, not with --compile); the same mathematics as solo runs")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: capture each epoch's training step once and replay it as a CUDA graph (one "
                        "process; crd-nce, the hybrid, fp16 and --compile step eagerly); the same arithmetic as "
                        "the eager step")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved configuration(s) as JSON and exit")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (bf16 on GPUs that have it natively, fp16 with loss scaling on older "
                        "GPUs, fp32 on CPU), bf16, fp16 or fp32")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (no cuDNN autotuning, no TF32): slower, repeatable")
    p.add_argument("--save-every", type=int, default=1, metavar="N",
                   help="write the in-progress checkpoint every N epochs (final results always)")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="several GPUs (torchrun): BatchNorm statistics over the global batch")
    p.add_argument("--tensorboard", action="store_true",
                   help="write per-epoch scalars and final metrics of every run to <output-dir>/tensorboard/")
    p.add_argument("--wandb", action="store_true",
                   help="log the same to Weights & Biases (offline mode without an account or network)")
    if not with_run_flags:
        return
    for flag, (_, _, kind, text) in run_flags().items():
        if isinstance(kind, list):  # a list setting: several values after the flag
            p.add_argument(flag, type=kind[0], nargs="+", default=None, dest=_dest(flag), help=text)
        else:
            p.add_argument(flag, type=kind, default=None, dest=_dest(flag), help=text)
    for (yes, no), (_, key, yes_help, no_help) in bool_flags().items():
        p.add_argument(yes, dest=key, action="store_true", default=None, help=yes_help)
        p.add_argument(no, dest=key, action="store_false", help=no_help)
    p.add_argument("--train-teacher", action="store_true",
                   help="train the teacher with cross-entropy (its own --teacher-* settings) instead "
                        "of loading weights")


MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few kilobytes of JSON or YAML


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different (json keeps the last of a repeated key silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key))
        out[key] = value
    return out


def _unique_key_yaml_loader():
    """yaml's safe loader refusing a mapping that repeats a key (it would keep the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one "
                                                            "mapping; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)
    return UniqueKeyLoader


def read_config_file(path: str) -> dict:
    """The configuration stored in `path`, as plain data: JSON as `--print-config` writes it, YAML
    (`.yaml`/`.yml`, the same structure), or any desupcon checkpoint (student, two-stage, teacher,
    epoch checkpoint: its stored configuration). A two-stage run's settings come as `two_stage`."""
    source, file = f"--config {path}", Path(path).expanduser()
    try:
        info = file.stat()  # (through a link: what is read)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device never end
            raise InputFileError(f"{source} is not a regular file; give a configuration file or a checkpoint")
        if info.st_size == 0:
            raise ConfigError(f"{source} is empty; give a configuration as `train --print-config` writes it")
        with open(file, "rb") as f:
            head = f.read(64).lstrip()
        is_yaml = file.suffix.lower() in (".yaml", ".yml")
        is_text = head[:1] in (b"{", b"[") or is_yaml
        if is_text and info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{source} is {info.st_size} bytes, more than a configuration file holds (at most "
                              f"{MAX_CONFIG_BYTES}); give the file `train --print-config` writes")
        text = file.read_bytes() if is_text else None
    except InputFileError:
        raise
    except FileNotFoundError as exc:
        raise InputFileError(f"{source}: file not found") from exc
    except OSError as exc:
        raise InputFileError(f"{source}: cannot read it ({exc.strerror or exc})") from exc
    if text is not None and is_yaml:
        import yaml
        try:
            data = yaml.load(text.decode("utf-8"), Loader=_unique_key_yaml_loader())
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{source} is not valid YAML ({' '.join(str(exc).split())[:160]})") from None
        except RecursionError:
            raise ConfigError(f"{source} nests too deeply to be a configuration") from None
    elif text is not None:
        try:
            data = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{source} is not valid JSON ({exc})") from exc
        except _DuplicateKey as exc:
            raise ConfigError(f"{source}: the key {exc} appears twice in one object; keep one") from None
        except RecursionError:
            raise ConfigError(f"{source} nests too deeply to be a configuration") from None
    else:
        try:
            ckpt = load_checkpoint(file)
        except CheckpointError as exc:
            raise ConfigError(f"{source} is neither a JSON configuration (as --print-config writes it; YAML "
                              f"files end in .yaml or .yml) nor a desupcon checkpoint: {exc}") from exc
        data = ckpt.get("config")
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: this {ckpt.get('kind')!r} checkpoint holds no configuration")
    if isinstance(data, list):
        raise ConfigError(f"{source} holds a list of {len(data)} configurations (what `sweep "
                          "--print-config` and `quickstart --print-config` print); --config takes "
                          "one configuration, as `train --print-config` writes it")
    return data


def config_file(path: str) -> tuple[RunConfig, dict | None]:
    """(configuration, two-stage settings or None) stored in `path` (`read_config_file`)."""
    data = read_config_file(path)
    two_stage = data.get("two_stage") if isinstance(data, dict) else None
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "two_stage"}
    if two_stage is not None and not isinstance(two_stage, dict):
        raise ConfigError(f"--config {path}: two_stage must be an object of two-stage settings")
    return RunConfig.from_dict(over_its_preset(checked_config_dict(data, f"--config {path}"))), two_stage


def over_its_preset(d: dict) -> dict:
    """A configuration from a file with what it leaves out taken from the preset it names (a file
    saying only `preset: quick` is the quick preset); the method's settings come from the preset only
    when the file keeps the preset's method (another method takes its own defaults)."""
    if d.get("preset") not in PRESETS:
        return d
    base = PRESETS[d["preset"]].to_dict()
    out = {**base, **d}
    for section in ("data", "model", "optim", "teacher"):
        out[section] = {**base[section], **d.get(section, {})}
    method = d.get("method", {})
    same = method.get("method", base["method"]["method"]) == base["method"]["method"]
    out["method"] = {**base["method"], **method} if same else method
    return out


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset, or the configuration of the `--config` file, with every explicitly given flag
    applied. `--device`, `--output-dir` and `--compile` always come from the command line."""
    given_preset = getattr(args, "preset", None)
    if getattr(args, "config", None):
        cfg, _ = config_file(args.config)
        if given_preset is not None and given_preset != cfg.preset:
            raise ConfigError(f"--preset {given_preset} and --config {args.config} (preset {cfg.preset}) "
                              "conflict: the file's configuration replaces the preset; give one of them")
    else:
        cfg = preset(given_preset or getattr(args, "default_preset", "paper"))
    changes: dict[str, dict] = {}
    for flag, (section, key, _, _) in run_flags().items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            changes.setdefault(section, {})[key] = value
    for (section, key, _, _) in bool_flags().values():
        if getattr(args, key, None) is not None:
            changes.setdefault(section, {})[key] = getattr(args, key)
    if getattr(args, "train_teacher", False):
        if getattr(args, "teacher_weights", None):
            raise ConfigError("--train-teacher and --teacher-weights contradict each other; give one")
        changes.setdefault("model", {})["teacher_weights"] = None
    model = changes.get("model", {})
    for key, flag in (("teacher_arch", "--teacher-arch"), ("student_arch", "--student-arch")):
        try:  # the registry's spelling, whether the name came from a flag or from a file
            if key in model:
                model[key] = canonical_arch(model[key])
            else:
                cfg = cfg.replace(model={key: canonical_arch(getattr(cfg.model, key))})
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    if "teacher_arch" in model or "student_arch" in model or not getattr(args, "config", None):
        # the pair's own settings (SPEC 17: the light students' lr, DKD's beta) under every flag given
        cfg = cfg.with_pair(model.get("teacher_arch", cfg.model.teacher_arch),
                            model.get("student_arch", cfg.model.student_arch))
    method = changes.get("method", {}).pop("method", None)
    if method is not None and method != "two-stage":
        cfg = cfg.with_method(method)  # the method's own defaults (SPEC 13), then every flag given
    cfg = cfg.replace(**changes)
    compile_mode = getattr(args, "compile_mode", None)
    return cfg.replace(device=args.device, output_dir=str(args.output_dir),
                       compile=args.compile or compile_mode is not None, compile_mode=compile_mode or "default",
                       fused_lockstep=getattr(args, "fused_lockstep", False),
                       cuda_graphs=getattr(args, "cuda_graphs", False),
                       precision=getattr(args, "precision", "auto"),
                       deterministic=getattr(args, "deterministic", False),
                       save_every=getattr(args, "save_every", 1),
                       sync_batchnorm=getattr(args, "sync_batchnorm", False),
                       tensorboard=getattr(args, "tensorboard", False), wandb=getattr(args, "wandb", False))


def preflight(cfgs: list[RunConfig], teacher: bool = True) -> None:
    """Everything that can be checked before loading data or training: the settings, that the
    output folders are writable, that the results files the runs will update are readable (a
    corrupted one is reported now, not after hours of training) and that the teacher's weights
    can be had (a missing published teacher is reported before any data is loaded)."""
    from desupcon.store.records import records_path
    from desupcon.teacher import check_teacher_available
    from desupcon.engine.tracking import check_available
    for cfg in cfgs:
        validate_config(cfg)
        check_available(cfg.tensorboard, cfg.wandb)
    for cfg in cfgs:
        paths = OutputPaths(cfg.output_dir)
        for folder in (paths.models, paths.results):
            check_writable(folder)
        check_json_records(records_path(paths, cfg.model.student_arch, cfg.data.dataset))
    from desupcon.data import DatasetNotFoundError, check_dataset_available
    from desupcon.store.weights import TeacherWeightsUnavailableError
    missing = []  # every missing input named at once: the data and the teacher
    for cfg in {repr(c.data_identity()) + c.data.data_root: c for c in cfgs}.values():
        try:
            check_dataset_available(cfg.data.dataset, cfg.data.data_root, cfg.data.download)
        except DatasetNotFoundError as exc:
            missing.append(exc)
    if teacher:
        for cfg in {repr(c.teacher_identity()): c for c in cfgs}.values():
            try:
                check_teacher_available(cfg)
            except TeacherWeightsUnavailableError as exc:
                missing.append(exc)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise MissingInputsError(f"{len(missing)} inputs are missing:\n" + "\n".join(f"  - {e}" for e in missing))


# the commands that train (an interrupt keeps their finished epochs); the others only read or write once
TRAINING_COMMANDS = ("quickstart", "teacher", "train", "probe", "sweep")


def print_config(cfgs) -> None:
    """The configurations as JSON, each range-checked first (what is printed would run)."""
    for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
        validate_config(cfg)
    print(config_json(cfgs))


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def given_run_flags(args) -> list[tuple[str, str, str]]:
    """(flag as typed, section, field) of every run setting given on the command line."""
    given = [(flag, section, key) for flag, (section, key, _, _) in run_flags().items()
             if getattr(args, _dest(flag), None) is not None]
    for (yes, no), (section, key, _, _) in bool_flags().items():
        if getattr(args, key, None) is not None:
            given.append((yes if getattr(args, key) else no, section, key))
    return given


def reject_overridden_flags(args, base: RunConfig, planned: list[RunConfig], who: str,
                            hints: dict[str, str] | None = None) -> None:
    """Refuse a given flag whose setting the command's plan replaces with its own values (the
    flag would be silently ignored): `who` names what sets it, `hints` adds a word per flag."""
    problems = []
    for flag, section, key in given_run_flags(args):
        given = getattr(getattr(base, section), key)
        values = list(dict.fromkeys(getattr(getattr(c, section), key) for c in planned))
        if any(v != given for v in values):
            shown = ", ".join(str(v) for v in values)
            problems.append(f"{who} sets {flag} itself ({shown}); remove {flag}"
                            + (f" ({hints[flag]})" if hints and flag in hints else ""))
    if problems:
        raise ConfigError("; ".join(problems))


def cmd_quickstart(args) -> None:
    from desupcon import session as pipeline  # (the training and analysis stack: not for --help)
    cfg = config_from_args(args)
    cfgs = [c for _, c in pipeline.quickstart_configs(cfg)]
    reject_overridden_flags(args, cfg, cfgs, "quickstart",
                            {"--method": "quickstart trains every method; `train --method X` trains one"})
    if args.print_config:
        return print_config(cfgs)
    preflight(cfgs)
    pipeline.quickstart(cfg, force=args.force, force_teacher=args.force_teacher, resume=not args.no_resume)


def cmd_teacher(args) -> None:
    from desupcon import session as pipeline  # (the training and analysis stack: not for --help)
    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg)
    preflight([cfg])
    session = pipeline.Session(cfg, force_teacher=args.force_teacher)
    teacher, metrics = session.teacher(resume=not args.no_resume)
    print(f"teacher {cfg.model.teacher_arch} on {cfg.data.dataset}: test accuracy {metrics['test_acc']:.2f}% "
          f"(source: {teacher.source}, fingerprint {teacher.fingerprint})")


def two_stage_settings(args, cfg: RunConfig, stored: dict | None = None):
    """(phase-1 configuration, TwoStageConfig) of `train --method two-stage`, or of a two-stage
    configuration file (`stored`: its settings, under any two-stage flag given)."""
    from desupcon.probes import ProbeConfig
    from desupcon.two_stage import TwoStageConfig
    if args.phase2_epochs is not None and args.phase2_epochs < 1:
        raise ConfigError(f"--phase2-epochs must be >= 1, got {args.phase2_epochs}")
    if stored is not None:
        try:
            settings = TwoStageConfig.from_dict(stored)
        except TypeError as exc:
            raise ConfigError(f"--config {args.config}: two_stage settings: {exc}") from None
        changes = {k: v for k, v in (("phase1_method", args.phase1_method),
                                     ("phase1_optimizer", args.phase1_optimizer)) if v is not None}
        changes.update({k: True for k in ("finetune_last_stage", "two_level_crd") if getattr(args, k)})
        phase2 = (dataclasses.replace(settings.phase2, epochs=args.phase2_epochs) if args.phase2_epochs
                  else settings.phase2)
        settings = TwoStageConfig.from_dict({**settings.to_dict(), **changes,
                                             "phase2": dataclasses.asdict(phase2)})
        phase1 = cfg if cfg.method.method == settings.phase1_method else cfg.with_method(settings.phase1_method)
    else:
        method = args.phase1_method or "crd"
        phase1 = cfg.with_method(method)
        epochs = args.phase2_epochs or (50 if cfg.preset.startswith("paper") or cfg.preset == "mdistiller"
                                        else cfg.optim.epochs)
        settings = TwoStageConfig(phase1_method=method, phase1_optimizer=args.phase1_optimizer or "run",
                                  phase2=ProbeConfig(epochs=epochs, batch_size=cfg.optim.batch_size,
                                                     schedule="constant"),
                                  finetune_last_stage=args.finetune_last_stage, two_level_crd=args.two_level_crd)
    settings.check()
    return phase1, settings


def cmd_train(args) -> None:
    from desupcon import session as pipeline  # (the training and analysis stack: not for --help)
    cfg = config_from_args(args)
    stored = config_file(args.config)[1] if getattr(args, "config", None) else None
    if stored is not None and getattr(args, "method", None) not in (None, "two-stage"):
        stored = None  # --method X on a two-stage file: an end-to-end run of its configuration
    two_stage = getattr(args, "method", None) == "two-stage" or stored is not None
    if two_stage:
        cfg, settings = two_stage_settings(args, cfg, stored)
    if args.print_config:
        # a two-stage run prints its settings too, so that the output reads back with --config
        return print(json.dumps({**cfg.to_dict(), "two_stage": settings.to_dict()}, indent=2)) if two_stage \
            else print_config(cfg)
    preflight([cfg])
    session = pipeline.Session(cfg, force_teacher=args.force_teacher)
    if two_stage:
        from desupcon.two_stage import train_two_stage
        result = train_two_stage(cfg, settings, session.dataset, session.teacher()[0], session.policy,
                                 force=args.force, resume=not args.no_resume)
        session.analyze(result)
        if session.analyze_runs:
            print(f"two-stage phase 2 (KD probe on the frozen encoder): test {result.metrics['test_acc']:.2f}% "
                  f"(last epoch)")
    else:
        result = session.run(cfg, force=args.force, resume=not args.no_resume)
    if not session.analyze_runs:  # several processes: the first one reports
        return
    session.analyze_teacher()  # the report shows the teacher beside its students (once, cached)
    m = result.metrics
    how = (result.source if result.source != "trained" else "cached") if result.cached \
        else f"{m['seconds']:.0f} s"
    train_acc = "" if m.get("train_acc") is None else f"  train {m['train_acc']:.2f}%"
    print(f"{result.name}: test {m['test_acc']:.2f}% (last epoch){train_acc}  ({how})"
          f"  -> {result.checkpoint}")


def _saved_run_path(run: str, output_dir) -> Path:
    from desupcon.store.paths import saved_run_path
    return saved_run_path(run, output_dir)


def cmd_analyze(args) -> None:
    """Re-analyse a saved student (a checkpoint path or a run name under --output-dir)."""
    from desupcon import session as pipeline  # (the training and analysis stack: not for --help)
    path = _saved_run_path(args.run, args.output_dir)
    metrics = pipeline.analyze_checkpoint(path, device=args.device, output_dir=args.output_dir,
                                          data_root=args.data_root, pictures=not args.no_plots)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        if not isinstance(value, dict):
            print(f"{key:<{width}}  {value if value is None else f'{value:.6f}'}")


# The analysis commands' settings and their ranges, checked before any model is loaded or data read.
# (k-NN's k and the KSG estimator's k also have an upper bound, the number of samples, checked
# where the data is known: probes.knn_predict, analysis.compare_models.)
ANALYSIS_RANGES = {
    "k": ("--k", lambda v: v >= 1, ">= 1 (neighbours of the k-NN vote)"),
    "epochs": ("--epochs", lambda v: v >= 1, ">= 1"),
    "lr": ("--lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "batch_size": ("--batch-size", lambda v: v >= 1, ">= 1"),
    "mi_k": ("--mi-k", lambda v: v >= 1, ">= 1 (neighbours of the KSG estimator), below the number of test images"),
    "mi_dims": ("--mi-dims", lambda v: v >= 1, ">= 1 (principal components kept)"),
    "cka_sigma": ("--cka-sigma", lambda v: math.isfinite(v) and v > 0,
                  "a finite number > 0 (a multiple of the median pairwise distance)"),
}


def check_analysis_settings(args) -> None:
    """One line naming the first analysis setting out of its range, before any work; and the
    `--json` file's folder writable."""
    for field, (flag, ok, allowed) in ANALYSIS_RANGES.items():
        value = getattr(args, field, None)
        if value is not None and not ok(value):
            raise ConfigError(f"{flag} {value!r} is out of range; it must be {allowed}")
    if getattr(args, "json", None):
        check_writable(Path(args.json).parent)


def cmd_probe(args) -> None:
    """A probe on a saved student's frozen encoder (SPEC 12), recorded beside its other results."""
    from desupcon import session as pipeline  # (the training and analysis stack: not for --help)
    from desupcon.store.checkpoint import load_checkpoint
    from desupcon.engine.devices import DevicePolicy, select_device
    from desupcon.probes import ProbeConfig, probe_checkpoint
    from desupcon.engine.dataset import prepare_dataset
    check_analysis_settings(args)
    root = args.output_dir or "."
    path = _saved_run_path(args.run, root)
    ckpt = load_checkpoint(path, expected_kind="student")
    cfg = RunConfig.from_dict(ckpt["config"]).replace(device=args.device, output_dir=str(root),
                                                      **({"data": {"data_root": args.data_root}}
                                                         if args.data_root else {}))
    teacher = None
    if args.kind == "kd":
        session = pipeline.Session(cfg, analyze=False)
        dataset, teacher, policy = session.dataset, session.teacher()[0], session.policy
    else:
        policy = DevicePolicy.choose(select_device(args.device))
        dataset = prepare_dataset(cfg, policy.device)
    n_train = dataset.train_labels.shape[0]
    if args.kind == "knn" and args.k > n_train:  # (before the encoder's pass over the data)
        raise ConfigError(f"--k {args.k} is out of range for {n_train} training images; it must be in [1, {n_train}]")
    config = ProbeConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         finetune_last_stage=args.finetune_last_stage)
    result = probe_checkpoint(path, args.kind, dataset, policy, teacher=teacher, config=config, k=args.k,
                              output_root=Path(args.output_dir) if args.output_dir else None)
    print(f"{ckpt['name']}: {args.kind} probe top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"(online classifier, unchanged: {ckpt['metrics']['test_acc']:.2f}%)")


def cmd_report(args) -> None:
    from desupcon import session as pipeline  # (the training and analysis stack: not for --help)
    if not Path(args.output_dir).is_dir():
        raise InputFileError(f"--output-dir {args.output_dir}: no such folder (nothing is reported, nothing "
                             "created); give the folder your runs were written under")
    text, path = pipeline.report(args.output_dir)
    print(text)
    print(f"written to {path}")


def sweep_bases(args) -> list[RunConfig]:
    """The sweep's base configuration, or one per teacher -> student pair with `--pair T:S` /
    `--pairs all` (each with the pair's own settings, SPEC 17)."""
    from desupcon.config.pairs import STANDARD_PAIRS, parse_pair
    if args.pair is None and args.pairs is None:
        return [config_from_args(args)]
    if args.pair is not None and args.pairs is not None:
        raise ConfigError("--pair and --pairs both choose the pairs; give one")
    from desupcon.methods import COMPARISONS
    if args.group not in COMPARISONS:
        raise ConfigError(f"--pair/--pairs choose teacher -> student pairs of a comparison ({', '.join(COMPARISONS)}); "
                          f"use `sweep {next(iter(COMPARISONS))}`, not `sweep {args.group}`")
    if args.teacher_arch is not None or args.student_arch is not None:
        raise ConfigError("--pair/--pairs set --teacher-arch and --student-arch; remove those")
    try:
        chosen = ([parse_pair(args.pair, canonical_arch)] if args.pair is not None
                  else [(p.teacher, p.student) for p in STANDARD_PAIRS])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    bases = []
    for teacher, student in chosen:
        args.teacher_arch, args.student_arch = teacher, student
        bases.append(config_from_args(args))
    args.teacher_arch = args.student_arch = None
    return bases


def cmd_sweep(args) -> None:
    from desupcon import plan as experiments
    if args.pairs not in (None, "all"):
        raise ConfigError(f"--pairs {args.pairs!r}: only `all` (the 13 pairs of SPEC 17); one pair is --pair T:S")
    bases = sweep_bases(args)
    if args.seeds and getattr(args, "seed", None) is not None:
        raise ConfigError("--seeds sets the seed of every run; give --seed or --seeds, not both")
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        raise ConfigError(f"--seeds repeats {', '.join(map(str, repeated))}; give each seed once")
    if args.lockstep_size is not None and args.lockstep_size < 1:
        raise ConfigError(f"--lockstep-size must be >= 1, got {args.lockstep_size}")
    for base in bases:
        for group in (experiments.GROUPS if args.group == "all" else [args.group]):
            reject_overridden_flags(args, base, [e.cfg for e in experiments.group_plan(base, group)],
                                    f"the {group} sweep", {"--method": "`train` runs one method"})
    if args.print_config:  # what this process would run: its shard of each base's plan, range-checked
        planned = [(base, e) for base in bases
                   for e in experiments.shard_plan(experiments.plan(base, args.group, args.seeds),
                                                   parse_shard(args.shard), args.lockstep, args.lockstep_size)]
        for _, e in planned:
            validate_config(e.cfg)
        print(json.dumps([{"group": e.group, "label": e.label, "pair": f"{base.model.teacher_arch}:"
                           f"{base.model.student_arch}", "run": run_name(e.cfg), "preset": e.cfg.preset,
                           "config": e.cfg.to_dict()} for base, e in planned], indent=2))
        return
    preflight(bases)
    for base in bases:
        _, text = experiments.sweep(base, args.group, seeds=args.seeds, force=args.force,
                                    force_bank=args.force_bank, force_teacher=args.force_teacher,
                                    lockstep=args.lockstep, pictures=not args.no_plots,
                                    resume=not args.no_resume, shard=parse_shard(args.shard),
                                    lockstep_size=args.lockstep_size)
    if text:
        print(text)


def cmd_compare(args) -> None:
    from desupcon.analysis.compare_models import compare_models
    check_analysis_settings(args)
    out = compare_models(args.a, args.b, args.output_dir, args.device, args.data_root, args.json,
                         mi_dims=args.mi_dims, mi_k=args.mi_k, cka_sigma=args.cka_sigma)
    mi = out["mutual_information"]
    print(f"A = {out['model_a']} ({out['kind_a']})\nB = {out['model_b']} ({out['kind_b']})\n"
          f"{out['n']} test images of {out['dataset']}\n"
          f"accuracy  A {out['accuracy_a']:.2f}%  B {out['accuracy_b']:.2f}%  agreement {out['agreement']:.2f}%  "
          f"kappa {out['kappa']:.4f}\n"
          f"both right {out['both_right']}  only A right {out['only_a_right']}  only B right "
          f"{out['only_b_right']}  both wrong {out['both_wrong']}  McNemar exact p {out['mcnemar_p']:.4g}\n"
          f"CKA of the final features: linear {out['cka_linear']:.4f}  unbiased {out['cka_unbiased']:.4f}  "
          f"RBF (sigma {out['cka_rbf_sigma']:g} x median, {out['cka_rbf_points']} points) {out['cka_rbf']:.4f}\n"
          f"mutual information (nats; KSG k {mi['k']}, first {mi['d']} principal components, n {mi['n']}): "
          f"A;B {mi['a_b']:.4f}  A;labels {mi['a_labels']:.4f}  B;labels {mi['b_labels']:.4f}")
    print("classes where the two differ most: " + ", ".join(
        f"{r['class']} ({r['accuracy_a']:.0f} vs {r['accuracy_b']:.0f}%)" for r in out["classes_differing_most"][:5]))
    print(f"written to {out['written_to']}")


def cmd_similarity(args) -> None:
    from desupcon.analysis.compare_models import layer_similarity
    check_analysis_settings(args)
    out = layer_similarity(args.a, args.b, args.output_dir, args.device, args.data_root, args.json)
    width = max(len(n) for n in out["layers_a"])
    print(f"linear CKA (unbiased, minibatches of {out['batch_size']}, {out['n']} test images); rows: "
          f"{out['model_a']}, columns: {out['model_b']}")
    print(" " * width + "  " + "  ".join(f"{n:>10}" for n in out["layers_b"]))
    for name, row in zip(out["layers_a"], out["cka"]):
        print(f"{name:<{width}}  " + "  ".join(f"{v:>10.4f}" for v in row))
    print(f"heatmap: {out['heatmap']}")


def cmd_data_subset(args) -> None:
    from desupcon import data as data_mod
    source, out = _data_source(args.source), Path(args.out)
    if source.startswith("npz:") and out.resolve() == Path(source[len("npz:"):]).resolve():
        raise ConfigError(f"the subset would overwrite its source {out}; choose another OUT folder")
    _writable_folder(out, args.overwrite)
    dataset = data_mod.load_dataset(source, args.data_root, download=not args.no_download)
    try:
        subset = data_mod.per_class_subset(dataset, args.train_per_class, args.test_per_class, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    data_mod.write_npz_dataset(subset, out)
    print(f"{out}: {len(subset.train_labels)} training and {len(subset.test_labels)} test images of "
          f"{subset.num_classes} classes (seed {args.seed}{', with superclasses' if subset.coarse_classes else ''}), "
          f"{_folder_mib(out):.1f} MiB; use it as --dataset npz:{out}")


def _data_source(source: str) -> str:
    """A dataset name for `load_dataset`: a name, npz:<folder>, or a folder holding train.npz."""
    if not source.startswith("npz:") and source not in ("cifar100", "cifar10", "digits"):
        if not (Path(source) / "train.npz").is_file():
            raise ConfigError(f"{source!r} is neither a dataset name (cifar100, cifar10, digits, npz:<folder>) "
                              "nor a folder holding train.npz and test.npz")
        source = f"npz:{source}"
    return source


def _writable_folder(out: Path, overwrite: bool) -> None:
    """OUT can be written (checked before any work) and is new or empty, unless --overwrite."""
    from desupcon.store.checkpoint import OutputWriteError
    try:
        check_writable(out.parent if not out.exists() else out)
    except OutputWriteError as exc:
        raise OutputWriteError(exc.errno, str(exc).replace("choose another --output-dir", "choose another OUT "
                                                                                          "folder")) from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; choose a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")


def _folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def cmd_data_split(args) -> None:
    from desupcon import data as data_mod
    from desupcon.data_parts import DatasetPartsError, write_parts
    source, out = _data_source(args.source), Path(args.out)
    _writable_folder(out, args.overwrite)
    dataset = data_mod.load_dataset(source, args.data_root, download=not args.no_download)
    try:
        folders = write_parts(dataset, out, args.parts)
    except DatasetPartsError as exc:
        raise ConfigError(str(exc)) from None
    for folder in folders:
        print(f"{folder}: {_folder_mib(folder):.1f} MiB")
    print(f"{len(folders)} parts of {len(dataset.train_labels)} training and {len(dataset.test_labels)} test "
          f"images; join them with `desupcon data join OUT {out}`")


def cmd_data_join(args) -> None:
    from desupcon import data as data_mod
    from desupcon.data_parts import DatasetPartsError, join_parts, PART_FILE
    out = Path(args.out)
    if (out / PART_FILE).is_file() or any(Path(p).resolve() == out.resolve() for p in args.parts):
        raise ConfigError(f"{out} is one of the parts; join into another folder")
    _writable_folder(out, args.overwrite)
    try:
        dataset = join_parts(args.parts)
    except DatasetPartsError as exc:
        raise ConfigError(str(exc)) from None
    data_mod.write_npz_dataset(dataset, out)
    print(f"{out}: {len(dataset.train_labels)} training and {len(dataset.test_labels)} test images, "
          f"equal to the split source; use it as --dataset npz:{out}")


def cmd_teachers_fetch(args) -> None:
    from desupcon.store.released import RELEASE_URL, fetch_released_teachers
    out = fetch_released_teachers(args.dest, url=args.url or RELEASE_URL, archive=args.archive, sha256=args.sha256,
                                  overwrite=args.overwrite)
    print(f"{out['folder']}: {len(out['teachers'])} released teachers checked ({', '.join(out['teachers'])}); "
          f"archive SHA-256 {out['sha256']}")
    if out["missing"]:
        print(f"not in the archive: {', '.join(out['missing'])}")
    print("use them with --teacher-weights released --teacher-arch ARCH (e.g. --teacher-arch wrn_40_2)")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`I/N` -> (I, N) with 1 <= I <= N."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 1/4 (the first of four parts)") from None
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text}: I must be between 1 and N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desupcon", description="Logit-weighted supervised contrastive representation distillation.",
        epilog="Without a command, runs the whole published plan like the notebook: "
               "`desupcon [--preset quick] ...` = `desupcon sweep all ...`.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (also accepted after the command)")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("quickstart", help="teacher + every method on the embedded digits, with a table")
    add_common_flags(p)
    p.set_defaults(func=cmd_quickstart, default_preset="quick")

    p = sub.add_parser("teacher", help="load (or train) the teacher and probe its projection head")
    add_common_flags(p)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("train", help=f"train one student run (methods: {', '.join(method_names())}, two-stage)")
    add_common_flags(p)
    from desupcon.methods.base import two_stage_phase1_methods
    p.add_argument("--phase1-method", default=None,
                   help=f"two-stage: the representation method of phase 1 ({', '.join(two_stage_phase1_methods())}; "
                        "default crd)")
    p.add_argument("--phase1-optimizer", choices=("run", "adam", "sgd"), default=None,
                   help="two-stage: phase 1 with the run's own optimiser (default), the run's settings with "
                        "Adam, or the seed's SGD (0.05, momentum 0.9, weight decay 5e-4, batch 64)")
    p.add_argument("--phase2-epochs", type=int, default=None,
                   help="two-stage: epochs of the KD probe (default 50; the run's epochs on the quick preset)")
    p.add_argument("--finetune-last-stage", action="store_true",
                   help="two-stage: fine-tune the encoder's last stage in phase 2 (lr 1e-5, BatchNorm in train mode)")
    p.add_argument("--two-level-crd", action="store_true",
                   help="two-stage: CRD on the final feature map and on the pooled features in phase 1")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("probe", help="probe a saved student's frozen encoder (linear, k-NN or KD probe)")
    p.add_argument("run", help="a student checkpoint (.pth) or a run name under --output-dir")
    p.add_argument("--kind", choices=("linear", "knn", "kd"), required=True,
                   help="linear: a fresh linear classifier; knn: k-nearest neighbours (cosine) on train "
                        "features; kd: linear head with 0.7 KD + 0.3 CE from the teacher's logits")
    p.add_argument("--epochs", type=int, default=50, help="training epochs of the linear and KD probes")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the probe's head")
    p.add_argument("--batch-size", type=int, default=128, help="probe batch size")
    p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    p.add_argument("--finetune-last-stage", action="store_true",
                   help="also fine-tune the encoder's last stage (lr 1e-5, BatchNorm in train mode)")
    p.add_argument("--output-dir", default=None,
                   help="root of pth_models/ and json_results/: where a run name is found and the result is "
                        "recorded (default: a run name under ., a checkpoint's result beside it)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the run's own)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sweep", help="run a group of the published plan (missing runs only)")
    from desupcon.methods import COMPARISONS
    p.add_argument("group", choices=["alpha", "beta", "temp", "lambda", "bank", "baselines", *COMPARISONS, "all"],
                   help="which group to run: one of the published plan's (all: every one of them) or a "
                        f"comparison of methods on the preset's pair ({', '.join(COMPARISONS)})")
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="run only the I-th of N disjoint parts of the plan (lockstep groups stay whole); "
                        "N processes or jobs with I = 1..N cover it once")
    add_common_flags(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every configuration once per seed (default: the preset's seed)")
    p.add_argument("--pair", metavar="TEACHER:STUDENT", default=None,
                   help="logit sweep on one teacher -> student pair with its own settings (SPEC 17), "
                        "e.g. resnet32x4:ShuffleV1")
    p.add_argument("--pairs", metavar="all", default=None,
                   help="logit sweep on every standard pair of SPEC 17 (13 pairs), one after another")
    p.add_argument("--force-bank", action="store_true", help="retrain only the bank ablation")
    p.add_argument("--lockstep", action="store_true",
                   help="train runs that share a seed together (one teacher forward per batch)")
    p.add_argument("--lockstep-size", type=int, default=None, metavar="K",
                   help="with --shard and --lockstep: split lockstep groups into pieces of at most K runs "
                        "(default: whole groups, or pieces that give every shard work)")
    p.add_argument("--no-plots", action="store_true", help="metrics only, no per-run pictures")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze", help="re-analyse a saved run (metrics, plots) without retraining")
    p.add_argument("run", help="a student checkpoint (.pth) or a run name")
    p.add_argument("--output-dir", default=".", help="where plots/ and json_results/ go")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the run's own)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    p.set_defaults(func=cmd_analyze)

    for name, text in (("compare", "two saved models on the same test images: prediction statistics "
                                   "(agreement, error overlap, kappa, McNemar), final-feature CKA and "
                                   "mutual information"),
                       ("similarity", "layer-by-layer CKA of two saved models (a heatmap and a JSON matrix)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("a", help="a checkpoint (.pth), a run name under --output-dir, or `teacher`")
        p.add_argument("b", help="the other model: a checkpoint, a run name, or `teacher` (the teacher "
                                 "the other model was distilled from)")
        p.add_argument("--output-dir", default=".", help="where runs are found and results go")
        p.add_argument("--data-root", default=None, help="dataset folder (default: the runs' own)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the result to PATH")
        if name == "compare":
            p.add_argument("--mi-dims", type=int, default=8, help="principal components kept for the MI estimates")
            p.add_argument("--mi-k", type=int, default=3, help="neighbours k of the KSG estimator")
            p.add_argument("--cka-sigma", type=float, default=1.0,
                           help="RBF CKA bandwidth as a multiple of the median pairwise distance")
        p.set_defaults(func=cmd_compare if name == "compare" else cmd_similarity)

    p = sub.add_parser("data", help="dataset utilities: a seeded, stratified subset as an npz folder; a "
                                    "dataset split into parts to carry and joined back")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("subset", help="write N training and M test images of every class, seeded, "
                                           "as an npz folder (e.g. a small copy to carry to a GPU machine)")
    q.add_argument("source", help="cifar100, cifar10, digits, npz:<folder> or a folder with train.npz/test.npz")
    q.add_argument("out", help="the npz folder to write (train.npz, test.npz, classes.json)")
    q.add_argument("--train-per-class", type=int, default=None, help="training images per class (default: all)")
    q.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    q.add_argument("--seed", type=int, default=0, help="seed of the draw")
    q.add_argument("--data-root", default="data", help="torchvision root for cifar100/cifar10")
    q.add_argument("--no-download", action="store_true", help="never download a torchvision dataset")
    q.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT folder")
    q.set_defaults(func=cmd_data_subset)
    q = data_sub.add_parser("split", help="cut a dataset into K npz folders (slices of both splits) to carry "
                                          "one at a time; `data join` puts them back together exactly")
    q.add_argument("source", help="cifar100, cifar10, digits, npz:<folder> or a folder with train.npz/test.npz")
    q.add_argument("out", help="the folder receiving part-1-of-K/ ... part-K-of-K/")
    q.add_argument("--parts", type=int, required=True, help="number of parts K")
    q.add_argument("--data-root", default="data", help="torchvision root for cifar100/cifar10")
    q.add_argument("--no-download", action="store_true", help="never download a torchvision dataset")
    q.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT folder")
    q.set_defaults(func=cmd_data_split)
    q = data_sub.add_parser("join", help="join the parts written by `data split` into one npz folder, checked "
                                         "against the digest of the source")
    q.add_argument("out", help="the npz folder to write")
    q.add_argument("parts", nargs="+", help="part folders, or folders holding them")
    q.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT folder")
    q.set_defaults(func=cmd_data_join)

    from desupcon.store.released import DEFAULT_DEST
    p = sub.add_parser("teachers", help="mdistiller's released CIFAR-100 teachers")
    teachers_sub = p.add_subparsers(dest="teachers_command", required=True)
    q = teachers_sub.add_parser("fetch", help="download mdistiller's cifar_teachers.tar, check it and unpack it "
                                              "where --teacher-weights released finds it")
    q.add_argument("--dest", default=DEFAULT_DEST,
                   help=f"folder that receives cifar_teachers/ (default {DEFAULT_DEST}, as mdistiller's script)")
    q.add_argument("--url", default=None, help="where the archive is downloaded from (default: mdistiller's release)")
    q.add_argument("--archive", default=None, metavar="FILE",
                   help="a cifar_teachers.tar already on disk (no download)")
    q.add_argument("--sha256", default=None, help="refuse an archive whose SHA-256 differs from this")
    q.add_argument("--overwrite", action="store_true", help="replace an existing <dest>/cifar_teachers")
    q.set_defaults(func=cmd_teachers_fetch)

    p = sub.add_parser("report", help="results tables from every run on disk")
    p.add_argument("--output-dir", default=".", help="the folder whose runs are reported")
    p.set_defaults(func=cmd_report)

    for name, p in sub.choices.items():
        if name in ("quickstart", "teacher", "train", "sweep"):
            p.add_argument("--config", metavar="FILE",
                           help="start from the configuration in FILE instead of the preset: JSON as "
                                "--print-config writes it, or a desupcon checkpoint (.pth); flags given "
                                "are applied on top (--device, --output-dir and --compile always come "
                                "from the command line)")
            p.set_defaults(preset=None)  # None: not given (the command's own default then applies)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of every error")
    return parser


# The toolkit's own errors (bad settings, missing data, bad files, unwritable outputs, a diverged
# run): one line, exit status 2. Anything else is a bug and keeps its traceback (exit status 1).
USER_ERRORS = (DesupconError,)


def out_of_memory(exc: BaseException) -> bool:
    """An allocator's failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if a != "--debug"), None)
    if first is None or (first.startswith("-") and first not in ("-h", "--help")):
        # No command: the whole plan (paper preset unless --preset), like the notebook top to bottom.
        argv = ["sweep", "all", *argv]
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    from desupcon.engine import distributed
    if distributed.launched_by_torchrun() and hasattr(args, "device"):
        args.device = distributed.init_from_environment(args.device)  # one process per GPU
    # only the first process of a torchrun job talks (and writes)
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING, format="%(message)s")
    try:
        with logging_redirect_tqdm():
            args.func(args)
        distributed.shutdown()
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        note = ("finished epochs are kept; rerun the same command to resume"
                if getattr(args, "command", None) in TRAINING_COMMANDS else "nothing was changed by it")
        print(f"interrupted: {note}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not out_of_memory(exc):
            traceback.print_exc()
            print("internal error: the traceback above is a bug in desupcon, not a problem with your "
                  "settings or files; please report it", file=sys.stderr)
            return 1
        if debug:
            traceback.print_exc()
        print(f"error: out of memory ({' '.join(str(exc).split())[:160] or type(exc).__name__}); use a smaller "
              "--batch-size, --image-size or --lockstep-size (finished epochs are kept)", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("internal error: the traceback above is a bug in desupcon, not a problem with your "
              "settings or files; please report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
