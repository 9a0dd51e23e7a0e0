"""Every device policy a GPU run uses, exercised on the CPU: bf16 autocast, channels_last, fused
Adam and the deferred finiteness check (the one path on every device)."""

import shutil

import pytest
import torch

from desupcon.config import run_name
from desupcon.engine.finite import NonFiniteLossError
from desupcon.engine.run import Run
from desupcon.engine.build import make_student_run
from desupcon.store.checkpoint import load_checkpoint
from desupcon.engine.devices import DevicePolicy
from desupcon.session import Session

CPU = torch.device("cpu")
POLICIES = {
    "fp32": DevicePolicy(CPU),
    "bf16": DevicePolicy(CPU, precision="bf16"),
    "channels_last+fused": DevicePolicy(CPU, channels_last=True, fused_adam=True),
    "gpu-like": DevicePolicy(CPU, precision="bf16", channels_last=True, fused_adam=True),
}


def test_automatic_choice():
    auto = DevicePolicy.choose("cpu")
    assert (auto.precision, auto.channels_last, auto.fused_adam) == ("fp32", False, False)
    assert DevicePolicy.choose("cpu", "bf16").precision == "bf16"
    with pytest.raises(ValueError, match="--precision"):
        DevicePolicy.choose("cpu", "fp8")
    assert DevicePolicy(CPU, precision="fp16").grad_scaler().is_enabled()
    assert not DevicePolicy(CPU, precision="bf16").grad_scaler().is_enabled()


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("policy-teacher")
    Session(tiny_config(root).replace(data={"train_subset": 96, "test_subset": 32})).teacher()
    return root


def _session(tmp_path, teacher_root, tiny_config, policy, epochs=2, train_images=96):
    (tmp_path / "pth_models").mkdir(parents=True, exist_ok=True)
    for f in (teacher_root / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(f, tmp_path / "pth_models" / f.name)
    cfg = tiny_config(tmp_path, epochs=epochs).replace(data={"train_subset": train_images, "test_subset": 32})
    return Session(cfg, analyze=False, policy=policy)


@pytest.mark.parametrize("name", list(POLICIES))
def test_each_policy_trains_and_lockstep_equals_solo(tmp_path, teacher_root, tiny_config, name):
    policy = POLICIES[name]
    # bf16 convolutions are slow on most CPUs: a few small steps are enough to exercise the path
    session = _session(tmp_path / "lockstep", teacher_root, tiny_config, policy, epochs=3, train_images=96)
    cfgs = [session.cfg.replace(method={"method": m}) for m in ("lw-supcrd", "ce")]
    together = session.run_many(cfgs)
    for result in together:
        losses = [e["loss"] for e in result.log]
        assert losses[-1] < losses[0], f"{name} {result.name}: {losses}"
    solo = _session(tmp_path / "solo", teacher_root, tiny_config, policy, epochs=3, train_images=96)
    alone = solo.run(cfgs[0].replace(output_dir=str(tmp_path / "solo")))
    a, b = load_checkpoint(together[0].checkpoint)["student"], load_checkpoint(alone.checkpoint)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: lockstep differs from solo"
    if policy.channels_last:
        run = make_student_run(cfgs[0], session.dataset, session.teacher()[0], policy)
        assert run.model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert run.optimizer.defaults.get("fused") is True


@pytest.mark.parametrize("name", ["fp32", "channels_last+fused"])
def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, teacher_root, tiny_config, name,
                                                             monkeypatch):
    policy = POLICIES[name]
    session = _session(tmp_path, teacher_root, tiny_config, policy, epochs=3)
    cfg = session.cfg.replace(method={"method": "lw-supcrd"})
    real_losses = Run.step
    calls = {"n": 0}

    def poisoned_step(self, indices, view1, views, labels, teacher_out):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2 (3 steps per epoch), step 2
            view1, views = view1 * float("nan"), views * float("nan")
        return real_losses(self, indices, view1, views, labels, teacher_out)
    monkeypatch.setattr(Run, "step", poisoned_step)
    with pytest.raises(NonFiniteLossError) as info:
        session.run(cfg)
    assert "at epoch 2, step 2" in str(info.value)
    partial = session.paths.partial_checkpoint(run_name(cfg))
    state = load_checkpoint(partial, "in_progress")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not session.paths.checkpoint(run_name(cfg)).exists()


def test_teacher_logits_are_float32_under_bf16(teacher_root, tiny_config, tmp_path):
    session = _session(tmp_path, teacher_root, tiny_config, POLICIES["bf16"])
    teacher, _ = session.teacher()
    x = torch.randn(4, 3, 16, 16)
    out = teacher.features_and_logits(x, POLICIES["bf16"])
    features, logits = out.features, out.logits
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
    expected = teacher.encoder.fc(features.float())
    assert torch.allclose(logits, expected)


def test_true_float32_turns_autocast_and_tf32_off_and_restores_them():
    """The losses and the teacher's classifier run in IEEE float32: autocast off and, on CUDA, TF32
    matmuls off inside the region, the caller's settings back afterwards (even after an error)."""
    from desupcon.precision import true_float32
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with true_float32("cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
        with pytest.raises(RuntimeError), true_float32("cuda"):
            raise RuntimeError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    a = torch.randn(8, 8)
    policy = DevicePolicy(torch.device("cpu"), "bf16")
    with policy.autocast():
        assert (a @ a).dtype == torch.bfloat16
        with policy.full_precision():
            assert (a @ a).dtype == torch.float32
            assert torch.allclose(a @ a, (a.double() @ a.double()).float(), atol=1e-5)  # (bf16: ~1e-2 off)
