"""FitNet: the regressor's branches, the loss and its gradients against a float64 evaluation written
out here, a training epoch through the command line, lockstep with KD equal to training alone, and
an interrupted run resumed bit for bit."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from desupcon import cli, losses
from desupcon.config import MethodConfig, preset, run_name
from desupcon.config.validation import ConfigError
from desupcon.engine.run import Run
from desupcon.methods import build_method
from desupcon.methods.fitnet import HintRegressor
from desupcon.models import build_encoder, Student, Teacher
from desupcon.session import Session
from desupcon.store.checkpoint import load_checkpoint


@pytest.mark.parametrize("student, teacher, kind, kernel", [
    ((8, 16, 16), (12, 8, 8), torch.nn.Conv2d, (3, 3)),  # the student's map twice the teacher's
    ((8, 8, 8), (12, 16, 16), torch.nn.ConvTranspose2d, (4, 4)),  # half the teacher's
    ((8, 8, 8), (12, 8, 8), torch.nn.Conv2d, (1, 1)),  # equal
    ((8, 10, 9), (12, 8, 8), torch.nn.Conv2d, (3, 2)),  # larger: the kernel absorbs the difference
])
def test_the_regressor_maps_the_student_hint_onto_the_teacher_shape(student, teacher, kind, kernel):
    regressor = HintRegressor(student, teacher)
    assert type(regressor.conv) is kind and regressor.conv.kernel_size == kernel
    assert regressor(torch.randn(2, *student)).shape == (2, *teacher)


def test_a_student_map_below_half_the_teacher_is_refused():
    with pytest.raises(ConfigError, match="smaller than half"):
        HintRegressor((8, 4, 4), (12, 16, 16))


def _naive_hint_loss(x, weight, bias, gamma, beta, target, transposed, stride, padding, eps=1e-5):
    """float64: convolution, BatchNorm with the batch's biased variance, ReLU, mean of squares."""
    conv = F.conv_transpose2d if transposed else F.conv2d
    y = conv(x, weight, bias, stride=stride, padding=padding)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (y - mean) / torch.sqrt(var + eps) * gamma[None, :, None, None] + beta[None, :, None, None]
    r = torch.clamp(y, min=0.0)
    return ((r - target) ** 2).sum() / r.numel()


@pytest.mark.parametrize("shapes", [((6, 8, 8), (5, 4, 4)), ((6, 4, 4), (5, 8, 8)), ((6, 6, 6), (5, 4, 4))])
def test_loss_and_regressor_gradients_equal_a_float64_evaluation(shapes):
    torch.manual_seed(0)
    method = build_method(preset("quick").with_method("fitnet").method)  # with FitNet's own defaults
    method.regressor = HintRegressor(*shapes)
    with torch.no_grad():  # a BatchNorm that is not the identity at start
        method.regressor.bn.weight.uniform_(0.5, 1.5)
        method.regressor.bn.bias.uniform_(-0.2, 0.2)
    method.train()
    x, target = torch.randn(4, *shapes[0]), torch.rand(4, *shapes[1])
    got = method.cfg.feat_weight * losses.hint_loss(method.regressor(x), target)
    got.backward()

    conv, bn = method.regressor.conv, method.regressor.bn
    leaves = [p.detach().double().requires_grad_() for p in (conv.weight, conv.bias, bn.weight, bn.bias)]
    expected = 100.0 * _naive_hint_loss(x.double(), *leaves, target.double(),
                                        isinstance(conv, torch.nn.ConvTranspose2d), conv.stride, conv.padding)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for p, leaf in zip((conv.weight, conv.bias, bn.weight, bn.bias), leaves):
        torch.testing.assert_close(p.grad.double(), leaf.grad, rtol=1e-4, atol=1e-5)
    # closed form: BatchNorm on batch statistics removes any constant shift, so the conv bias gets none
    assert leaves[1].grad.abs().max() < 1e-10 < leaves[0].grad.abs().max()
    assert method.cfg.feat_weight == 100.0 and method.cfg.ce_weight == 1.0 and method.cfg.hint_layer == 2


def test_gradcheck_of_the_regressed_hint_loss():
    torch.manual_seed(1)
    regressor = HintRegressor((3, 4, 4), (2, 2, 2)).double().train()
    x, target = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True), torch.rand(3, 2, 2, 2).double()
    assert torch.autograd.gradcheck(lambda v: losses.hint_loss(regressor(v), target), (x,))


def test_the_method_reads_stage_h_of_both_models_and_refuses_a_missing_stage():
    student, teacher = Student(build_encoder("resnet8", 10)), Teacher(build_encoder("resnet20", 10))
    dataset = type("D", (), {"image_size": 32})()
    method = build_method(MethodConfig(method="fitnet"))
    method.setup(dataset, student, teacher)
    # resnet8 and resnet20 at 32x32: stage 2 is 32x16x16 in both, so a 1x1 regressor
    assert method.regressor.conv.kernel_size == (1, 1) and method.regressor.conv.in_channels == 32
    assert [n for n, _ in method.named_parameters()] == ["regressor.conv.weight", "regressor.conv.bias",
                                                         "regressor.bn.weight", "regressor.bn.bias"]
    with pytest.raises(ConfigError, match="past the student's last stage"):
        build_method(MethodConfig(method="fitnet", hint_layer=4)).setup(dataset, student, teacher)


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("fitnet-teacher")
    Session(tiny_config(root)).teacher()
    return root


def _with_teacher(folder, teacher_root):
    (folder / "pth_models").mkdir(parents=True)
    for f in (teacher_root / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(f, folder / "pth_models" / f.name)
    return folder


def test_an_epoch_through_the_command_line(tmp_path):
    out = tmp_path / "out"
    args = ["train", "--preset", "quick", "--method", "fitnet", "--epochs", "1", "--train-subset", "64",
            "--test-subset", "32", "--batch-size", "32", "--teacher-arch", "resnet8", "--student-arch", "resnet8",
            "--train-teacher", "--teacher-epochs", "1", "--device", "cpu", "--output-dir", str(out)]
    assert cli.main([*args, "--hint-layer", "1"]) == 0
    (ckpt_path,) = (out / "pth_models").glob("student_fitnet_*.pth")
    assert "hint1" in ckpt_path.stem.split("_")
    ckpt = load_checkpoint(ckpt_path, "student")
    assert ckpt["identity"]["method"]["hint_layer"] == 1 and ckpt["identity"]["method"]["feat_weight"] == 100.0
    assert set(ckpt["log"][0]["losses"]) == {"ce", "fitnet"} and ckpt["log"][0]["losses"]["fitnet"] > 0
    assert {"regressor.conv.weight", "regressor.bn.running_mean"} <= set(ckpt["method_state"])
    assert ckpt["metrics"]["teacher_projection_used"] is False


def test_lockstep_with_kd_equals_training_alone(tmp_path, teacher_root, tiny_config):
    cfg = tiny_config(_with_teacher(tmp_path / "solo", teacher_root), epochs=1)
    variants = [cfg.with_method("fitnet"), cfg.with_method("kd")]
    solo = [Session(cfg, analyze=False).run(v) for v in variants]
    lock_cfg = cfg.replace(output_dir=str(_with_teacher(tmp_path / "lock", teacher_root)))
    lock = Session(lock_cfg, analyze=False).run_many([v.replace(output_dir=lock_cfg.output_dir) for v in variants],
                                                     lockstep=True)
    for a, b in zip(solo, lock):
        ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
        assert a.name == b.name
        for part in ("student", "method_state"):
            for k in ca[part] or {}:
                assert torch.equal(ca[part][k], cb[part][k]), f"{a.name}: {part} {k}"


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, teacher_root, tiny_config, monkeypatch):
    cfg = tiny_config(_with_teacher(tmp_path / "whole", teacher_root), epochs=3).with_method("fitnet")
    whole = Session(cfg, analyze=False).run(cfg)
    cfg_b = cfg.replace(output_dir=str(_with_teacher(tmp_path / "resumed", teacher_root)))
    finished = {"n": 0}
    real = Run.finish_epoch

    def killed_after_two(self, *args, **kwargs):
        if self.kind == "student" and finished["n"] == 2:
            raise KeyboardInterrupt
        finished["n"] += self.kind == "student"
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Run, "finish_epoch", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            Session(cfg_b, analyze=False).run(cfg_b)
    closed = []
    with monkeypatch.context() as m:
        m.setattr(Run, "finish_epoch", lambda self, *a, **k: closed.append(self.epoch + 1) or real(self, *a, **k))
        resumed = Session(cfg_b, analyze=False).run(cfg_b)
    assert closed == [3]  # the third epoch alone: the first two came from the checkpoint
    assert resumed.name == whole.name == run_name(cfg)
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for part in ("student", "method_state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} {k}"
    assert [e["test_acc"] for e in a["log"]] == [e["test_acc"] for e in b["log"]]
