"""Reliability (issue 7): exact resume after a kill, atomic outputs, guarded numerics, clear errors.

The subprocess tests run the real command line (`python desupcon.py train ...`) on a tiny CPU
configuration; a teacher trained once in-process is copied into every output folder, so each
student run only trains the student. Subprocesses use one thread each (OMP_NUM_THREADS=1), which
also makes them bit-comparable with each other on any machine.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from desupcon.store import checkpoint
from desupcon.engine.finite import NonFiniteLossError
from desupcon.store.paths import OutputPaths
from desupcon.engine.dataset import prepare_dataset
from desupcon.engine.run import Run
from desupcon.engine.students import train_students
from desupcon import teacher as teacher_mod
from desupcon.store.checkpoint import (CheckpointError, OutputWriteError, atomic_torch_save,
                                 atomic_write_json, load_checkpoint, read_json, update_json_records)
from desupcon.cli import build_parser, config_from_args, main
from desupcon.config import run_name, teacher_run_name
from desupcon.store.records import records_path as comprehensive_results_path
from desupcon.models import build_encoder

REPO = Path(__file__).resolve().parents[1]
# 480 training images = 15 steps per epoch: a kill lands inside an epoch at a chosen step.
ARGS = ["--preset", "quick", "--train-subset", "480", "--test-subset", "64", "--teacher-arch", "resnet8",
        "--epochs", "3", "--teacher-epochs", "1", "--probe-epochs", "1", "--batch-size", "32",
        "--device", "cpu"]
SMALL = ["--preset", "quick", "--train-subset", "160", "--test-subset", "64", "--teacher-arch", "resnet8",
         "--epochs", "2", "--teacher-epochs", "1", "--probe-epochs", "1", "--batch-size", "32",
         "--teacher-batch-size", "32", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli_config(args, output_dir, *extra):
    return config_from_args(build_parser().parse_args(["train", *args, "--output-dir", str(output_dir), *extra]))


def command(output_dir, *extra):
    return [sys.executable, str(REPO / "desupcon.py"), "train", *ARGS, "--output-dir", str(output_dir), *extra]


def run_cli(output_dir, *extra, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(command(output_dir, *extra), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def copy_teacher(src: Path, dst: Path) -> None:
    (dst / "pth_models").mkdir(parents=True, exist_ok=True)
    for f in (src / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(f, dst / "pth_models" / f.name)


def without_seconds(obj):
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k not in ("seconds", "group_seconds")}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def strict_json(path: Path):
    """Parse JSON refusing NaN/Infinity (which Python's json would otherwise accept)."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def assert_no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine more threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Fixtures: a teacher trained once, an uninterrupted reference run of the command line
# ----------------------------------------------------------------------------------------------

def _trained_teacher_dir(root: Path, args) -> Path:
    cfg = cli_config(args, root)
    dataset = prepare_dataset(cfg, torch.device("cpu"))
    teacher_mod.load_or_train_teacher(cfg, dataset, torch.device("cpu"))
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return _trained_teacher_dir(tmp_path_factory.mktemp("teacher"), ARGS)


@pytest.fixture(scope="module")
def small_teacher_dir(tmp_path_factory) -> Path:
    return _trained_teacher_dir(tmp_path_factory.mktemp("small_teacher"), SMALL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir) -> dict:
    root = tmp_path_factory.mktemp("reference")
    copy_teacher(teacher_dir, root)
    done = run_cli(root)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = cli_config(ARGS, root)
    paths = OutputPaths(root)
    return {"root": root, "cfg": cfg, "name": run_name(cfg), "paths": paths,
            "ckpt": load_checkpoint(paths.checkpoint(run_name(cfg)), "student")}


def assert_equals_reference(root: Path, ref: dict) -> None:
    paths, name = OutputPaths(root), ref["name"]
    ckpt = load_checkpoint(paths.checkpoint(name), "student")
    assert_same_tensors(ckpt["student"], ref["ckpt"]["student"], "student")
    assert_same_tensors(ckpt["teacher_head"], ref["ckpt"]["teacher_head"], "teacher head")
    assert without_seconds(ckpt["metrics"]) == without_seconds(ref["ckpt"]["metrics"])
    assert without_seconds(ckpt["log"]) == without_seconds(ref["ckpt"]["log"])
    assert "analysis" not in ckpt  # measured results go to the records only
    log_file = strict_json(paths.training_log(name))
    assert without_seconds(log_file) == without_seconds(strict_json(ref["paths"].training_log(name)))
    results = strict_json(comprehensive_results_path(paths, "resnet8", "digits"))[name]
    ref_results = strict_json(comprehensive_results_path(ref["paths"], "resnet8", "digits"))[name]
    for key in ("accuracy", "metrics"):
        assert results[key] == ref_results[key], key
    assert not paths.partial_checkpoint(name).exists()
    assert not list(root.rglob("*.tmp")), "temporary files left behind"


# ----------------------------------------------------------------------------------------------
# Exact resume after SIGKILL (mid-epoch, and during a checkpoint write)
# ----------------------------------------------------------------------------------------------

KILLER = r"""
import os, signal, sys
from desupcon.engine.run import Run
from desupcon.engine.students import train_students
epoch, step = int(sys.argv[1]), int(sys.argv[2])
real_step = Run.step

def step_or_death(self, *args, **kwargs):  # SIGKILL this process just before a student's (epoch, step)
    if self.name.startswith("student") and self.epoch + 1 == epoch and self._steps + 1 == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args, **kwargs)

Run.step = step_or_death
from desupcon.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_mid_epoch_then_restart_equals_uninterrupted_run(tmp_path, teacher_dir, reference):
    copy_teacher(teacher_dir, tmp_path)
    paths, name = OutputPaths(tmp_path), reference["name"]
    partial = paths.partial_checkpoint(name)
    argv = ["train", *ARGS, "--output-dir", str(tmp_path)]
    # Killed at a chosen point: after step 2 of epoch 2 (of 15), before step 3.
    killed = subprocess.run([sys.executable, "-c", KILLER, "2", "3", *argv], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert partial.is_file(), f"no epoch checkpoint after epoch 1:\n{killed.stderr[-3000:]}"
    # Killed inside epoch 2: one finished epoch on disk, no final checkpoint.
    state = torch.load(partial, weights_only=True)  # the epoch checkpoint loads safely
    assert state["epoch"] == 1 and len(state["log"]) == 1
    assert len(strict_json(paths.training_log(name))) == 1, "the kill landed after epoch 2 ended"
    assert not paths.checkpoint(name).exists()
    # A corrupted training log of a run being resumed is rewritten: the log lives in the checkpoint.
    paths.training_log(name).write_text('[{"epoch": 1, "loss": ')

    again = run_cli(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[{name}] resuming after epoch 1" in again.stderr
    assert_equals_reference(tmp_path, reference)


DRIVER = r"""
import os, sys, time
target, nth = sys.argv[1], int(sys.argv[2])
real_replace, calls = os.replace, [0]

def replace(src, dst, *args, **kwargs):  # stall the rename of the nth write of `target`
    if os.path.abspath(dst) == target:
        calls[0] += 1
        if calls[0] == nth:
            print("WRITING", src, flush=True)
            time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from desupcon.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, teacher_dir, reference):
    """Killed between writing the epoch-2 checkpoint's temporary file and renaming it: the epoch-1
    checkpoint still loads, the run resumes from it and ends identical to the uninterrupted run,
    and the dead writer's temporary file is cleaned by a later write."""
    copy_teacher(teacher_dir, tmp_path)
    paths, name = OutputPaths(tmp_path), reference["name"]
    partial = paths.partial_checkpoint(name)
    argv = ["train", *ARGS, "--output-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(partial.resolve()), "2", *argv], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING"), f"the driver ended without writing: {line!r}"
        tmp_file = Path(line.split(maxsplit=1)[1].strip())
        assert tmp_file.is_file() and tmp_file.parent == partial.parent
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(partial, "in_progress")
    assert state["epoch"] == 1, "the previous epoch checkpoint must be intact"
    assert tmp_file.exists(), "the killed writer's temporary file should still be there"
    old = time.time() - 3600  # a leftover older than the grace period is cleaned by the next write
    os.utime(tmp_file, (old, old))

    again = run_cli(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[{name}] resuming after epoch 1" in again.stderr
    assert not tmp_file.exists()
    assert_equals_reference(tmp_path, reference)


def test_every_checkpoint_loads_with_weights_only(reference):
    files = sorted(reference["root"].rglob("*.pth"))
    kinds = set()
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        kinds.add(ckpt["kind"])
        json.dumps(ckpt.get("config"))  # configuration is plain data
    assert {"student", "teacher", "teacher_projection"} <= kinds, kinds
    for path in reference["root"].rglob("*.json"):
        strict_json(path)
    assert not list(reference["root"].rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Exact resume in-process (students in lockstep with a bank; the teacher)
# ----------------------------------------------------------------------------------------------

class Crash(KeyboardInterrupt):
    pass


def _crash_at(monkeypatch, epoch: int, step: int):
    """Make Run.step raise (like a kill) at 1-based `epoch` and `step`."""
    real = Run.step

    def crashing_step(self, *args, **kwargs):
        if self.epoch + 1 == epoch and self._steps + 1 == step:
            raise Crash()
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Run, "step", crashing_step)


def test_exact_resume_in_process_lockstep_with_bank(tmp_path, small_teacher_dir, monkeypatch):
    cfg = cli_config(SMALL, tmp_path / "a", "--epochs", "3")
    dataset = prepare_dataset(cfg, torch.device("cpu"))
    teacher, _ = teacher_mod.load_or_train_teacher(cli_config(SMALL, small_teacher_dir), dataset, torch.device("cpu"))
    variants = [{"method": "lw-supcrd", "bank_size": 64}, {"method": "hybrid", "bank_size": 64, "lam": 0.3}]

    def configs(root):
        base = cfg.replace(output_dir=str(root))
        return [base.replace(method=v) for v in variants]

    full = train_students(configs(tmp_path / "a"), dataset, teacher, torch.device("cpu"))
    with monkeypatch.context() as m:
        _crash_at(m, epoch=2, step=3)
        with pytest.raises(Crash):
            train_students(configs(tmp_path / "b"), dataset, teacher, torch.device("cpu"))
    paths = OutputPaths(tmp_path / "b")
    for c in configs(tmp_path / "b"):
        assert load_checkpoint(paths.partial_checkpoint(run_name(c)), "in_progress")["epoch"] == 1
    resumed = train_students(configs(tmp_path / "b"), dataset, teacher, torch.device("cpu"))
    for a, b in zip(full, resumed):
        ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
        assert_same_tensors(ca["student"], cb["student"], a.name)
        assert_same_tensors(ca["teacher_head"], cb["teacher_head"], a.name)
        assert without_seconds(ca["log"]) == without_seconds(cb["log"])
        assert not paths.partial_checkpoint(b.name).exists()
    assert not (paths.models / "in_progress").exists()


def test_no_resume_starts_over(tmp_path, small_teacher_dir, monkeypatch):
    cfg = cli_config(SMALL, tmp_path, "--method", "ce")
    dataset = prepare_dataset(cfg, torch.device("cpu"))
    with monkeypatch.context() as m:
        _crash_at(m, epoch=2, step=2)
        with pytest.raises(Crash):
            train_students([cfg], dataset, None, torch.device("cpu"))
    seen = []
    real = Run.load_training_state
    monkeypatch.setattr(Run, "load_training_state",
                        lambda self, *a: seen.append(self.name) or real(self, *a))
    result = train_students([cfg], dataset, None, torch.device("cpu"), resume=False)
    assert seen == [] and len(result[0].log) == 2 and not result[0].cached


def test_teacher_training_resumes_exactly(tmp_path, monkeypatch):
    cfg = cli_config(SMALL, tmp_path / "a", "--teacher-epochs", "3")
    dataset = prepare_dataset(cfg, torch.device("cpu"))
    ref, ref_log = teacher_mod.train_teacher_encoder(cfg, dataset, torch.device("cpu"), OutputPaths(tmp_path / "a"))

    calls = {"n": 0}
    real_ce = torch.nn.functional.cross_entropy

    def crashing_ce(*args, **kwargs):  # the 8th teacher step is in epoch 2 (5 steps per epoch)
        calls["n"] += 1
        if calls["n"] == 8:
            raise Crash()
        return real_ce(*args, **kwargs)
    paths = OutputPaths(tmp_path / "b")
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "cross_entropy", crashing_ce)
        with pytest.raises(Crash):
            teacher_mod.train_teacher_encoder(cfg, dataset, torch.device("cpu"), paths)
    name = teacher_run_name(cfg)
    assert load_checkpoint(paths.partial_checkpoint(name), "in_progress")["epoch"] == 1
    encoder, log = teacher_mod.train_teacher_encoder(cfg, dataset, torch.device("cpu"), paths)
    assert_same_tensors(encoder.state_dict(), ref.state_dict(), "teacher")
    assert without_seconds(log) == without_seconds(ref_log)
    # The final teacher checkpoint replaces the epoch checkpoint.
    teacher_mod.load_or_train_teacher(cfg.replace(output_dir=str(tmp_path / "b")), dataset, torch.device("cpu"))
    assert not paths.partial_checkpoint(name).exists()


# ----------------------------------------------------------------------------------------------
# Non-finite loss / gradients
# ----------------------------------------------------------------------------------------------

def test_absurd_learning_rate_stops_with_a_clear_message(tmp_path, small_teacher_dir, capsys):
    weights = tmp_path / "teacher_weights.pth"  # keeps the absurd lr away from the teacher
    name = teacher_run_name(cli_config(SMALL, small_teacher_dir))
    torch.save(load_checkpoint(small_teacher_dir / "pth_models" / f"{name}.pth")["encoder"], weights)
    out = tmp_path / "out"
    code = main(["train", *SMALL, "--output-dir", str(out), "--teacher-weights", str(weights), "--lr", "1e10"])
    err = capsys.readouterr().err
    assert code != 0
    assert_no_traceback(err)
    line = [x for x in err.splitlines() if x.startswith("error:")][0]
    cfg = cli_config(SMALL, out, "--teacher-weights", str(weights), "--lr", "1e10")
    assert run_name(cfg) in line and "non-finite" in line
    assert "epoch 1, step" in line and "--lr" in line and "--temperature" in line and "--alpha" in line
    assert not OutputPaths(out).checkpoint(run_name(cfg)).exists()
    for path in out.rglob("*.json"):
        strict_json(path)


def _poison_at(monkeypatch, epoch: int, step: int, name_part: str = "", where: str = "input"):
    """Make a real non-finite loss (NaN input) or gradient (NaN grad hook) at one step."""
    real = Run.step

    def poisoned_step(self, indices, view1, views, labels, teacher_out):
        if name_part in self.name and self.epoch + 1 == epoch and self._steps + 1 == step:
            if where == "input":
                view1, views = view1 * math.nan, views * math.nan
            else:
                param = next(self.student.parameters())
                handle = param.register_hook(lambda g: g * math.nan)
                try:
                    return real(self, indices, view1, views, labels, teacher_out)
                finally:
                    handle.remove()
        return real(self, indices, view1, views, labels, teacher_out)
    monkeypatch.setattr(Run, "step", poisoned_step)


@pytest.mark.parametrize("where,what", [("input", "non-finite loss (nan)"), ("grad", "non-finite gradients")])
def test_non_finite_keeps_last_good_checkpoint_and_writes_no_nan(tmp_path, small_teacher_dir,
                                                                  monkeypatch, where, what):
    cfg = cli_config(SMALL, tmp_path, "--epochs", "3")
    dataset = prepare_dataset(cfg, torch.device("cpu"))
    teacher, _ = teacher_mod.load_or_train_teacher(cli_config(SMALL, small_teacher_dir), dataset, torch.device("cpu"))
    bad, good = cfg.replace(method={"method": "crd"}), cfg.replace(method={"method": "lw-supcrd"})
    _poison_at(monkeypatch, epoch=2, step=3, name_part="crd", where=where)
    with pytest.raises(NonFiniteLossError) as info:
        train_students([bad, good], dataset, teacher, torch.device("cpu"))
    message, paths = str(info.value), OutputPaths(tmp_path)
    assert message.startswith(f"run {run_name(bad)}: {what}") and "at epoch 2, step 3" in message
    partial = paths.partial_checkpoint(run_name(bad))
    assert f"after epoch 1) is kept in {partial}" in message
    state = load_checkpoint(partial, "in_progress")  # the last good epoch checkpoint, intact
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(strict_json(paths.training_log(run_name(bad)))) == 1
    assert not paths.checkpoint(run_name(bad)).exists()
    # The other run in lockstep went on to the end and was saved.
    assert load_checkpoint(paths.checkpoint(run_name(good)), "student")["metrics"]["epochs"] == 3
    for path in tmp_path.rglob("*.json"):
        strict_json(path)


def test_nan_is_never_written_as_json(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"ok": 1.0})
    for bad in (math.nan, math.inf, {"a": [1.0, -math.inf]}):
        with pytest.raises(ValueError, match="non-finite"):
            atomic_write_json(target, {"run": bad})
    assert strict_json(target) == {"ok": 1.0}
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Validation: one test per rule, through the command line
# ----------------------------------------------------------------------------------------------

def cli_error(capsys, tmp_path, *extra, args=SMALL) -> str:
    out = tmp_path / "out"
    code = main(["train", *args, "--output-dir", str(out), *extra])
    err = capsys.readouterr().err
    assert code != 0, err
    assert_no_traceback(err)
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, err
    return err[err.index("error: "):]


@pytest.mark.parametrize("flag,value,expected", [
    ("--temperature", "0", "--temperature must be > 0"),
    ("--temperature", "-0.1", "--temperature must be > 0"),
    ("--alpha", "0", "--alpha must be > 0"),
    ("--beta", "-1", "--beta must be >= 0"),
    ("--lam", "-0.1", "--lam must be in [0, 1]"),
    ("--lam", "1.5", "--lam must be in [0, 1]"),
    ("--bank-momentum", "1", "--bank-momentum must be in [0, 1)"),
    ("--bank-momentum", "-0.5", "--bank-momentum must be in [0, 1)"),
    ("--kd-temperature", "0", "--kd-temperature must be > 0"),
    ("--epochs", "0", "--epochs must be >= 1"),
    ("--lr", "0", "--lr must be > 0"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--temperature", "nan", "--temperature must be a finite number"),
])
def test_invalid_setting_is_rejected_before_anything_runs(tmp_path, capsys, flag, value, expected):
    message = cli_error(capsys, tmp_path, flag, value)
    assert expected in message
    assert not (tmp_path / "out").exists(), "nothing may be written for an invalid setting"


def test_bank_larger_than_training_set(tmp_path, capsys):
    message = cli_error(capsys, tmp_path, "--bank-size", "100000")
    assert "--bank-size 100000" in message and "160" in message
    assert not list((tmp_path / "out").rglob("*.pth"))


@pytest.mark.parametrize("flag,value,known", [
    ("--teacher-arch", "resnet9000", ["resnet8", "resnet18", "resnet50", "resnet32x4"]),
    ("--student-arch", "vgg", ["resnet8", "resnet18"]),
    ("--method", "simclr", ["ce", "supcon", "crd", "lw-supcrd", "hybrid"]),
    ("--dataset", "imagenet", ["cifar100", "cifar10", "digits", "npz:"]),
])
def test_unknown_name_lists_the_known_ones(tmp_path, capsys, flag, value, known):
    message = cli_error(capsys, tmp_path, flag, value)
    assert flag in message and value in message
    for name in known:
        assert name in message


@pytest.mark.parametrize("classes", [100, 5])
def test_teacher_weights_with_another_class_count(tmp_path, capsys, classes):
    weights = tmp_path / f"resnet8_{classes}_classes.pth"
    torch.save(build_encoder("resnet8", classes).state_dict(), weights)
    message = cli_error(capsys, tmp_path, "--teacher-weights", str(weights))
    assert str(weights) in message and f"for {classes} classes" in message
    assert "digits has 10 classes" in message


def test_missing_dataset_offline_says_where_to_put_it(tmp_path, capsys):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    message = cli_error(capsys, tmp_path, "--dataset", "cifar100", "--data-root", str(empty), "--no-download")
    assert str(empty / "cifar-100-python") in message and "--download" in message


def test_output_dir_below_a_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "sub"
    code = main(["train", *SMALL, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and str(out) in err and "not writable" in err
    assert_no_traceback(err)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod does not stop root from writing")
def test_read_only_output_dir(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code = main(["train", *SMALL, "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code != 0 and str(out) in err and "not writable" in err
        assert_no_traceback(err)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.pth"
    atomic_torch_save(target, {"format": checkpoint.CHECKPOINT_FORMAT, "kind": "x", "v": torch.ones(3)})

    def no_space(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputWriteError) as info:
        atomic_torch_save(target, {"format": checkpoint.CHECKPOINT_FORMAT, "kind": "x", "v": torch.zeros(3)})
    assert str(target) in str(info.value) and "full" in str(info.value)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(target)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


# ----------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def real_weights(tmp_path) -> Path:
    path = tmp_path / "resnet8_digits.pth"
    torch.save(build_encoder("resnet8", 10).state_dict(), path)
    return path


def test_truncated_teacher_weights(tmp_path, capsys, real_weights):
    data = real_weights.read_bytes()
    real_weights.write_bytes(data[: len(data) // 2])
    message = cli_error(capsys, tmp_path, "--teacher-weights", str(real_weights))
    assert str(real_weights) in message and "truncated" in message


def test_random_bytes_as_teacher_weights(tmp_path, capsys):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(4096))
    message = cli_error(capsys, tmp_path, "--teacher-weights", str(path))
    assert str(path) in message and "not a readable PyTorch checkpoint" in message


def test_teacher_weights_of_another_architecture(tmp_path, capsys):
    path = tmp_path / "resnet20_digits.pth"
    torch.save(build_encoder("resnet20", 10).state_dict(), path)
    message = cli_error(capsys, tmp_path, "--teacher-weights", str(path))
    assert str(path) in message and "a resnet20 state dict, but --teacher-arch is resnet8" in message


def test_pickled_object_is_refused(tmp_path, capsys):
    path = tmp_path / "pickled.pth"
    torch.save(build_encoder("resnet8", 10), path)  # a whole pickled module, not a state dict
    message = cli_error(capsys, tmp_path, "--teacher-weights", str(path))
    assert str(path) in message and "weights_only" in message


def test_corrupted_cached_checkpoint(tmp_path, capsys, small_teacher_dir):
    out = tmp_path / "out"
    copy_teacher(small_teacher_dir, out)
    teacher_file = out / "pth_models" / f"{teacher_run_name(cli_config(SMALL, out), with_projection=True)}.pth"
    data = teacher_file.read_bytes()
    teacher_file.write_bytes(data[:1000])
    message = cli_error(capsys, tmp_path)
    assert str(teacher_file) in message and "truncated" in message and "--force" in message
    assert teacher_file.read_bytes() == data[:1000], "a broken file is reported, not replaced"


def test_corrupted_epoch_checkpoint(tmp_path, capsys, small_teacher_dir):
    out = tmp_path / "out"
    copy_teacher(small_teacher_dir, out)
    cfg = cli_config(SMALL, out)
    partial = OutputPaths(out).partial_checkpoint(run_name(cfg))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"PK\x03\x04 not really a zip")
    message = cli_error(capsys, tmp_path)
    assert str(partial) in message and "--no-resume" in message


def test_corrupted_comprehensive_results_fail_before_training(tmp_path, capsys, small_teacher_dir):
    out = tmp_path / "out"
    copy_teacher(small_teacher_dir, out)
    cfg = cli_config(SMALL, out)
    results = comprehensive_results_path(OutputPaths(out), "resnet8", "digits")
    results.parent.mkdir(parents=True)
    results.write_text('{"other_run": {"accuracy": {"test_acc": 51.0}}, "trunc')
    before = results.read_bytes()
    message = cli_error(capsys, tmp_path)
    assert str(results) in message and "not valid JSON" in message
    assert results.read_bytes() == before, "other runs' records must not be overwritten"
    assert not OutputPaths(out).checkpoint(run_name(cfg)).exists(), "failed before training"
    with pytest.raises(CheckpointError, match="not valid JSON"):
        update_json_records(results, "new_run", {"accuracy": {}})
    assert results.read_bytes() == before


def test_results_file_of_the_wrong_shape(tmp_path):
    results = tmp_path / "comprehensive_results_resnet8_digits.json"
    results.write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="expected an object"):
        update_json_records(results, "run", {})
    assert read_json(results) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Concurrent writers of the comprehensive results; leftovers of killed writers
# ----------------------------------------------------------------------------------------------

def _writer(path: str, key: str, rounds: int) -> None:
    for i in range(rounds):
        update_json_records(path, key, {"round": i, "pid": os.getpid()})


def test_concurrent_processes_keep_each_others_records(tmp_path):
    path = tmp_path / "json_results" / "comprehensive_results_resnet8_digits.json"
    update_json_records(path, "existing", {"round": -1})
    ctx = multiprocessing.get_context("fork")
    keys = [f"run_{i}" for i in range(4)]
    procs = [ctx.Process(target=_writer, args=(str(path), key, 25)) for key in keys]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = strict_json(path)
    assert set(records) == {"existing", *keys}
    assert all(records[k]["round"] == 24 for k in keys)
    assert not list(path.parent.glob("*.tmp"))


def test_stale_temporary_files_are_cleaned_only_when_their_writer_is_gone(tmp_path):
    target = tmp_path / "x.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".x.json.{dead}.abcd1234.tmp"
    alive = tmp_path / f".x.json.{os.getppid()}.efgh5678.tmp"  # a live process's write in flight
    fresh = tmp_path / f".x.json.{dead}.ijkl9012.tmp"  # too recent: maybe another host's writer
    old = time.time() - 3600
    for f in (stale, alive, fresh):
        f.write_text("partial")
    for f in (stale, alive):
        os.utime(f, (old, old))
    atomic_write_json(target, {"a": 1})
    assert not stale.exists() and alive.exists() and fresh.exists()
    assert strict_json(target) == {"a": 1}


def test_plots_go_through_the_atomic_writer(tmp_path, monkeypatch):
    """A failing write of a picture leaves the previous picture and no temporary file."""
    from desupcon.analysis import plots
    target = tmp_path / "curves.png"
    entries = [{"epoch": e, "loss": 1.0 / e, "train_acc": 10.0 * e, "test_acc": 9.0 * e, "lr": 1e-3}
               for e in (1, 2, 3)]
    plots.plot_training_curves(entries, target, title="t")
    before = target.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        plots.plot_training_curves(entries[:2], target, title="t")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
