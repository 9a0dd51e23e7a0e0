"""Sweeps split across processes (`--shard I/N`), `train --method two-stage` and `probe`."""

import json

import pytest

from desupcon import plan as experiments
from desupcon.store.checkpoint import load_checkpoint
from desupcon.cli import main
from desupcon.config import preset, run_name


@pytest.mark.parametrize("lockstep", [False, True])
def test_shards_are_disjoint_cover_the_plan_and_keep_lockstep_groups(lockstep):
    planned = experiments.plan(preset("quick"), "all", seeds=[0, 1, 2])
    names = {run_name(e.cfg) for e in planned}
    parts = [experiments.shard_plan(planned, (i, 3), lockstep) for i in (1, 2, 3)]
    part_names = [{run_name(e.cfg) for e in p} for p in parts]
    assert set().union(*part_names) == names
    assert sum(len(p) for p in part_names) == len(names), "a run is in two shards"
    if lockstep:
        for p in parts:  # every lockstep group lies in one shard
            keys = {e.cfg.lockstep_key() for e in p}
            others = [e.cfg.lockstep_key() for q in parts if q is not p for e in q]
            assert not keys & set(others)
    else:
        assert all(part_names), "each shard has work"


@pytest.mark.parametrize("size", [None, 2, 5])
def test_lockstep_shards_give_every_process_work(size):
    """The paper plan with one seed is two lockstep groups (paper, paper-bank): 4 shards all get
    runs, by pieces of groups (`lockstep_size`), each run in exactly one shard."""
    planned = experiments.plan(preset("paper"), "all")
    names = {run_name(e.cfg) for e in planned}
    assert len({e.cfg.lockstep_key() for e in planned}) == 2
    parts = [experiments.shard_plan(planned, (i, 4), lockstep=True, lockstep_size=size) for i in (1, 2, 3, 4)]
    part_names = [{run_name(e.cfg) for e in p} for p in parts]
    assert set().union(*part_names) == names and sum(map(len, part_names)) == len(names)
    assert all(part_names), "a shard got nothing"
    assert max(map(len, part_names)) <= 6  # 19 runs over 4 shards: no shard takes a whole group


def _tiny_flags(out):
    return ["--preset", "quick", "--train-subset", "96", "--test-subset", "32", "--teacher-arch", "resnet8",
            "--epochs", "1", "--teacher-epochs", "1", "--probe-epochs", "1", "--batch-size", "32",
            "--teacher-batch-size", "32", "--device", "cpu", "--output-dir", str(out)]


def test_two_shards_train_each_run_of_the_alpha_sweep_once(tmp_path, trained_students):
    trained = trained_students
    for shard in ("1/2", "2/2"):
        assert main(["sweep", "alpha", *_tiny_flags(tmp_path), "--no-plots", "--shard", shard]) == 0
    assert len(trained) == 4 and len(set(trained)) == 4
    assert main(["sweep", "alpha", "--shard", "3/2", *_tiny_flags(tmp_path)]) == 2


def test_two_stage_and_probes_from_the_command_line(tmp_path, capsys):
    assert main(["train", *_tiny_flags(tmp_path), "--method", "two-stage", "--phase2-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "two-stage phase 2" in out
    student = next((tmp_path / "pth_models").glob("student_twostage_*.pth"))
    assert main(["train", *_tiny_flags(tmp_path), "--method", "kd"]) == 0
    kd_run = next((tmp_path / "pth_models").glob("student_kd_*.pth"))
    for kind in ("linear", "knn", "kd"):
        assert main(["probe", str(kd_run), "--kind", kind, "--epochs", "1", "--output-dir", str(tmp_path),
                     "--device", "cpu"]) == 0
        assert f"{kind} probe top-1" in capsys.readouterr().out
    ckpt = load_checkpoint(kd_run)
    assert "probes" not in ckpt  # the records hold them
    records = json.loads(next((tmp_path / "json_results").glob("comprehensive_results_*.json")).read_text())
    assert set(records[ckpt["name"]]["probes"]) == {"linear", "knn", "kd"}
    assert records[ckpt["name"]]["accuracy"]["test_acc"] == ckpt["metrics"]["test_acc"]
    assert main(["report", "--output-dir", str(tmp_path)]) == 0
    assert "two-stage (CRD phase 1, KD probe)" in capsys.readouterr().out
    assert student.is_file()


def test_tensorboard_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = ["train", *_tiny_flags(tmp_path), "--method", "lw-supcrd", "--tensorboard"]
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0
    folders = [p for p in (tmp_path / "tensorboard").iterdir() if p.name.startswith("student_")]
    assert len(folders) == 1
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss/total", "accuracy/test", "accuracy/train", "lr", "loss/lw_supcrd"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    log = json.loads(next((tmp_path / "json_results" / "training_logs").glob("student_*.json")).read_text())
    assert [e.value for e in events.Scalars("accuracy/test")] == pytest.approx([e["test_acc"] for e in log])
    assert "analysis/uniformity" in scalars and "analysis/backbone/uniformity" in scalars


def test_wandb_offline_one_run_per_training_run(tmp_path, monkeypatch):
    """The real wandb package in offline mode: each training run is one W&B run (the analysis
    afterwards writes into the same run id), with the epochs' scalars and the analysis summary."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["sweep", "baselines", *_tiny_flags(tmp_path), "--wandb", "--no-plots"]
    args = [a for a in args if a not in ("--method",)]
    assert main(args) == 0
    runs = [p for p in (tmp_path / "wandb").glob("offline-run-*") if p.is_dir()]
    ids = [next(p.glob("run-*.wandb")).stem[len("run-"):] for p in runs]  # a reopened run: a new folder
    students = list((tmp_path / "pth_models").glob("student_*.pth"))
    from desupcon.engine.tracking import wandb_run_id
    student_ids = {wandb_run_id(p.stem, tmp_path) for p in students}
    assert len(students) == 4 and student_ids <= set(ids)
    # the 4 students, the teacher's training and its probe: 6 runs; a student's analysis reopens its run
    assert len(set(ids)) == 6, sorted(p.name for p in runs)
