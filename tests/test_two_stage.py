"""Two-stage distillation (SPEC 12): phase 1 leaves the classifier alone, phase 2 leaves the encoder
alone, one run resumable across the phase boundary and cached like the rest."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from desupcon import two_stage
from desupcon.engine.run import Run
from desupcon.engine.build import build_student
from desupcon.store.cache import load_student
from desupcon.store.checkpoint import load_checkpoint
from desupcon.config import MethodConfig
from desupcon.losses import crd_loss
from desupcon.methods import StepOutputs, build_method
from desupcon.session import Session
from desupcon.probes import ProbeConfig
from desupcon.two_stage import PHASE1_KIND, PHASE2_KIND, TwoStageConfig, train_two_stage

TS = TwoStageConfig(phase2=ProbeConfig(epochs=3, batch_size=32))
STOP_AT = 2  # the phase-2 epoch a run is killed in


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory, tiny_config) -> Path:
    root = tmp_path_factory.mktemp("two_stage_teacher")
    Session(tiny_config(root, epochs=1), analyze=False).teacher()
    return root


def _session(root: Path, teacher_root: Path, tiny_config) -> Session:
    (root / "pth_models").mkdir(parents=True)
    for teacher_file in (teacher_root / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(teacher_file, root / "pth_models" / teacher_file.name)
    return Session(tiny_config(root, epochs=1), analyze=False)


def _train(session, ts=TS, **kwargs):
    return train_two_stage(session.cfg, ts, session.dataset, session.teacher()[0], "cpu", **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_root, tiny_config):
    """One uninterrupted run, and one killed in phase 2 then resumed (with what was on disk then)."""
    whole_session = _session(tmp_path_factory.mktemp("whole"), teacher_root, tiny_config)
    whole = _train(whole_session)

    session = _session(tmp_path_factory.mktemp("killed"), teacher_root, tiny_config)
    real = Run.finish_epoch
    calls = {PHASE1_KIND: 0, PHASE2_KIND: 0}
    killed = []

    def stop_in_phase2(self, *args, **kwargs):
        calls[self.kind] = calls.get(self.kind, 0) + 1
        if self.kind == PHASE2_KIND and self.epoch + 1 == STOP_AT and not killed:
            killed.append(self.epoch + 1)
            raise KeyboardInterrupt  # as if the process were stopped during that epoch
        return real(self, *args, **kwargs)

    name = two_stage.two_stage_name(session.cfg, TS)
    mp = pytest.MonkeyPatch()
    mp.setattr(Run, "finish_epoch", stop_in_phase2)
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(session)
        phase1_done = load_checkpoint(two_stage._phase1_done_path(session.paths, name), "student")
        phase2_partial = load_checkpoint(session.paths.partial_checkpoint(f"{name}__phase2"), "in_progress")
        before_resume = dict(calls)
        resumed = _train(session)
    finally:
        mp.undo()
    during_resume = {k: calls[k] - before_resume.get(k, 0) for k in calls}
    return {"whole": whole, "whole_session": whole_session, "resumed": resumed, "session": session,
            "phase1_done": phase1_done, "phase2_partial": phase2_partial, "resume_calls": during_resume,
            "name": name}


def _initial_student(cfg):
    torch.manual_seed(cfg.optim.seed)
    return build_student(cfg.model.student_arch, 10, cfg.model.init)


def test_phase1_leaves_the_student_classifier_bit_identical(runs):
    cfg = two_stage.phase1_config(runs["session"].cfg, TS)
    initial = _initial_student(cfg).state_dict()
    phase1 = runs["phase1_done"]["student"]
    for key in ("encoder.fc.weight", "encoder.fc.bias"):
        assert torch.equal(phase1[key], initial[key]), f"{key} moved in phase 1"
    moved = [k for k in initial if not k.startswith("encoder.fc.") and not torch.equal(phase1[k], initial[k])]
    assert any(k.startswith("encoder.layer") for k in moved) and any(k.startswith("projector.") for k in moved)
    losses = runs["phase1_done"]["log"][0]["losses"]
    assert set(losses) == {"crd"}  # no online classifier, no CE


def test_phase2_leaves_every_encoder_parameter_and_batchnorm_buffer_bit_identical(runs):
    phase1 = runs["phase1_done"]["student"]
    final = load_checkpoint(runs["resumed"].checkpoint, "student")["student"]
    for key, value in phase1.items():
        if key.startswith("encoder.fc."):
            assert not torch.equal(final[key], value), f"phase 2 did not train {key}"
        else:  # encoder weights, BatchNorm running statistics and counters, projector
            assert torch.equal(final[key], value), f"phase 2 changed {key}"


def test_phase1_trains_the_encoder_an_end_to_end_run_of_its_method_trains(runs):
    """The end-to-end representation methods train their classifier online on detached features,
    so under the same optimiser phase 1's encoder and projector are the end-to-end run's, bit for
    bit: two-stage and end-to-end differ only in how the classifier is trained."""
    session = runs["whole_session"]
    end_to_end = session.run(two_stage.phase1_config(session.cfg, TS))
    e2e = load_checkpoint(end_to_end.checkpoint, "student")["student"]
    phase1 = load_checkpoint(runs["whole"].checkpoint, "student")["student"]  # encoder frozen in phase 2
    shared = [k for k in phase1 if not k.startswith("encoder.fc.")]
    assert any(k.startswith("projector.") for k in shared)
    for key in shared:
        assert torch.equal(phase1[key], e2e[key]), f"{key} differs from the end-to-end run's"
    assert not torch.equal(phase1["encoder.fc.weight"], e2e["encoder.fc.weight"])


def test_a_run_killed_in_phase2_resumes_to_the_same_weights_without_redoing_phase1(runs):
    assert runs["phase2_partial"]["epoch"] == STOP_AT - 1
    assert runs["resume_calls"][PHASE1_KIND] == 0  # phase 1 was not trained again
    assert runs["resume_calls"][PHASE2_KIND] == TS.phase2.epochs - (STOP_AT - 1)
    a = load_checkpoint(runs["whole"].checkpoint, "student")
    b = load_checkpoint(runs["resumed"].checkpoint, "student")
    assert a["name"] == b["name"] == runs["name"]
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), f"{key} differs after the resume"
    assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"]
    assert [e["test_acc"] for e in a["log"]] == [e["test_acc"] for e in b["log"]]
    assert not (runs["session"].paths.models / "in_progress").exists()  # nothing left behind


def test_the_finished_run_is_a_cached_student_checkpoint(runs, monkeypatch):
    result = runs["whole"]
    ckpt = load_checkpoint(result.checkpoint, "student")
    assert not result.cached and result.checkpoint.name == runs["name"] + ".pth"
    assert ckpt["metrics"]["test_acc"] == ckpt["log"][-1]["test_acc"] == result.metrics["test_acc"]
    assert len(ckpt["log"]) == TS.phase2.epochs
    assert ckpt["two_stage"]["config"] == TS.to_dict() and ckpt["config"]["two_stage"] == TS.to_dict()
    assert len(ckpt["two_stage"]["phase1"]["log"]) == 1 and "knn" in ckpt["two_stage"]["phase1"]["metrics"]
    assert set(ckpt["log"][0]["losses"]) == {"kd", "ce"}
    student, _ = load_student(result.checkpoint)  # loads as any student
    assert student.classifier.out_features == 10

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(two_stage, "train_group", no_training)
    monkeypatch.setattr(two_stage, "fit_probe", no_training)
    again = _train(runs["whole_session"])
    assert again.cached and again.metrics == result.metrics


def test_two_level_crd_and_the_seeds_sgd_phase1(tmp_path, teacher_root, tiny_config):
    session = _session(tmp_path, teacher_root, tiny_config)
    ts = TwoStageConfig(phase1_optimizer="sgd", two_level_crd=True, phase2=ProbeConfig(epochs=1, batch_size=32))
    p1 = two_stage.phase1_config(session.cfg, ts)
    assert (p1.optim.optimizer, p1.optim.lr, p1.optim.momentum, p1.optim.weight_decay, p1.optim.batch_size) \
        == ("sgd", 0.05, 0.9, 5e-4, 64)
    name = two_stage.two_stage_name(session.cfg, ts)
    assert name != two_stage.two_stage_name(session.cfg, TS) and name.endswith("_twolevel")
    result = _train(session, ts)
    ckpt = load_checkpoint(result.checkpoint, "student")
    assert set(ckpt["two_stage"]["phase1"]["log"][0]["losses"]) == {"crd", "crd_map"}
    initial = _initial_student(p1).state_dict()
    phase1_state = ckpt["student"]  # phase 2 changed only the classifier, so compare the rest
    assert not torch.equal(phase1_state["encoder.layer1.0.conv1.weight"], initial["encoder.layer1.0.conv1.weight"])
    assert set(ckpt["method_state"]) == {f"map_{m}.{p}" for m in ("student", "teacher") for p in ("weight", "bias")}

    # the two levels: in-batch CRD on the projections plus in-batch CRD on linear embeddings
    teacher = session.teacher()[0]
    method = two_stage.RepresentationPhase(build_method(MethodConfig(method="crd")), two_level=True)
    student = _initial_student(p1)
    method.setup(session.dataset, student, teacher)
    torch.manual_seed(1)
    s_proj, t_proj = F.normalize(torch.randn(8, 64), dim=1), F.normalize(torch.randn(8, 64), dim=1)
    s_feat, t_feat = torch.randn(8, student.encoder.feature_dim), torch.randn(8, teacher.encoder.feature_dim)
    out = StepOutputs(torch.arange(8) % 4, s_proj, torch.randn(8, 10), teacher_projection=t_proj,
                      teacher_logits=torch.randn(8, 10), student_features=s_feat, teacher_features=t_feat)
    got = method.losses(out)
    assert set(got) == {"crd", "crd_map"}
    assert torch.allclose(got["crd"], crd_loss(s_proj, t_proj, 0.07))
    v_s, v_t = F.normalize(method.map_student(s_feat), dim=1), F.normalize(method.map_teacher(t_feat), dim=1)
    expected = crd_loss(v_s, v_t, 0.07)
    assert torch.allclose(got["crd_map"], expected)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="representation method"):
        TwoStageConfig(phase1_method="kd").check()
    with pytest.raises(ValueError, match="two_level_crd"):
        TwoStageConfig(phase1_method="supcon", two_level_crd=True).check()
    with pytest.raises(ValueError, match="phase1_optimizer"):
        TwoStageConfig(phase1_optimizer="rmsprop").check()
    # either switch of the fine-tune sets both (one identity for one computation)
    assert TwoStageConfig(finetune_last_stage=True) == TwoStageConfig(phase2=ProbeConfig(finetune_last_stage=True))
    assert TwoStageConfig.from_dict(TS.to_dict()) == TS


def test_phase1_optimizer_choices_under_an_sgd_protocol(tiny_config, tmp_path):
    sgd_run = tiny_config(tmp_path).replace(optim={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9})
    own = two_stage.phase1_config(sgd_run, TwoStageConfig())  # default "run": the run's own optimiser
    assert (own.optim.optimizer, own.optim.lr, own.method.method) == ("sgd", 0.05, "crd")
    seed = two_stage.phase1_config(sgd_run, TwoStageConfig(phase1_optimizer="sgd")).optim
    assert (seed.optimizer, seed.lr, seed.weight_decay, seed.batch_size) == ("sgd", 0.05, 5e-4, 64)
    with pytest.raises(ValueError, match="Adam at the run's lr 0.05"):  # an SGD lr is not an Adam one
        two_stage.phase1_config(sgd_run, TwoStageConfig(phase1_optimizer="adam"))
    adam = two_stage.phase1_config(sgd_run.replace(optim={"lr": 1e-3}), TwoStageConfig(phase1_optimizer="adam"))
    assert (adam.optim.optimizer, adam.optim.lr) == ("adam", 1e-3)
