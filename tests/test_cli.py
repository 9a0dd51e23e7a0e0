"""The command line keeps its word: one-line errors for the user's mistakes, tracebacks for bugs
(and for everything with --debug), --config, flags a command would override refused, --no-resume."""

from __future__ import annotations

import json

import pytest

from desupcon import cli
from desupcon import plan as experiments
from desupcon import session as pipeline
from desupcon.store.checkpoint import load_checkpoint
from desupcon.cli import main
from desupcon.config import preset

# A quick-preset run that trains in seconds on the CPU (CE: no teacher needed for the student).
TINY = ["--preset", "quick", "--train-subset", "96", "--test-subset", "32", "--teacher-arch", "resnet8",
        "--student-arch", "resnet8", "--epochs", "1", "--teacher-epochs", "1", "--probe-epochs", "1",
        "--batch-size", "32", "--teacher-batch-size", "32", "--device", "cpu", "--method", "ce"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Errors: the toolkit's own are one line, anything else keeps its traceback, --debug shows all
# ----------------------------------------------------------------------------------------------

def test_toolkit_error_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    code, _, err = run(capsys, "analyze", str(missing))
    assert code == 2
    assert str(missing) in one_error_line(err)


def test_unusable_device_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "train", *TINY, "--output-dir", str(tmp_path), "--device", "gpu")
    assert code == 2 and "--device 'gpu'" in one_error_line(err)


@pytest.mark.parametrize("exc", [KeyError("oops"), ValueError("a bug"), FileNotFoundError("/tmp/x")])
def test_internal_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch, exc):
    def broken(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_report", broken)
    code, _, err = run(capsys, "report", "--output-dir", str(tmp_path))
    assert code == 1
    assert "Traceback (most recent call last)" in err and f"{type(exc).__name__}" in err
    assert "in broken" in err and "bug in desupcon" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_toolkit_error(tmp_path, capsys, where):
    missing = str(tmp_path / "missing.pth")
    argv = ["--debug", "analyze", missing] if where == "before" else ["analyze", missing, "--debug"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "InputFileError" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and missing in err


def test_debug_without_a_command_runs_the_plan(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_sweep", lambda args: seen.update(group=args.group, debug=args.debug))
    assert main(["--debug", "--preset", "quick"]) == 0
    assert seen == {"group": "all", "debug": True}


# ----------------------------------------------------------------------------------------------
# --config
# ----------------------------------------------------------------------------------------------

def test_config_json_round_trips(tmp_path, capsys):
    code, written, _ = run(capsys, "train", "--preset", "quick", "--alpha", "3", "--epochs", "4",
                           "--no-adaptive-beta", "--print-config")
    assert code == 0
    path = tmp_path / "run.json"
    path.write_text(written)
    code, again, _ = run(capsys, "train", "--config", str(path), "--print-config")
    assert code == 0 and again == written
    code, on_top, _ = run(capsys, "train", "--config", str(path), "--lr", "0.5", "--print-config")
    cfg = json.loads(on_top)
    assert cfg["optim"]["lr"] == 0.5 and cfg["optim"]["epochs"] == 4 and cfg["method"]["alpha"] == 3.0
    assert cfg["method"]["adaptive_beta"] is False and cfg["preset"] == "quick"
    # the same preset named again is fine; another one conflicts
    assert run(capsys, "train", "--config", str(path), "--preset", "quick", "--print-config")[0] == 0
    code, _, err = run(capsys, "train", "--config", str(path), "--preset", "paper", "--print-config")
    assert code == 2 and "conflict" in one_error_line(err)


def test_config_from_a_quick_runs_checkpoint_with_flags_on_top(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    first = cli.config_from_args(cli.build_parser().parse_args(["train", *TINY, "--output-dir", str(out)]))
    ckpt_path = pipeline.Session(first, analyze=False).run(first).checkpoint  # a CE student: no teacher
    stored = load_checkpoint(ckpt_path, "student")["config"]
    assert stored == first.to_dict()

    code, printed, _ = run(capsys, "train", "--config", str(ckpt_path), "--epochs", "2", "--print-config")
    assert code == 0
    shown = json.loads(printed)
    assert shown["optim"]["epochs"] == 2
    # everything else as stored; where and how to run come from the command line (defaults here)
    assert shown == {**stored, "optim": {**stored["optim"], "epochs": 2}, "device": "auto", "output_dir": "."}

    trained = []

    class Recorder(RecordingSession):
        def run(self, cfg, force=False, resume=True):
            trained.append(cfg)
            raise Stop()
    monkeypatch.setattr(pipeline, "Session", Recorder)
    args = cli.build_parser().parse_args(["train", "--config", str(ckpt_path), "--epochs", "2",
                                          "--device", "cpu", "--output-dir", str(out)])
    with pytest.raises(Stop):
        args.func(args)
    assert [c.to_dict() for c in trained] == [first.replace(optim={"epochs": 2}).to_dict()]


@pytest.mark.parametrize("content,expected", [
    (None, "file not found"),
    (b"\x00\x01 garbage", "neither a JSON configuration"),
    (b"{not json", "is not valid JSON"),
    (b'{"optim": {"epochs": "three"}}', "optim.epochs must be int"),
    (b'{"optimizer": {}}', "unknown setting(s) optimizer"),
    (b'[{"preset": "quick"}, {"preset": "quick"}]', "holds a list of 2 configurations"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run(capsys, "train", "--config", str(path), "--print-config")
    line = one_error_line(err)
    assert code == 2 and expected in line and str(path) in line


def test_sweep_print_config_is_refused_as_a_config(tmp_path, capsys):
    code, listing, _ = run(capsys, "sweep", "alpha", "--preset", "quick", "--print-config")
    assert code == 0
    path = tmp_path / "sweep.json"
    path.write_text(listing)
    code, _, err = run(capsys, "sweep", "alpha", "--config", str(path), "--print-config")
    assert code == 2 and "train --print-config" in one_error_line(err)


# ----------------------------------------------------------------------------------------------
# Flags a command would override are refused
# ----------------------------------------------------------------------------------------------

def test_alpha_sweep_refuses_alpha(capsys):
    code, out, err = run(capsys, "sweep", "alpha", "--alpha", "3", "--print-config")
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert "the alpha sweep sets --alpha" in line and "remove --alpha" in line


@pytest.mark.parametrize("group,flags,refused", [
    ("beta", ["--beta", "3"], "--beta"),
    ("temp", ["--temperature", "0.5"], "--temperature"),
    ("lambda", ["--lam", "0.2"], "--lam"),
    ("lambda", ["--method", "crd"], "--method"),
    ("bank", ["--bank-size", "64"], "--bank-size"),
    ("alpha", ["--bank-size", "64"], "--bank-size"),
    ("baselines", ["--method", "crd"], "--method"),
    ("all", ["--alpha", "3"], "--alpha"),
    ("all", ["--lam", "0.2"], "--lam"),
])
def test_sweep_refuses_the_settings_its_groups_set(capsys, group, flags, refused):
    code, _, err = run(capsys, "sweep", group, "--preset", "quick", *flags, "--print-config")
    assert code == 2 and f"sets {refused} itself" in one_error_line(err)


@pytest.mark.parametrize("group,flags", [
    ("alpha", ["--lam", "0.2", "--epochs", "3"]),  # the alpha sweep trains LW-SupCRD: lam is its own
    ("temp", ["--alpha", "1"]),  # the value the plan uses anyway
    ("beta", ["--kd-temperature", "2", "--no-adaptive-beta", "--lr", "0.01"]),
])
def test_sweep_keeps_the_settings_its_groups_leave_alone(capsys, group, flags):
    code, out, err = run(capsys, "sweep", group, "--preset", "quick", *flags, "--print-config")
    assert code == 0, err
    assert len(json.loads(out)) == len(experiments.group_plan(preset("quick"), group))


def test_seed_and_seeds_conflict(capsys):
    code, _, err = run(capsys, "sweep", "alpha", "--seed", "1", "--seeds", "1", "2", "--print-config")
    assert code == 2 and "--seeds" in one_error_line(err)


def test_quickstart_refuses_method(capsys):
    code, _, err = run(capsys, "quickstart", "--method", "crd", "--print-config")
    line = one_error_line(err)
    assert code == 2 and "quickstart trains every method" in line
    assert run(capsys, "quickstart", "--epochs", "1", "--print-config")[0] == 0


# ----------------------------------------------------------------------------------------------
# --no-resume reaches the runs
# ----------------------------------------------------------------------------------------------

class Stop(Exception):
    pass


class RecordingSession:
    """Stands in for pipeline.Session: records the resume switch of every call, then stops."""

    calls: list = []

    def __init__(self, cfg, *args, **kwargs):
        self.cfg = cfg

    def teacher(self, resume=True):
        RecordingSession.calls.append(("teacher", resume))
        return None, {"test_acc": 0.0}

    def analyze_teacher(self):
        return {}

    def run(self, cfg, force=False, resume=True):
        return self.run_many([cfg], force, resume)[0]

    def run_many(self, cfgs, force=False, resume=True, lockstep=True):
        RecordingSession.calls.append(("runs", resume))
        raise Stop()


@pytest.mark.parametrize("command", [["sweep", "alpha"], ["sweep", "alpha", "--lockstep"], ["quickstart"]])
@pytest.mark.parametrize("no_resume", [False, True])
def test_no_resume_reaches_every_run(tmp_path, monkeypatch, command, no_resume):
    monkeypatch.setattr(experiments, "Session", RecordingSession)
    monkeypatch.setattr(pipeline, "Session", RecordingSession)
    monkeypatch.setattr(cli, "preflight", lambda *a, **k: None)
    RecordingSession.calls = []
    extra = ["--no-resume"] if no_resume else []
    args = cli.build_parser().parse_args([*command, "--preset", "quick", "--output-dir", str(tmp_path),
                                          *extra])
    with pytest.raises(Stop):
        args.func(args)
    assert RecordingSession.calls == [("teacher", not no_resume), ("runs", not no_resume)]
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_compile_mode_implies_compile_and_reaches_torch_compile(tmp_path, monkeypatch, tiny_config):
    from desupcon.config.validation import ConfigError, validate_config
    from desupcon.engine import build
    args = cli.build_parser().parse_args(["train", "--preset", "quick", "--compile-mode", "reduce-overhead",
                                          "--output-dir", str(tmp_path)])
    cfg = cli.config_from_args(args)
    assert (cfg.compile, cfg.compile_mode) == (True, "reduce-overhead")
    plain = cli.config_from_args(cli.build_parser().parse_args(["train", "--preset", "quick"]))
    assert (plain.compile, plain.compile_mode) == (False, "default")
    with pytest.raises(ConfigError, match="--compile-mode 'fastest' is unknown"):
        validate_config(plain.replace(compile_mode="fastest"))
    modes = []
    monkeypatch.setattr(build.torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    session = pipeline.Session(tiny_config(tmp_path), analyze=False)
    teacher, _ = session.teacher()
    build.make_student_run(tiny_config(tmp_path).replace(compile=True, compile_mode="max-autotune"),
                           session.dataset, teacher, "cpu")
    assert modes == ["max-autotune"]


def test_repeated_seeds_are_refused_and_print_config_range_checks_and_shards(capsys):
    assert main(["sweep", "baselines", "--preset", "quick", "--seeds", "3", "3", "--print-config"]) == 2
    assert "--seeds repeats 3; give each seed once" in capsys.readouterr().err
    assert main(["train", "--preset", "quick", "--lr", "-1", "--print-config"]) == 2
    assert "--lr must be > 0" in capsys.readouterr().err
    assert main(["sweep", "baselines", "--preset", "quick", "--print-config"]) == 0
    every = [e["run"] for e in json.loads(capsys.readouterr().out)]
    parts = []
    for i in range(1, 5):
        assert main(["sweep", "baselines", "--preset", "quick", "--shard", f"{i}/4", "--print-config"]) == 0
        parts.append([e["run"] for e in json.loads(capsys.readouterr().out)])
    assert sorted(r for part in parts for r in part) == sorted(every) and all(len(p) < len(every) for p in parts)


def test_an_interrupted_report_does_not_speak_of_epochs(tmp_path, monkeypatch, capsys):
    from desupcon import session

    def interrupted(root):
        raise KeyboardInterrupt
    monkeypatch.setattr(session, "report", interrupted)
    assert main(["report", "--output-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted: nothing was changed by it"


def test_a_probe_records_its_result_under_the_output_dir_given(tmp_path, capsys):
    from desupcon.store.checkpoint import read_json
    trained = tmp_path / "trained"
    assert main(["train", "--preset", "quick", "--method", "ce", "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "32", "--batch-size", "32", "--device", "cpu", "--output-dir", str(trained)]) == 0
    (ckpt,) = (trained / "pth_models").glob("student_*.pth")
    records = next((trained / "json_results").glob("comprehensive_results_*.json"))
    before = records.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    assert main(["probe", str(ckpt), "--kind", "knn", "--k", "5", "--device", "cpu", "--output-dir", str(elsewhere)]) == 0
    probed = read_json(next((elsewhere / "json_results").glob("comprehensive_results_*.json")))
    assert "knn" in probed[ckpt.stem]["probes"] and records.read_bytes() == before


@pytest.mark.parametrize("failure", ["DefaultCPUAllocator: can't allocate memory: you tried to allocate 3 GB",
                                     "CUDA out of memory. Tried to allocate 2.00 GiB"])
def test_a_batch_that_does_not_fit_is_one_line(tmp_path, monkeypatch, capsys, failure):
    from desupcon.engine import graphs

    def allocation_fails(*args, **kwargs):
        raise RuntimeError(failure)
    monkeypatch.setattr(graphs, "train_step", allocation_fails)
    code = main(["train", "--preset", "quick", "--method", "ce", "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "32", "--batch-size", "32", "--device", "cpu", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1  # (progress bars end in \r)
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: out of memory (") and "--batch-size" in last


def test_another_runtime_error_is_still_an_internal_error(tmp_path, monkeypatch, capsys):
    from desupcon.engine import graphs

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(graphs, "train_step", broken)
    code = main(["train", "--preset", "quick", "--method", "ce", "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "32", "--batch-size", "32", "--device", "cpu", "--output-dir", str(tmp_path)])
    assert code == 1 and "internal error" in capsys.readouterr().err
