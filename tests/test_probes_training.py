"""Probes trained on a frozen student encoder (SPEC 12), through the one training loop: the
linear probe, the KD probe, k-NN on frozen features, and their records."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from desupcon import data, losses, probes
from desupcon.store.cache import load_student
from desupcon.store.checkpoint import load_checkpoint, read_json
from desupcon.config import RunConfig
from desupcon.analysis.evaluate import analyze_student_checkpoint
from desupcon.store.records import records_path as comprehensive_results_path
from desupcon.methods import StepOutputs
from desupcon.session import Session
from desupcon.probes import FrozenEncoderProbe, KDProbeMethod, ProbeConfig


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, tiny_config) -> Path:
    """A tiny teacher and one CE student trained once for this module (tests copy them)."""
    root = tmp_path_factory.mktemp("probes")
    session = Session(tiny_config(root, epochs=1), analyze=False)
    session.teacher()
    session.run(session.cfg.replace(method={"method": "ce"}))
    return root


@pytest.fixture
def session(tmp_path, trained_root, tiny_config) -> Session:
    shutil.copytree(trained_root / "pth_models", tmp_path / "pth_models")
    return Session(tiny_config(tmp_path, epochs=1), analyze=False)


def _student_path(session) -> Path:
    [path] = [p for p in session.paths.models.glob("student_*.pth")]
    return path


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- the linear probe reaches 100 % where one feature coordinate is the label --------------------

class LabelInOneCoordinate(nn.Module):
    """A fake encoder: feature 0 is the image's label, read back from its (uniform) centre pixel;
    the other features are 0."""

    def __init__(self, mean, std, step):
        super().__init__()
        self.feature_dim, self.step = 4, step
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.unused = nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        c = x.shape[-1] // 2
        pixel = x[:, 0, c, c] * self.std[0] + self.mean[0]
        features = torch.zeros(x.shape[0], self.feature_dim, device=x.device)
        features[:, 0] = torch.round(pixel * 255 / self.step)
        return features


def test_linear_probe_reaches_100_percent_when_a_feature_is_the_label():
    classes, step = 4, 40
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return (y * step).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous(), y

    (xa, ya), (xb, yb) = split(200), split(100)
    ds = data.ImageDataset("label-pixels", xa, ya, xb, yb, [str(c) for c in range(classes)])
    encoder = LabelInOneCoordinate(ds.mean, ds.std, step)
    features = encoder.forward_features(data.normalise(xb, ds.mean, ds.std))
    assert torch.equal(features[:, 0], yb.float())  # the premise
    # crop and flip keep the centre pixel; no colour jitter
    run_cfg = RunConfig(device="cpu").replace(data={"color_jitter": 0.0})
    result = probes.linear_probe(encoder, ds, "cpu", ProbeConfig(epochs=40, lr=0.3, batch_size=32),
                                 run_config=run_cfg)
    assert result["top1"] == 100.0 and result["top5"] == 100.0
    assert result["epochs"] == 40 and len(result["log"]) == 40
    assert result["train_acc"] == 100.0


# -- frozen means frozen ------------------------------------------------------------------------

def test_probe_leaves_every_encoder_parameter_and_batchnorm_buffer_bit_identical(session):
    student, _ = load_student(_student_path(session))
    encoder = student.encoder
    before = _state(encoder)
    torch.manual_seed(0)
    probe = FrozenEncoderProbe(encoder, session.dataset.num_classes)
    head_before = _state(probe.head)
    probe.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert probe.head.training
    assert not any(p.requires_grad for p in encoder.parameters())
    result = probes.fit_probe(probe, "linear", session.dataset, "cpu", ProbeConfig(epochs=2, batch_size=32))
    for k, v in encoder.state_dict().items():  # running means/vars and num_batches_tracked included
        assert torch.equal(v, before[k]), f"encoder {k} changed"
    assert all(not torch.equal(v, head_before[k]) for k, v in probe.head.state_dict().items())
    assert set(result) >= {"top1", "top5", "train_acc", "epochs", "log"} and len(result["log"]) == 2
    # the probe's test accuracy is its head's on the clean test images
    assert result["top1"] == pytest.approx(result["log"][-1]["test_acc"], abs=1e-9)


def test_finetune_last_stage_changes_only_the_last_stage(session):
    teacher, _ = session.teacher()
    student, _ = load_student(_student_path(session))
    encoder = student.encoder
    assert encoder.last_stage_modules() == [encoder.layer3]  # small CIFAR ResNet
    before = _state(encoder)
    probe = FrozenEncoderProbe(encoder, session.dataset.num_classes, finetune_last_stage=True)
    probe.train()
    assert encoder.layer3.training and not encoder.layer2.training and not encoder.bn1.training
    probe.eval()
    assert not encoder.layer3.training
    config = ProbeConfig(epochs=1, batch_size=32, finetune_last_stage=True)
    groups = probe.trainable_groups(config)
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    probes.fit_probe(probe, "kd", session.dataset, "cpu", config, teacher=teacher)
    changed = {k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("layer3.") for k in changed), sorted(changed)
    bn_stats = {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    weights = changed - bn_stats
    assert bn_stats and weights  # BatchNorm in train mode there, and its weights at lr 1e-5


# -- the KD probe's loss ------------------------------------------------------------------------

def test_kd_probe_loss_is_kd_loss_weighted_0_7_and_ce_0_3(monkeypatch):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    method = KDProbeMethod()  # defaults: T 4, 0.7 KL, 0.3 CE
    assert (method.temperature, method.kd_weight, method.ce_weight) == (4.0, 0.7, 0.3)
    calls = []
    real = losses.kd_loss
    monkeypatch.setattr(losses, "kd_loss", lambda s, t, T, **kw: calls.append(T) or real(s, t, T, **kw))
    out = method.losses(StepOutputs(y, F.normalize(torch.randn(6, 3), dim=1), z_s, teacher_logits=z_t))
    assert calls == [4.0]
    assert set(out) == {"kd", "ce"}

    # naive float64: 0.7 * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + 0.3 * CE, mean over rows
    total_kd = total_ce = 0.0
    for i in range(6):
        s, t = z_s[i].double().tolist(), z_t[i].double().tolist()
        def softmax(v, T):
            m = max(v)
            e = [math.exp((x - m) / T) for x in v]
            return [x / sum(e) for x in e]
        p_s, p_t = softmax(s, 4.0), softmax(t, 4.0)
        total_kd += 16.0 * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        total_ce += -math.log(softmax(s, 1.0)[int(y[i])])
    assert float(out["kd"]) == pytest.approx(0.7 * total_kd / 6, rel=1e-5)
    assert float(out["ce"]) == pytest.approx(0.3 * total_ce / 6, rel=1e-5)


def test_kd_probe_and_knn_probe_on_a_student_leave_it_unchanged(session):
    teacher, _ = session.teacher()
    student, _ = load_student(_student_path(session))
    before = _state(student)
    result = probes.kd_probe(student, teacher, session.dataset, "cpu", ProbeConfig(epochs=1, batch_size=32))
    assert set(result) >= {"top1", "top5", "train_acc", "epochs", "log"}
    assert set(result["log"][0]["losses"]) == {"kd", "ce"}
    knn = probes.knn_probe(student, session.dataset, "cpu", k=5)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not student.training

    # k-NN against a naive loop over features of the clean images in eval mode
    ds = session.dataset
    with torch.no_grad():
        train_f = student.encoder.forward_features(data.normalise(ds.train_images, ds.mean, ds.std))
        test_f = student.encoder.forward_features(data.normalise(ds.test_images, ds.mean, ds.std))
    train_f, test_f = F.normalize(train_f.double(), dim=1), F.normalize(test_f.double(), dim=1)
    hits1 = hits5 = 0
    for i in range(test_f.shape[0]):
        sims = [(float(test_f[i] @ train_f[j]), j) for j in range(train_f.shape[0])]
        neighbours = [j for _, j in sorted(sims, key=lambda t: -t[0])[:5]]
        votes = [0] * ds.num_classes
        for j in neighbours:
            votes[int(ds.train_labels[j])] += 1
        ranked = sorted(range(ds.num_classes), key=lambda c: (-votes[c], c))
        hits1 += ranked[0] == int(ds.test_labels[i])
        hits5 += int(ds.test_labels[i]) in ranked[:5]
    n = test_f.shape[0]
    assert knn["top1"] == pytest.approx(100.0 * hits1 / n, abs=1e-4)
    assert knn["top5"] == pytest.approx(100.0 * hits5 / n, abs=1e-4)
    assert knn["k"] == 5


# -- probing saved runs -------------------------------------------------------------------------

def test_probe_results_go_into_checkpoint_and_record_beside_accuracy(session):
    path = _student_path(session)
    ds = session.dataset
    analyze_student_checkpoint(path, ds, "cpu", pictures=False)
    records_path = comprehensive_results_path(session.paths, session.cfg.model.student_arch, session.cfg.data.dataset)
    name = path.stem
    accuracy = read_json(records_path)[name]["accuracy"]
    bytes_before = path.read_bytes()

    teacher, _ = session.teacher()
    config = ProbeConfig(epochs=1, batch_size=32)
    linear = probes.probe_checkpoint(path, "linear", ds, "cpu", config=config)
    knn = probes.probe_checkpoint(path, "knn", ds, "cpu", k=5)
    kd = probes.probe_checkpoint(path, "kd", ds, "cpu", teacher=teacher, config=config)

    assert path.read_bytes() == bytes_before  # the checkpoint is never rewritten
    record = read_json(records_path)[name]
    assert record["probes"]["knn"]["top1"] == knn["top1"]
    assert record["probes"]["kd"]["teacher"] == teacher.fingerprint
    assert len(read_json(session.paths.training_log(f"{name}__probe_linear"))) == 1  # the probe's own log
    assert record["accuracy"] == accuracy
    assert record["probes"]["linear"]["top1"] == linear["top1"]
    assert record["probes"]["kd"]["top5"] == kd["top5"]
    assert record["probes"]["knn"]["k"] == 5
    assert "log" not in record["probes"]["linear"]
    assert not (session.paths.models / "in_progress").exists()

    # a later analysis keeps the probes beside its accuracy
    analyze_student_checkpoint(path, ds, "cpu", pictures=False)
    record = read_json(records_path)[name]
    assert record["accuracy"] == accuracy and set(record["probes"]) == {"linear", "knn", "kd"}


def test_probe_of_an_unanalysed_run_creates_its_record(session):
    path = _student_path(session)
    records_path = comprehensive_results_path(session.paths, session.cfg.model.student_arch, session.cfg.data.dataset)
    assert not records_path.exists()
    result = probes.probe_checkpoint(path, "knn", session.dataset, "cpu", k=3)
    record = read_json(records_path)[path.stem]
    ckpt = load_checkpoint(path)
    assert record["accuracy"]["test_acc"] == ckpt["metrics"]["test_acc"]
    assert record["probes"]["knn"]["top1"] == result["top1"]
    assert record["method"] == "ce" and record["kind"] == "student"
    with pytest.raises(ValueError, match="teacher"):
        probes.probe_checkpoint(path, "kd", session.dataset, "cpu")
