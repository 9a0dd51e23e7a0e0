"""The 13 standard pairs (SPEC 17): per-pair settings chosen from the pair unless a flag says
otherwise, names that carry them only when they differ, `sweep logit --pair/--pairs all`, and the
report's published figures beside runs of the matching pair under the mdistiller protocol."""

import json

import pytest

from desupcon import cli, report
from desupcon.config import preset, protocol_of, run_name
from desupcon.config.pairs import STANDARD_PAIRS, published_figures


def _cfg(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def _sweep_plan(capsys, *argv):
    assert cli.main(["sweep", "logit", "--preset", "mdistiller", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_pair_table_is_spec_17():
    assert len(STANDARD_PAIRS) == 13 and len({p.key for p in STANDARD_PAIRS}) == 13
    betas = {p.key: p.dkd_beta for p in STANDARD_PAIRS}
    assert betas["resnet56:resnet20"] == betas["resnet110:resnet32"] == betas["resnet110:resnet20"] == 2
    assert betas["wrn_40_2:wrn_16_2"] == betas["vgg13:vgg8"] == betas["vgg13:MobileNetV2"] == 6
    assert betas["wrn_40_2:ShuffleV1"] == betas["ResNet50:vgg8"] == betas["resnet32x4:ShuffleV2"] == 8
    assert published_figures("resnet32x4", "ShuffleV2") == {
        "teacher": 79.42, "ce": 71.82, "kd": 74.45, "crd-nce": 75.65, "dkd": 77.07, "kd-ls": 75.56, "dkd-ls": 77.37,
        "fitnet": 73.54, "at": 72.73, "sp": 74.56, "cc": 71.29, "vid": 73.40, "rkd": 73.21, "pkt": 74.69, "nst": 74.68}
    # RepDistiller's first and last pairs, read from the tables' corners
    assert published_figures("resnet56", "resnet20")["fitnet"] == 69.21
    assert published_figures("ResNet50", "vgg8")["nst"] == 71.28
    assert "dkd" not in published_figures("ResNet50", "vgg8")
    assert published_figures("resnet32x4", "resnet8x4")["sd-kd"] == 76.63


def test_light_students_take_lr_001_and_dkd_beta_of_the_pair():
    cfg = _cfg("--preset", "mdistiller", "--teacher-arch", "resnet32x4", "--student-arch", "shufflev1",
               "--method", "dkd")
    assert cfg.model.student_arch == "ShuffleV1" and cfg.optim.lr == 0.01 and cfg.method.dkd_beta == 8
    cfg = _cfg("--preset", "mdistiller", "--teacher-arch", "vgg13", "--student-arch", "MobileNetV2",
               "--method", "dkd")
    assert cfg.optim.lr == 0.01 and cfg.method.dkd_beta == 6
    cfg = _cfg("--preset", "mdistiller", "--teacher-arch", "wrn_40_2", "--student-arch", "wrn_16_2",
               "--method", "sd-dkd")
    assert cfg.optim.lr == 0.05 and cfg.method.dkd_beta == 6
    # the paper presets' Adam lr is no pair's business
    assert _cfg("--preset", "paper", "--student-arch", "MobileNetV2").optim.lr == 1e-3


def test_flags_override_the_pair_and_names_say_so():
    default = _cfg("--preset", "mdistiller", "--teacher-arch", "vgg13", "--student-arch", "MobileNetV2",
                   "--method", "dkd")
    given = _cfg("--preset", "mdistiller", "--teacher-arch", "vgg13", "--student-arch", "MobileNetV2",
                 "--method", "dkd", "--lr", "0.05", "--dkd-beta", "8")
    assert given.optim.lr == 0.05 and given.method.dkd_beta == 8
    assert "_lr" not in run_name(default) and "_b6" not in run_name(default)
    assert "_lr0.05" in run_name(given) and "_b8.0" in run_name(given)
    # the pair's settings are the protocol: the default run is mdistiller's, the override is not
    assert report.mdistiller_protocol(default) and not report.mdistiller_protocol(given)
    assert protocol_of(preset("mdistiller").with_method("dkd")) == "mdistiller"


def test_sweep_pair_print_config_shows_the_pair_settings(capsys):
    planned = _sweep_plan(capsys, "--pair", "resnet32x4:ShuffleV1")
    dkd = next(e for e in planned if e["label"] == "DKD")
    assert dkd["pair"] == "resnet32x4:ShuffleV1"
    assert dkd["config"]["optim"]["lr"] == 0.01 and dkd["config"]["method"]["dkd_beta"] == 8.0
    assert {e["config"]["model"]["student_arch"] for e in planned} == {"ShuffleV1"}


def test_sweep_pairs_all_lists_the_13_pairs(capsys):
    planned = _sweep_plan(capsys, "--pairs", "all")
    assert list(dict.fromkeys(e["pair"] for e in planned)) == [p.key for p in STANDARD_PAIRS]
    by_pair = {e["pair"]: e for e in planned if e["label"] == "DKD"}
    for p in STANDARD_PAIRS:
        cfg = by_pair[p.key]["config"]
        assert cfg["method"]["dkd_beta"] == p.dkd_beta
        assert cfg["optim"]["lr"] == (0.01 if p.student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
    # only the teacherless CE student is one run for the pairs that share a student
    distilled = [e["run"] for e in planned if e["label"] != "CE student"]
    assert len(set(distilled)) == len(distilled), "two pairs' distilled runs share a name"
    ce = {e["run"] for e in planned if e["label"] == "CE student"}
    assert len(ce) == len({p.student for p in STANDARD_PAIRS})


@pytest.mark.parametrize("argv, problem", [
    (["--pair", "resnet32x4"], "expected TEACHER:STUDENT"),
    (["--pair", "resnet32x4:ShuffleV3"], "unknown architecture 'ShuffleV3'"),
    (["--pair", "resnet56:resnet20", "--teacher-arch", "resnet56"], "remove those"),
    (["--pairs", "some"], "only `all`"),
    (["--pair", "resnet56:resnet20", "--pairs", "all"], "give one"),
])
def test_bad_pair_flags_are_one_line(capsys, argv, problem):
    assert cli.main(["sweep", "logit", "--preset", "mdistiller", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


def test_pairs_need_the_logit_sweep(capsys):
    assert cli.main(["sweep", "alpha", "--pairs", "all", "--print-config"]) == 2
    assert "sweep logit" in capsys.readouterr().err


def test_published_figures_beside_the_matching_pair_only():
    cfg = _cfg("--preset", "mdistiller", "--teacher-arch", "resnet32x4", "--student-arch", "ShuffleV2",
               "--method", "dkd")
    row = report.Configuration("x", cfg, "student", {0: {}})
    assert report._published("logit", None, row)[0] == 77.07
    kd = report.Configuration("k", cfg.with_method("kd"), "student", {0: {}})
    assert report._published("logit", None, kd)[0] == 74.45
    unpublished = cfg.replace(model={"teacher_arch": "vgg13"})  # vgg13 -> ShuffleV2 is no standard pair
    assert report._published("logit", None, report.Configuration("y", unpublished, "student", {0: {}})) is None


def test_published_figures_say_which_epoch_their_source_reports():
    cfg = _cfg("--preset", "mdistiller", "--teacher-arch", "resnet32x4", "--student-arch", "ShuffleV2",
               "--method", "dkd")
    cells = {m: report._published_cell(report._published("feature" if m in ("fitnet", "nst") else "logit", None,
                                                         report.Configuration(m, cfg.with_method(m), "student", {0: {}})))
             for m in ("dkd", "kd", "fitnet", "nst")}
    assert cells == {"dkd": "77.07 (best epoch) /  / ", "kd": "74.45 (last epoch) /  / ",
                     "fitnet": "73.54 (last epoch) /  / ", "nst": "74.68 (last epoch) /  / "}
