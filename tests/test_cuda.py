"""GPU paths (run by scripts/gpu_check.sh; skipped without CUDA): the automatic policy, a training
step under it, the float32 teacher classifier, --compile, fused lockstep, the teacher's cast
weights and --cuda-graphs (replays against the eager step; a NaN replay reported at its step)."""

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
    assert teacher.features_and_logits(torch.randn(4, 3, 16, 16, device="cuda"), session.policy).logits.dtype \
        == torch.float32


def test_compile_trains(tmp_path, tiny_config):
    from desupcon.session import Session
    cfg = tiny_config(tmp_path, epochs=1).replace(device="cuda", compile=True)
    assert Session(cfg, analyze=False).run(cfg.replace(method={"method": "crd"})).metrics["test_acc"] >= 0


def test_fused_lockstep_on_the_gpu_trains_like_solo_runs(tmp_path, tiny_config):
    """The GPU policy's channels_last weights, fused optimiser and autocast under fused lockstep:
    the weights after 2 epochs stay close to the solo runs' (bf16 tolerance)."""
    from desupcon.session import Session
    from desupcon.store.checkpoint import load_checkpoint
    weights = {}
    for fused in (False, True):
        base = tiny_config(tmp_path / str(fused), epochs=2).replace(device="cuda", fused_lockstep=fused,
                                                                    optim={"optimizer": "sgd", "lr": 0.02})
        cfgs = [base.with_method("lw-supcrd").replace(method={"alpha": a}) for a in (0.5, 2.0)]
        weights[fused] = [load_checkpoint(r.checkpoint)["student"]
                          for r in Session(base, analyze=False).run_many(cfgs)]
    for solo, fused in zip(weights[False], weights[True]):
        for key, value in solo.items():
            if value.is_floating_point():
                scale = value.abs().max().item() + 1e-6
                assert (fused[key] - value).abs().max().item() <= 0.05 * scale, key


def test_teacher_weights_cast_once_on_the_gpu_give_autocasts_outputs():
    from desupcon.models import Teacher, build_encoder
    policy = DevicePolicy.choose("cuda")
    torch.manual_seed(0)
    teacher = policy.prepare(Teacher(build_encoder("resnet8", 10))).eval()
    teacher.fold_batchnorm(policy.inputs(torch.randn(2, 3, 32, 32, device="cuda")))
    x = policy.inputs(torch.randn(8, 3, 32, 32, device="cuda"))
    before = teacher.features_and_logits(x, policy)
    assert teacher.cast_weights_once(policy.autocast_dtype) > 0
    after = teacher.features_and_logits(x, policy)
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3) for a, b in zip(after, before))
    assert after[1].dtype == torch.float32


def test_cuda_graph_replays_give_the_eager_steps_weights(tmp_path, tiny_config, made_step_graphs):
    """--cuda-graphs on the GPU: the same 2 epochs as the eager loop (bitwise where cuDNN picks the
    same kernels; bf16 tolerance otherwise), with replays actually made."""
    from desupcon.session import Session
    from desupcon.store.checkpoint import load_checkpoint
    made = made_step_graphs
    weights = {}
    for graphed in (False, True):
        base = tiny_config(tmp_path / str(graphed), epochs=2, train_images=160).replace(
            device="cuda", cuda_graphs=graphed, optim={"batch_size": 16})
        cfgs = [base.with_method("lw-supcrd"), base.with_method("ce"), base.with_method("kd"),
                base.with_method("lw-supcrd").replace(method={"bank_size": 32})]
        weights[graphed] = [load_checkpoint(r.checkpoint)["student"]
                            for r in Session(base, analyze=False).run_many(cfgs)]
    assert any(s.replays > 0 and s.runs[0].kind == "student" for s in made)
    for eager, graphed in zip(weights[False], weights[True]):
        for key, value in eager.items():
            if value.is_floating_point():
                scale = value.abs().max().item() + 1e-6
                assert (graphed[key] - value).abs().max().item() <= 0.05 * scale, key


def test_a_nan_batch_in_a_cuda_graph_replay_is_reported_at_its_step(tmp_path, tiny_config, nan_batch_at):
    """The step counter lives on the device: a NaN batch replayed at step 6 says step 6 (a number
    baked into the graph at its capture, step 3, would say 3)."""
    from desupcon.engine.finite import NonFiniteLossError
    from desupcon.session import Session
    nan_batch_at(6)
    cfg = tiny_config(tmp_path, epochs=1, train_images=160).replace(
        device="cuda", cuda_graphs=True, optim={"batch_size": 16})
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 6"):
        Session(cfg, analyze=False).run(cfg.with_method("lw-supcrd"))

