"""Several processes on one output folder and interrupted writes (issue 22): each run is trained
by one process (the other waits and loads it), a lost record is rebuilt from the checkpoint, and
temporary files of killed writes are removed once a later run completes."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from desupcon.store.checkpoint import read_json
from desupcon.session import Session

REPO = Path(__file__).resolve().parents[1]


def test_two_concurrent_sweeps_train_each_run_once(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(REPO / "desupcon.py"), "sweep", "baselines", "--preset", "quick", "--device", "cpu",
            "--train-subset", "96", "--test-subset", "32", "--epochs", "2", "--teacher-epochs", "1",
            "--probe-epochs", "1", "--no-plots", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    text = "\n".join(outputs)
    trained = re.findall(r"^\[(student_[^\]]+)\] epoch 1/2", text, flags=re.M)
    assert len(trained) == 4 and len(set(trained)) == 4, trained  # the four baselines, once each
    teacher_epochs = re.findall(r"^\[(teacher_[^\]]+)\] epoch 1/1", text, flags=re.M)
    assert len(teacher_epochs) <= 1 + 1  # the teacher's training (and its probe) once, not twice
    assert len(set(teacher_epochs)) == len(teacher_epochs)
    assert "being trained by another process" in text
    assert not (out / "pth_models" / "in_progress").exists()


def test_a_lost_record_is_rebuilt_from_the_checkpoint(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, epochs=1).replace(method={"method": "ce"})
    result = Session(cfg).run(cfg)
    [records_file] = (tmp_path / "json_results").glob("comprehensive_results_*.json")
    records = read_json(records_file)
    kept = records.pop(result.name)
    records_file.write_text(__import__("json").dumps(records))  # what a kill mid-update would leave
    again = Session(cfg).run(cfg)
    assert again.cached
    rebuilt = read_json(records_file)[result.name]
    assert rebuilt["accuracy"] == kept["accuracy"] and rebuilt["test_predictions"] == kept["test_predictions"]


def test_temporaries_of_killed_writes_are_removed_after_a_run_completes(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, epochs=1).replace(method={"method": "ce"})
    stale = []
    for folder in ("pth_models", "pth_models/in_progress", "json_results"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        path = tmp_path / folder / ".student_other_run.pth.99999999.k3j4h5.tmp"  # a dead writer's
        path.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(path, (old, old))
        stale.append(path)
    fresh = tmp_path / "json_results" / f".live.json.{os.getpid()}.abc.tmp"  # this process's: kept
    fresh.write_bytes(b"x")
    Session(cfg).run(cfg)
    assert not any(p.exists() for p in stale)
    assert fresh.exists()



def test_a_stale_epoch_checkpoint_of_a_finished_run_is_removed(tmp_path, tiny_config):
    """A kill between the final save and the clean-up leaves the epoch checkpoint beside the
    finished run; the next session that loads the run removes it."""
    import shutil
    cfg = tiny_config(tmp_path, epochs=1).replace(method={"method": "ce"})
    result = Session(cfg, analyze=False).run(cfg)
    partial = tmp_path / "pth_models" / "in_progress" / f"{result.name}.pth"
    partial.parent.mkdir(parents=True)
    shutil.copy2(result.checkpoint, partial)
    assert Session(cfg, analyze=False).run(cfg).cached
    assert not partial.exists() and not partial.parent.exists()


def test_analyze_and_probe_a_read_only_checkpoint(tmp_path, tiny_config, monkeypatch, capsys):
    """A checkpoint that cannot be rewritten (a read-only share; simulated: root ignores chmod)
    is analysed and probed all the same: the results go to the records, the file stays as it is."""
    import errno
    from desupcon.store import checkpoint
    from desupcon.cli import main
    cfg = tiny_config(tmp_path, epochs=1).replace(method={"method": "ce"})
    result = Session(cfg, analyze=False).run(cfg)
    before = result.checkpoint.read_bytes()
    real = checkpoint.atomic_torch_save

    def read_only(path, obj, *args, **kwargs):
        if str(path) == str(result.checkpoint):
            raise checkpoint._write_error(result.checkpoint, OSError(errno.EROFS, "Read-only file system"))
        return real(path, obj, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "atomic_torch_save", read_only)
    assert main(["analyze", str(result.checkpoint), "--output-dir", str(tmp_path), "--no-plots",
                 "--device", "cpu"]) == 0
    assert main(["probe", str(result.checkpoint), "--kind", "knn", "--output-dir", str(tmp_path),
                 "--device", "cpu"]) == 0
    assert result.checkpoint.read_bytes() == before
    [records_file] = (tmp_path / "json_results").glob("comprehensive_results_*.json")
    record = read_json(records_file)[result.name]
    assert "uniformity" in record["metrics"] and "knn" in record["probes"]
