"""Configuration files (issue 22): `--config` reads JSON, YAML and every checkpoint kind (a two-stage
one included), and the shipped configs/ (one file per published table and per standard pair)
resolve and match the presets they are written from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from desupcon.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def _printed(capsys, *argv):
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_published_table_and_pair_has_a_file():
    names = {str(p.relative_to(REPO / "configs")) for p in SHIPPED}
    assert {"paper_main.yaml", "paper_hybrid.yaml", "paper_bank.yaml", "sdd_lskd.yaml", "two_stage.yaml"} <= names
    assert len([n for n in names if n.startswith("pairs/")]) == 13


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_resolves(capsys, path):
    printed = _printed(capsys, "--config", str(path))
    stored = yaml.safe_load(path.read_text())
    for section in ("data", "model", "method", "optim", "teacher"):
        assert printed[section] == stored[section], section
    if "two_stage" in stored:
        assert printed["two_stage"] == stored["two_stage"]


def test_shipped_configs_are_what_the_presets_give():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "write_configs.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_pair_files_carry_the_pair_settings(capsys):
    cfg = _printed(capsys, "--config", str(REPO / "configs" / "pairs" / "vgg13-MobileNetV2.yaml"))
    assert cfg["model"] == {**cfg["model"], "teacher_arch": "vgg13", "student_arch": "MobileNetV2",
                            "teacher_weights": "released"}
    assert cfg["optim"]["lr"] == 0.01 and cfg["method"]["dkd_beta"] == 6.0 and cfg["method"]["method"] == "dkd"


def test_yaml_and_json_read_the_same(tmp_path, capsys):
    as_json = _printed(capsys, "--preset", "quick", "--method", "kd", "--epochs", "3")
    (tmp_path / "c.json").write_text(json.dumps(as_json))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(as_json))
    assert _printed(capsys, "--config", str(tmp_path / "c.json")) == _printed(capsys, "--config", str(tmp_path / "c.yml"))
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--print-config"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_config_from_every_checkpoint_kind(tmp_path, capsys):
    from desupcon.store.checkpoint import load_checkpoint
    flags = ["--preset", "quick", "--train-subset", "96", "--test-subset", "32", "--teacher-arch", "resnet8",
             "--epochs", "1", "--teacher-epochs", "1", "--probe-epochs", "1", "--phase2-epochs", "1",
             "--device", "cpu", "--output-dir", str(tmp_path)]
    assert main(["train", *flags, "--method", "two-stage"]) == 0
    capsys.readouterr()
    models = tmp_path / "pth_models"
    kinds = {}
    for path in models.glob("*.pth"):
        kinds.setdefault(load_checkpoint(path)["kind"], path)
    assert {"teacher", "teacher_projection", "student"} <= set(kinds)
    for kind, path in kinds.items():
        printed = _printed(capsys, "--config", str(path))
        assert printed["data"]["train_subset"] == 96, kind
    [two_stage] = [p for p in models.glob("student_*.pth") if "two_stage" in load_checkpoint(p)["config"]]
    printed = _printed(capsys, "--config", str(two_stage))
    assert printed["two_stage"]["phase1_method"] == "crd" and printed["two_stage"]["phase2"]["epochs"] == 1
    # the two-stage checkpoint's configuration is the same run: loaded, not trained again
    mtime = two_stage.stat().st_mtime_ns
    assert main(["train", "--config", str(two_stage), "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    assert two_stage.stat().st_mtime_ns == mtime


def test_config_from_an_epoch_checkpoint(tmp_path, capsys, tiny_config):
    import torch
    from desupcon.engine.build import make_student_run
    from desupcon.store.checkpoint import atomic_torch_save
    from desupcon.session import Session
    cfg = tiny_config(tmp_path).replace(method={"method": "ce"}, optim={"epochs": 7})
    session = Session(cfg, analyze=False)
    run = make_student_run(cfg, session.dataset, None, session.policy)
    path = tmp_path / "in_progress.pth"
    atomic_torch_save(path, run.training_state(torch.Generator()))
    assert _printed(capsys, "--config", str(path))["optim"]["epochs"] == 7


def test_architecture_names_in_files_resolve_like_flags(tmp_path, capsys):
    cfg = _printed(capsys, "--preset", "mdistiller")
    cfg["model"].update(teacher_arch="WRN_40_2", student_arch="shufflev1")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    printed = _printed(capsys, "--config", str(tmp_path / "c.yaml"))
    assert printed["model"]["teacher_arch"] == "wrn_40_2" and printed["model"]["student_arch"] == "ShuffleV1"
