"""Adding a method is one class in one file: this test declares a toy method here (a setting of its
own with flag, run-name tag, help, range and default) and trains it through the command line,
touching no module of the package. The flag, the name tag, the identity, the range check and the
label are all derived from the declaration. A second toy method reads stage maps of both models,
owns a trainable connector and shares a setting name with FitNet: it trains in its comparison's
sweep and shows in its report table."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from desupcon import cli, report
from desupcon.config import preset, run_name
from desupcon.config.settings import method_setting
from desupcon.methods import METHODS, Method, method_label, Needs, register_method
from desupcon.methods.base import CE_WEIGHT, FEAT_WEIGHT
from desupcon.models import StageNeeds
from desupcon.store.checkpoint import load_checkpoint


class ProjectionPenaltyMethod(Method):
    """Cross-entropy plus `toy_weight` times the mean squared norm of the normalised projection (1
    for every row): a formula of this test's own."""

    name, label = "toy-penalty", "Toy penalty (weight {toy_weight})"
    settings = (method_setting("toy_weight", "--toy-weight", float, "the toy method's penalty weight", "toyw",
                               (lambda v: 0 <= v <= 1, "in [0, 1]"), 0.25),)
    needs = Needs(views=1, teacher=False, teacher_head=False, online_classifier=False, gathers_batch=False,
                  every_parameter=False)

    def representation_losses(self, out):
        return {"ce": F.cross_entropy(out.student_logits, out.labels),
                "toy": self.cfg.toy_weight * out.student_projection.pow(2).sum(1).mean()}


@pytest.fixture
def toy_method():
    register_method(ProjectionPenaltyMethod)
    try:
        yield ProjectionPenaltyMethod
    finally:
        METHODS.pop(ProjectionPenaltyMethod.name)


TINY = ["--preset", "quick", "--method", "toy-penalty", "--epochs", "1", "--train-subset", "64", "--test-subset",
        "32", "--batch-size", "32", "--device", "cpu"]


def test_a_method_declared_in_one_file_trains_through_the_command_line(toy_method, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", *TINY, "--toy-weight", "0.5", "--output-dir", str(out)]) == 0
    cfg = preset("quick").replace(method={"method": "toy-penalty", "toy_weight": 0.5},
                                  optim={"epochs": 1, "batch_size": 32},
                                  data={"train_subset": 64, "test_subset": 32})
    name = run_name(cfg)
    assert name.startswith("student_toypenalty_quick_resnet8_digits") and "toyw0.5" in name.split("_")
    ckpt = load_checkpoint(out / "pth_models" / f"{name}.pth", "student")
    assert ckpt["identity"]["method"] == {"method": "toy-penalty", "toy_weight": 0.5}
    assert "teacher" not in ckpt["identity"]  # it declared that it needs no teacher
    assert set(ckpt["log"][0]["losses"]) == {"ce", "toy"}
    assert 0 < ckpt["log"][0]["losses"]["toy"] <= 0.5 + 1e-6  # 0.5 x squared norm of a unit vector
    assert method_label(cfg.method) == "Toy penalty (weight 0.5)"
    # the declared default is not tagged
    default = cfg.replace(method={"toy_weight": 0.25})
    assert "toyw" not in run_name(default) and run_name(default) != name


def test_the_new_setting_is_range_checked_and_documented(toy_method, tmp_path, capsys):
    assert cli.main(["train", *TINY, "--toy-weight", "2", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--toy-weight must be in [0, 1], got 2.0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pth_models").exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--toy-weight" in capsys.readouterr().out


def test_the_new_setting_travels_in_configuration_files(toy_method, tmp_path, capsys):
    assert cli.main(["train", *TINY, "--toy-weight", "0.75", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"]["toy_weight"] == 0.75
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(printed))
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == printed["method"]


def test_without_the_method_its_setting_is_unknown():
    """Nothing of the toy method outlives its registration (no test depends on another's)."""
    assert "toy-penalty" not in METHODS
    assert "--toy-weight" not in cli.run_flags()
    with pytest.raises(ValueError, match="unknown MethodConfig settings: toy_weight"):
        preset("quick").replace(method={"toy_weight": 0.5})


class StageConnectorMethod(Method):
    """CE plus `feat_weight` times the mean squared distance between the student's stage-1 map
    through a 1x1 connector it owns and the teacher's stage-1 map: a method of this test's own that
    reads stages, owns weights and shares a setting name with FitNet under another default."""

    name, label = "toy-connector", "Toy connector"
    settings = (CE_WEIGHT, FEAT_WEIGHT)
    defaults = {"feat_weight": 0.5}
    comparisons = {"feature": 50}
    needs = Needs(views=1, teacher_head=False, online_classifier=False, gathers_batch=False, every_parameter=False,
                  student_stages=StageNeeds(stages=True), teacher_stages=StageNeeds(stages=True))

    def setup(self, dataset, student, teacher) -> None:
        size = (dataset.image_size, dataset.image_size)
        (c_s, _, _), (c_t, _, _) = student.encoder.stage_shapes(size)[1], teacher.encoder.stage_shapes(size)[1]
        self.connector = torch.nn.Conv2d(c_s, c_t, 1)

    def representation_losses(self, out):
        mapped = self.connector(out.student_stages.feats[1].float())
        return {"ce": self.cfg.ce_weight * F.cross_entropy(out.student_logits, out.labels),
                "toy": self.cfg.feat_weight * (mapped - out.teacher_stages.feats[1].float()).pow(2).mean()}


@pytest.fixture
def connector_method():
    register_method(StageConnectorMethod)
    try:
        yield StageConnectorMethod
    finally:
        METHODS.pop(StageConnectorMethod.name)


def test_a_method_with_stages_and_a_connector_joins_its_comparison_with_no_other_edit(connector_method, tmp_path,
                                                                                      capsys):
    out = tmp_path / "out"
    base = ["--preset", "quick", "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
            "--teacher-arch", "resnet8", "--student-arch", "resnet8", "--train-teacher", "--teacher-epochs", "1",
            "--probe-epochs", "1", "--device", "cpu", "--output-dir", str(out)]
    # the shared setting keeps each method's own default, and the configuration holds only its settings
    assert cli.main(["train", *base, "--method", "toy-connector", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == {"method": "toy-connector", "ce_weight": 1.0,
                                                              "feat_weight": 0.5}
    assert preset("quick").with_method("fitnet").method.feat_weight == 100.0
    assert cli.main(["sweep", "feature", *base]) == 0
    ckpt = load_checkpoint(next((out / "pth_models").glob("student_toyconnector_*.pth")), "student")
    assert set(ckpt["method_state"]) == {"connector.weight", "connector.bias"}
    assert ckpt["log"][0]["losses"]["toy"] > 0
    table = report.build_report(out, tables=["feature"])
    assert "Toy connector" in table and "FitNet" in table
