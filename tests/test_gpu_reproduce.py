"""scripts/gpu_reproduce.sh end to end on the CPU at toy size: the same commands a GPU session
runs (teacher by cross-entropy, an LW-SupCRD and a CE student on it, the table of every run),
with the data joined from parts as a warm GPU machine would."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from desupcon.data import ImageDataset
from desupcon.data_parts import write_parts

REPO = Path(__file__).resolve().parents[1]


def test_reproduction_script_trains_teacher_and_both_students_from_parts(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(80) % 8
    dataset = ImageDataset("toy", torch.randint(0, 256, (80, 3, 32, 32), generator=g, dtype=torch.uint8), labels,
                           torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8),
                           torch.arange(40) % 8, [f"c{i}" for i in range(8)])
    parts = write_parts(dataset, tmp_path / "written", 2)
    carry = tmp_path / "carry"
    carry.mkdir()
    env = {**os.environ, "PY": sys.executable, "DATA": str(tmp_path / "joined"), "PARTS": str(tmp_path / "kept"),
           "CARRY": str(carry),
           "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "TEACHER_EPOCHS": "1", "EPOCHS": "1",
           "EXTRA": "--teacher-arch resnet8 --student-arch resnet8 --probe-epochs 1 --bank-size 32 --batch-size 32 --teacher-batch-size 32"}
    script = str(REPO / "scripts" / "gpu_reproduce.sh")
    # first call: one part carried and kept, nothing trained
    parts[0].rename(carry / parts[0].name)
    first = subprocess.run([script], env={**env, "ONLY_CARRY": "1"}, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "kept part-1-of-2" in first.stdout, first.stderr
    assert not (tmp_path / "out").exists() and not any(carry.iterdir())
    # second call: the last part; joined, then the whole reproduction
    parts[1].rename(carry / parts[1].name)
    done = subprocess.run([script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "equal to the split source" in out
    table = [line.split()[0] for line in out.splitlines() if line.startswith(("student_", "teacher_"))]
    assert any(n.startswith("student_alpha_") for n in table), out  # the LW-SupCRD student
    assert any(n.startswith("student_undistilled_") for n in table), out  # the CE student
    assert any(n.startswith("teacher_") and "with_projection" not in n for n in table), out
    assert "(80 training images), teacher 1 epochs, students 1 epochs" in out
    assert len(list((tmp_path / "out" / "pth_models").glob("student_*.pth"))) == 2


def test_gpu_check_runs_every_check_after_a_failure_and_fails_at_the_end(tmp_path):
    """A lent GPU's 15 minutes: a failing check (here the `cuda` tests) must not cost the others."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ran: $*"\n[[ "$*" == *pytest* ]] && exit 3\nexit 0\n')
    fake.chmod(0o755)
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out")})
    ran = [line for line in done.stdout.splitlines() if line.startswith("ran: ")]
    assert done.returncode == 1 and "failed: cuda-tests" in done.stdout
    assert len(ran) == 8 and ran[-1] == "ran: scripts/gpu_check.py"  # every check after the failing one
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("ran: ") == 8


def test_gpu_check_stops_a_hanging_check_at_its_limit_and_runs_the_rest(tmp_path):
    """A check that hangs (here the graphed step profile) is stopped at its limit, named as failed,
    and the checks after it still run."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ran: $*"\n[[ "$*" == *--cuda-graphs* ]] && exec sleep 60\nexit 0\n')
    fake.chmod(0o755)
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=50,
                          env={**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out"), "CHECK_SECONDS": "2"})
    assert done.returncode == 1, done.stdout
    assert "== step-graphs FAILED (stopped after its limit of 2 s)" in done.stdout
    assert "failed: step-graphs lockstep-8-fused-graphs" in done.stdout  # both graphed profiles hang here
    ran = [line for line in done.stdout.splitlines() if line.startswith("ran: ")]
    assert len(ran) == 8 and ran[-1] == "ran: scripts/gpu_check.py"
