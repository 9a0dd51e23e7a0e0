"""GPU paths (run by scripts/gpu_check.sh; skipped without CUDA): the automatic policy, a training
step under it, the float32 teacher classifier and --compile."""

import pytest
import torch

from desupcon.engine.devices import DevicePolicy, native_bf16

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_automatic_policy_on_this_gpu():
    policy = DevicePolicy.choose("cuda")
    assert policy.precision == ("bf16" if native_bf16(policy.device) else "fp16")
    assert policy.channels_last and policy.fused_adam


def test_training_on_the_gpu_matches_the_policy(tmp_path, tiny_config):
    from desupcon.session import Session
    cfg = tiny_config(tmp_path, epochs=2).replace(device="cuda", method={"method": "lw-supcrd"})
    session = Session(cfg, analyze=False)
    result = session.run(cfg)
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    teacher, _ = session.teacher()
    features, logits = teacher.features_and_logits(torch.randn(4, 3, 16, 16, device="cuda"), session.policy)
    assert logits.dtype == torch.float32


def test_compile_trains(tmp_path, tiny_config):
    from desupcon.session import Session
    cfg = tiny_config(tmp_path, epochs=1).replace(device="cuda", compile=True)
    assert Session(cfg, analyze=False).run(cfg.replace(method={"method": "crd"})).metrics["test_acc"] >= 0
