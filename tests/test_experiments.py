"""The experiment plan, sweeps with seeds, the report's statistics, interrupted sweeps."""

import math

import pytest

from desupcon import report
from desupcon import plan as experiments
from desupcon.engine.run import Run
from desupcon.config import preset, run_name
from desupcon.report import mean_sd, paired_difference


def test_plan_follows_the_published_protocol():
    base = preset("paper")
    values = {g: [e.value for e in experiments.group_plan(base, g)] for g in experiments.GROUPS}
    assert values["alpha"] == [1.0, 2.0, 5.0, 10.0]
    assert values["beta"] == [1.0, 5.0, 10.0, 12.0]
    assert values["temp"] == [0.05, 0.07]
    assert values["lambda"] == [0.3, 0.5, 0.7, 0.9]
    assert values["bank"] == ["crd/0", "crd/4096", "lw-supcrd/0", "lw-supcrd/4096"]
    assert {e.cfg.method.method for e in experiments.group_plan(base, "baselines")} == \
        {"ce", "crd", "supcon", "lw-supcrd"}
    for e in experiments.group_plan(base, "beta"):
        assert e.cfg.method.alpha == 1.0 and e.cfg.method.bank_size == 0
    names = {run_name(e.cfg) for e in experiments.plan(base, "all")}
    # alpha 1 / beta 10 / tau 0.07 are one run; the bank ablation's no-bank arms are runs of their
    # own under paper-bank (SPEC 6), named as published (SPEC 11)
    assert len(names) == 19
    assert "student_alpha_1.0_beta_10.0_temp_0.07_resnet18_cifar100" in names
    bank = experiments.group_plan(base, "bank")
    assert [run_name(e.cfg) for e in bank] == [
        "student_baseline_crd_nobank_resnet18_cifar100", "student_baseline_crd_bank4096_resnet18_cifar100",
        "student_lwsupcrd_nobank_resnet18_cifar100", "student_lwsupcrd_bank4096_resnet18_cifar100"]
    for e in bank:
        o = e.cfg.optim
        assert e.cfg.preset == "paper-bank" and (o.weight_decay, o.schedule, o.drop_last) == (1e-4, "cosine", True)
    for e in experiments.plan(base, [g for g in experiments.GROUPS if g != "bank"]):
        o = e.cfg.optim
        assert e.cfg.preset == "paper" and (o.weight_decay, o.schedule, o.drop_last) == (0.0, "constant", False)


def test_seeds_multiply_runs_but_share_the_teacher():
    base = preset("quick")
    runs = experiments.plan(base, "alpha", seeds=[0, 1])
    assert len(runs) == 8 and len({run_name(e.cfg) for e in runs}) == 8
    assert len({repr(e.cfg.teacher_identity()) for e in runs}) == 1
    with pytest.raises(ValueError, match="unknown sweep group"):
        experiments.group_plan(base, "gamma")


def test_statistics():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, None)
    d, se, n = paired_difference({0: 3.0, 1: 5.0, 2: 10.0}, {0: 1.0, 1: 2.0, 3: 99.0})
    assert (d, n) == (2.5, 2) and se == pytest.approx(math.sqrt(0.5) / math.sqrt(2))


def test_alpha_sweep_with_two_seeds_then_nothing_retrains(tmp_path, monkeypatch, tiny_config):
    base = tiny_config(tmp_path, train_images=128, test_images=48, epochs=1)
    results, text = experiments.sweep(base, "alpha", seeds=[0, 1], pictures=False)
    assert len({r.name for _, r in results}) == 8
    assert len(list((tmp_path / "pth_models").glob("student_*.pth"))) == 8
    alpha_table = report.build_report(tmp_path, tables=["alpha"])
    rows = [line for line in alpha_table.splitlines() if line.startswith("| alpha = ")]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2"  # seeds
        assert "±" in cells[2]  # mean ± sd of test accuracy
    assert list((tmp_path / "plots").glob("sweep_alpha_*.png"))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was retrained")
    from desupcon.engine import loop
    monkeypatch.setattr(loop, "_train_lockstep", no_training)
    again, _ = experiments.sweep(base, "alpha", seeds=[0, 1], pictures=False)
    assert all(r.cached for _, r in again)


def test_interrupted_sweep_finishes_only_the_rest(tmp_path, monkeypatch, tiny_config, request):
    base = tiny_config(tmp_path, train_images=128, test_images=48, epochs=1)
    finished = []
    original = Run.finish_epoch

    def stop_on_third_run(self, *args, **kwargs):
        if self.kind == "student" and len(finished) == 2:
            raise KeyboardInterrupt  # as if the process were stopped during the third run
        entry = original(self, *args, **kwargs)
        if self.kind == "student":
            finished.append(self.name)
        return entry
    monkeypatch.setattr(Run, "finish_epoch", stop_on_third_run)
    with pytest.raises(KeyboardInterrupt):
        experiments.sweep(base, "beta", pictures=False)
    assert len(list((tmp_path / "pth_models").glob("student_*.pth"))) == 2

    monkeypatch.setattr(Run, "finish_epoch", original)
    trained = request.getfixturevalue("trained_students")  # counted from here on
    results, _ = experiments.sweep(base, "beta", pictures=False)
    assert len(trained) == 2 and not set(trained) & set(finished)
    assert sum(r.cached for _, r in results) == 2
