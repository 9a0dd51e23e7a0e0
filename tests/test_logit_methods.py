"""The logit distillers and crd-nce as methods of the one training loop (SPEC 13, 14): they train,
resume exactly, cache, run as a sweep group, and the mdistiller preset is the literature's."""

import shutil

import numpy as np
import pytest
import torch

from desupcon import data, report
from desupcon import plan as experiments
from desupcon.engine.run import Run
from desupcon.engine.build import make_student_run
from desupcon.engine.step import train_step
from desupcon.store import weights as tw
from desupcon.store.checkpoint import load_checkpoint
from desupcon.config import preset, run_name
from desupcon.methods import comparison_members, METHODS
from desupcon.methods.logit import LogitDistillationMethod
from desupcon.models import build_encoder
from desupcon.session import Session

LOGIT_METHODS = [n for n, c in METHODS.items() if issubclass(c, LogitDistillationMethod)]
NEW_METHODS = [*LOGIT_METHODS, "crd-nce"]


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("logit-teacher")
    Session(tiny_config(root)).teacher()
    return root


@pytest.fixture
def session(tmp_path, teacher_root, tiny_config):
    (tmp_path / "pth_models").mkdir()
    for f in (teacher_root / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(f, tmp_path / "pth_models" / f.name)
    return Session(tiny_config(tmp_path, epochs=3), analyze=False)


@pytest.mark.parametrize("method", NEW_METHODS + ["lw-supcrd+kd"])
def test_loss_falls_over_steps_on_a_fixed_batch(session, method):
    cfg = (session.cfg.replace(method={"method": "lw-supcrd", "logit_term": "kd"}) if method == "lw-supcrd+kd"
           else session.cfg.with_method(method, warmup=0))
    teacher, _ = session.teacher()
    run = make_student_run(cfg, session.dataset, teacher, session.policy)
    ds = session.dataset
    aug = data.TwoViewAugment(ds.mean, ds.std)
    batch = next(data.epoch_batches(ds.train_images, ds.train_labels, 32, aug, torch.Generator().manual_seed(0)))
    labels = batch[3]
    if method == "crd-nce":
        # its banks move towards the embeddings each step, which changes the targets: hold them
        # still to see the optimisation alone (the bank update is tested in test_crd_nce.py)
        run.method.after_step = lambda out: None
    seen = []
    for _ in range(12):
        run.start_epoch()
        train_step([run], batch, teacher, session.policy)
        seen.append(float(run._total) / labels.shape[0])
    assert np.isfinite(seen).all()
    assert np.mean(seen[-3:]) < seen[0], f"{method}: {seen}"


@pytest.mark.parametrize("method", ["kd", "dkd", "sdd-lskd", "crd-nce"])
def test_resume_is_exact_and_the_run_caches(session, tmp_path, method, monkeypatch):
    cfg = session.cfg.with_method(method, warmup=2)
    whole = session.run(cfg)
    assert not whole.cached and session.run(cfg).cached
    other = tmp_path / "other"
    (other / "pth_models").mkdir(parents=True)
    for f in (tmp_path / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(f, other / "pth_models" / f.name)
    cfg_b = cfg.replace(output_dir=str(other))
    count = {"n": 0}
    real = Run.finish_epoch

    def stop_after_two(self, *args, **kwargs):
        if self.kind == "student":
            if count["n"] == 2:
                raise KeyboardInterrupt
            count["n"] += 1
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Run, "finish_epoch", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            Session(cfg_b, analyze=False).run(cfg_b)
    resumed = Session(cfg_b, analyze=False).run(cfg_b)
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), f"{method}: {key}"
    if method == "crd-nce":  # the banks and constants are part of the run's state
        ma, mb = a["method_state"], b["method_state"]
        assert torch.equal(ma["memory.student_bank"], mb["memory.student_bank"])
        assert ma["memory._extra_state"]["z_student"] == mb["memory._extra_state"]["z_student"] is not None


def test_warmup_ramps_the_distillation_term():
    from desupcon.methods import warmup_factor
    assert [warmup_factor(20, e) for e in (1, 10, 20, 30)] == [0.05, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 1) == 1.0


def test_logit_sweep_runs_the_table_end_to_end(tmp_path, tiny_config):
    base = tiny_config(tmp_path, train_images=96, test_images=32, epochs=1)
    results, text = experiments.sweep(base, "logit", pictures=False)
    assert {e.cfg.method.method for e, _ in results} == set(comparison_members("logit"))
    table = report.build_report(tmp_path, tables=["logit"])
    for label in ("| KD |", "| DKD |", "| KD+LS |", "| DKD+LS |", "| SD-KD |", "| SD-DKD |", "| SDD-LSKD |",
                  "| CRD (NCE, Tian et al.) |", "| LW-SupCRD |", "| CE student |"):
        assert label in table, label
    assert "sweep_logit" not in " ".join(p.name for p in (tmp_path / "plots").glob("*"))


def test_mdistiller_preset_is_the_literature_protocol():
    cfg = preset("mdistiller")
    o = cfg.optim
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay, o.batch_size, o.epochs) == ("sgd", 0.05, 0.9, 5e-4, 64, 240)
    assert (o.schedule, o.milestones, o.lr_decay) == ("step", [150, 180, 210], 0.1)
    assert cfg.data.color_jitter == 0.0 and (cfg.model.teacher_arch, cfg.model.student_arch) == ("resnet32x4", "resnet8x4")
    dataset = data.ImageDataset("toy", torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.arange(8) % 4,
                                torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4) % 4, list("abcd"))
    run = make_student_run(cfg.replace(model={"student_arch": "resnet8"}), dataset, None, "cpu")
    assert isinstance(run.optimizer, torch.optim.SGD) and run.optimizer.defaults["momentum"] == 0.9
    lrs = []
    for epoch in range(240):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()
        run.scheduler.step()
    assert lrs[149] == pytest.approx(0.05) and lrs[150] == pytest.approx(0.005)
    assert lrs[180] == pytest.approx(0.0005) and lrs[239] == pytest.approx(0.00005)
    assert run.method.needs.views == 1
    # DKD's beta is 2 for the pairs with a smaller gap (SPEC 13)
    assert cfg.with_method("dkd").method.dkd_beta == 8.0
    small = cfg.replace(model={"teacher_arch": "resnet56", "student_arch": "resnet20"})
    assert small.with_method("dkd").method.dkd_beta == 2.0


def test_published_cifar_teacher_checkpoint_layout_loads(tmp_path):
    """The CIFAR teachers these projects publish: {"model": state_dict, ...} in the CIFAR ResNet
    layout (conv1, bn1, layer1..3 with downsample.0/1, fc), saved from a DataParallel model."""
    encoder = build_encoder("resnet32x4", 100)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": {"module." + k: v for k, v in encoder.state_dict().items()}, "epoch": 240,
                "best_acc": 79.42}, path)
    loaded = build_encoder("resnet32x4", 100)
    tw.load_encoder_weights(loaded, tw.read_state_dict(path), str(path), 100, "cifar100", "resnet32x4")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in encoder.state_dict().items())


def test_logit_figures_only_beside_the_mdistiller_protocol_and_pair():
    cfg = preset("mdistiller").with_method("dkd")
    c = report.Configuration("x", cfg, "student", {0: {"config": cfg.to_dict()}})
    assert report._published("logit", None, c)[0] == 76.32
    other_pair = cfg.replace(model={"teacher_arch": "resnet56", "student_arch": "resnet20"})
    assert report._published("logit", None, report.Configuration("y", other_pair, "student", {0: {}}))[0] == 71.97
    adam = cfg.replace(optim={"optimizer": "adam"})
    assert report._published("logit", None, report.Configuration("z", adam, "student", {0: {}})) is None
    quick = preset("quick").with_method("dkd")
    assert report._published("logit", None, report.Configuration("q", quick, "student", {0: {}})) is None
    assert run_name(cfg) != run_name(other_pair)
