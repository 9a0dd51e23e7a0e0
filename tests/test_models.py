"""Tests of desupcon.models (SPEC section 2): encoders, Student/Teacher wrappers, weight loading.

ResNet-50 is built once per module (fixtures) and used only by tests about ResNet-50 itself
(its shape and stem, and loading torchvision-layout ResNet-50 checkpoints); everything else uses
the small CIFAR ResNets.
"""

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from desupcon.store import weights as teacher_weights
from desupcon.models.zoo import ZOO

from desupcon.models import (
    load_matching_state_dict,
    ARCHITECTURES,
    CheckpointMismatchError,
    Student,
    Teacher,
    build_encoder,
)

FEATURE_DIMS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048,
    "resnet8": 64, "resnet14": 64, "resnet20": 64, "resnet32": 64, "resnet44": 64,
    "resnet56": 64, "resnet110": 64, "resnet8x4": 256, "resnet32x4": 256,
}


def load_encoder_weights(encoder, path):
    """The toolkit's --teacher-weights loader, for a dataset with the encoder's class count."""
    dataset = SimpleNamespace(num_classes=encoder.fc.out_features, name="test-data")
    teacher_weights.load_encoder_weights(
        encoder, teacher_weights.read_state_dict(teacher_weights.resolve_source(str(path))), str(path),
        dataset.num_classes, dataset.name)


def _x(b=2, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _check_encoder(name, encoder, num_classes=7, cifar_stem=False):
    """One forward_features pass on (2, 3, 32, 32) plus one full forward on a single sample
    (eval mode, so per-sample results do not depend on the batch). In float64: a deep network at
    its initialisation, with BatchNorm's initial statistics, reaches activations of 1e5 or more,
    where float32's batch-size-dependent summation order alone differs by more than the tolerance."""
    encoder.eval().double()
    x = _x().double()
    seen = {}

    def hook(module, inputs, output):
        seen["layer1"] = tuple(output.shape)

    handle = encoder.layer1.register_forward_hook(hook)
    with torch.no_grad():
        features = encoder.forward_features(x)
        logits_one = encoder(x[1:])
        logits = encoder.fc(features)
    handle.remove()
    assert features.shape == (2, FEATURE_DIMS[name])
    assert encoder.feature_dim == FEATURE_DIMS[name]
    assert logits.shape == (2, num_classes) and logits_one.shape == (1, num_classes)
    assert isinstance(encoder.fc, nn.Linear)
    assert encoder.fc.in_features == FEATURE_DIMS[name] and encoder.fc.out_features == num_classes
    # the full forward is the classifier on forward_features
    torch.testing.assert_close(logits_one, logits[1:], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    # no spatial down-sampling before layer1: it sees the full 32 x 32 input
    assert seen["layer1"][-2:] == (32, 32)
    if cifar_stem:
        assert isinstance(encoder.conv1, nn.Conv2d)
        assert encoder.conv1.kernel_size == (3, 3)
        assert encoder.conv1.stride == (1, 1)
        assert encoder.conv1.padding == (1, 1)
        assert encoder.conv1.in_channels == 3 and encoder.conv1.out_channels == 64
        assert isinstance(encoder.maxpool, nn.Identity)


# --------------------------------------------------------------------------------------------
# Fixtures: ResNet-50 built once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_source():
    torch.manual_seed(123)
    return build_encoder("resnet50", 100)


@pytest.fixture(scope="module")
def resnet50_state(resnet50_source):
    return {k: v.clone() for k, v in resnet50_source.state_dict().items()}


@pytest.fixture(scope="module")
def resnet50_teacher():
    torch.manual_seed(456)
    return Teacher(build_encoder("resnet50", 100))


def _scramble(module):
    """Overwrite every parameter and floating buffer so a later load must restore all of them."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.fill_(0.125)
            else:
                t.fill_(7)


def _assert_state_equal(module, state):
    own = module.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def test_architecture_table_has_expected_names():
    # the CIFAR ResNets here, the rest of the KD zoo in tests/test_zoo.py
    assert set(ARCHITECTURES) == set(FEATURE_DIMS) | set(ZOO)


@pytest.mark.parametrize("name", sorted(n for n in FEATURE_DIMS if n not in ("resnet18", "resnet34", "resnet50")))
def test_small_architectures_build_and_map(name):
    _check_encoder(name, build_encoder(name, 7))


def test_small_resnet_depths():
    # (depth - 2) / 6 basic blocks per stage, three stages
    for name, blocks in (("resnet8", 1), ("resnet20", 3), ("resnet56", 9), ("resnet8x4", 1)):
        enc = build_encoder(name, 7)
        assert [len(enc.layer1), len(enc.layer2), len(enc.layer3)] == [blocks] * 3
        assert not hasattr(enc, "layer4")
    x4 = build_encoder("resnet8x4", 7)
    assert x4.conv1.out_channels == 32
    assert [x4.layer1[0].conv1.out_channels, x4.layer2[0].conv1.out_channels,
            x4.layer3[0].conv1.out_channels] == [64, 128, 256]


def test_resnet18_builds_maps_and_has_cifar_stem():
    enc = build_encoder("resnet18", 7)
    _check_encoder("resnet18", enc, cifar_stem=True)


def test_resnet34_builds_and_maps():
    enc = build_encoder("resnet34", 7)
    _check_encoder("resnet34", enc, cifar_stem=True)


def test_resnet50_builds_maps_and_has_cifar_stem():
    enc = build_encoder("resnet50", 7)
    _check_encoder("resnet50", enc, cifar_stem=True)
    # torchvision state-dict layout
    keys = set(enc.state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer4.2.bn3.weight",
              "fc.weight", "fc.bias"):
        assert k in keys


def test_unknown_architecture_lists_known():
    with pytest.raises(ValueError) as info:
        build_encoder("vgg17", 10)
    msg = str(info.value)
    assert "vgg17" in msg
    for name in ("resnet18", "resnet50", "resnet8x4", "resnet110"):
        assert name in msg


# --------------------------------------------------------------------------------------------
# Student
# --------------------------------------------------------------------------------------------


def test_student_forward_shapes_and_unit_projection():
    torch.manual_seed(0)
    student = Student(build_encoder("resnet8", 5))
    out = student(_x(4))
    features, projection, logits = out.features, out.projection, out.logits
    assert features.shape == (4, 64)
    assert projection.shape == (4, 64)
    assert logits.shape == (4, 5)
    torch.testing.assert_close(projection.norm(dim=1), torch.ones(4), rtol=0, atol=1e-5)
    # projector MLP feat -> 128 -> 64 with a ReLU between
    linears = [m for m in student.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 64)]
    assert any(isinstance(m, nn.ReLU) for m in student.projector)
    assert student.classifier is student.encoder.fc
    torch.testing.assert_close(logits, student.encoder.fc(features))


def test_student_resnet18_dims():
    student = Student(build_encoder("resnet18", 100))
    out = student(_x(2))
    features, projection, logits = out.features, out.projection, out.logits
    assert features.shape == (2, 512) and projection.shape == (2, 64) and logits.shape == (2, 100)
    linears = [m for m in student.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 128), (128, 64)]


def _grad_norms(student, detach):
    student.zero_grad(set_to_none=True)
    logits = (student(_x(4), detach_classifier=detach)).logits
    logits.pow(2).sum().backward()
    conv = student.encoder.conv1.weight.grad
    deep = student.encoder.layer3[0].conv2.weight.grad
    return (0.0 if conv is None else float(conv.abs().sum()),
            0.0 if deep is None else float(deep.abs().sum()),
            float(student.encoder.fc.weight.grad.abs().sum()))


def test_student_detach_classifier_blocks_encoder_gradient():
    torch.manual_seed(1)
    student = Student(build_encoder("resnet8", 5))
    conv, deep, fc = _grad_norms(student, detach=True)
    assert conv == 0.0 and deep == 0.0
    assert fc > 0.0
    # without detaching, the same loss does reach the encoder
    conv, deep, fc = _grad_norms(student, detach=False)
    assert conv > 0.0 and deep > 0.0 and fc > 0.0


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------


def _small_teacher(classes=5, seed=2):
    torch.manual_seed(seed)
    return Teacher(build_encoder("resnet8", classes))


def test_teacher_freezes_encoder_and_head_is_trainable():
    teacher = _small_teacher()
    enc_params = list(teacher.encoder.parameters())
    assert enc_params and all(not p.requires_grad for p in enc_params)
    head_params = list(teacher.head.parameters())
    assert head_params and all(p.requires_grad for p in head_params)
    linears = [m for m in teacher.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 512), (512, 128), (128, 64)]


def test_teacher_train_keeps_encoder_in_eval():
    teacher = _small_teacher()
    result = teacher.train()
    assert result is teacher
    assert teacher.training and teacher.head.training
    assert all(m.training for m in teacher.head.modules())
    assert not any(m.training for m in teacher.encoder.modules())
    bns = [m for m in teacher.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    # a forward in train mode leaves the BatchNorm statistics untouched
    before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    teacher(_x(4) * 3 + 1)
    for k, v in teacher.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    teacher.eval()
    assert not teacher.head.training and not teacher.encoder.training
    teacher.train()
    assert teacher.head.training and not teacher.encoder.training


def test_teacher_forward_returns_detached_features_and_logits():
    teacher = _small_teacher(classes=6).train()
    x = _x(3)
    out = teacher(x)
    features, logits = out.features, out.logits
    assert features.shape == (3, 64) and logits.shape == (3, 6)
    assert not features.requires_grad and not logits.requires_grad
    assert features.grad_fn is None and logits.grad_fn is None
    with torch.no_grad():
        expected_f = teacher.encoder.forward_features(x)
    torch.testing.assert_close(features, expected_f)
    torch.testing.assert_close(logits, teacher.encoder.fc(expected_f))


def test_teacher_project_unit_norm_and_gradient_reaches_head_only():
    teacher = _small_teacher().train()
    out = teacher(_x(4))
    features = out.features
    # features that carry a graph (as if from a trainable network) must not receive gradient
    source = features.clone().requires_grad_(True)
    z = teacher.project(source)
    assert z.shape == (4, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4), rtol=0, atol=1e-5)
    target = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    (z * target).sum().backward()
    assert source.grad is None
    for p in teacher.head.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    for p in teacher.encoder.parameters():
        assert p.grad is None


def test_teacher_resnet50_head_dims(resnet50_teacher):
    linears = [m for m in resnet50_teacher.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 512), (512, 128), (128, 64)]
    assert resnet50_teacher.encoder.fc.weight.shape == (100, 2048)


# --------------------------------------------------------------------------------------------
# Weight loading: ResNet-50 checkpoints in torchvision/timm layout
# --------------------------------------------------------------------------------------------


def test_load_resnet50_state_dict_exactly(tmp_path, resnet50_state):
    path = tmp_path / "r50.pt"
    torch.save(resnet50_state, path)
    torch.manual_seed(789)
    teacher = Teacher(build_encoder("resnet50", 100))
    assert not torch.equal(teacher.encoder.conv1.weight, resnet50_state["conv1.weight"])
    load_encoder_weights(teacher.encoder, path)
    _assert_state_equal(teacher.encoder, resnet50_state)
    # still frozen and in eval after loading
    assert not any(p.requires_grad for p in teacher.encoder.parameters())
    assert not teacher.encoder.training


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _renamed_fc(state, alias):
    return {(alias + k[len("fc."):] if k.startswith("fc.") else k): v for k, v in state.items()}


@pytest.mark.parametrize("variant", [
    "state_dict", "model", "module", "classifier", "final_classifier", "state_dict+module+classifier",
])
def test_load_resnet50_wrapped_variants(tmp_path, resnet50_state, resnet50_teacher, variant):
    if variant == "state_dict":
        obj = {"state_dict": resnet50_state, "epoch": 200}
    elif variant == "model":
        obj = {"model": resnet50_state, "optimizer": {"lr": 0.1}}
    elif variant == "module":
        obj = _prefixed(resnet50_state, "module.")
    elif variant == "classifier":
        obj = _renamed_fc(resnet50_state, "classifier.")
        assert "classifier.weight" in obj and "fc.weight" not in obj
    elif variant == "final_classifier":
        obj = _renamed_fc(resnet50_state, "final_classifier.")
        assert "final_classifier.bias" in obj and "fc.bias" not in obj
    else:
        obj = {"state_dict": _prefixed(_renamed_fc(resnet50_state, "classifier."), "module.")}
    path = tmp_path / f"{variant}.pt"
    torch.save(obj, path)
    encoder = resnet50_teacher.encoder
    _scramble(encoder)
    assert not torch.equal(encoder.fc.weight, resnet50_state["fc.weight"])
    load_encoder_weights(encoder, path)
    _assert_state_equal(encoder, resnet50_state)


def test_load_resnet18_into_resnet50_lists_missing_and_misshaped(tmp_path, resnet50_teacher):
    path = tmp_path / "r18.pt"
    torch.save(build_encoder("resnet18", 100).state_dict(), path)
    encoder = resnet50_teacher.encoder
    _scramble(encoder)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(encoder, path)
    msg = str(info.value)
    assert str(path) in msg
    assert "missing keys" in msg
    assert "layer1.0.conv3.weight" in msg  # a Bottleneck-only key
    assert "shape mismatches" in msg
    assert "layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in msg
    # nothing was loaded
    assert float(encoder.conv1.weight.abs().max()) == 0.125


def test_load_resnet50_into_resnet18_lists_unexpected(tmp_path, resnet50_state):
    # resnet18's keys are a subset of resnet50's, so the unexpected-key listing shows this way round
    path = tmp_path / "r50.pt"
    torch.save(resnet50_state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(build_encoder("resnet18", 100), path)
    msg = str(info.value)
    assert "unexpected keys" in msg
    assert "layer1.0.conv3.weight" in msg
    assert "missing keys" not in msg


def test_mismatch_lists_both_missing_and_unexpected(tmp_path):
    enc = build_encoder("resnet8", 10)
    state = dict(enc.state_dict())
    del state["layer2.0.bn1.running_var"]
    state["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(build_encoder("resnet8", 10), path)
    msg = str(info.value)
    assert "missing keys (1): layer2.0.bn1.running_var" in msg
    assert "unexpected keys (1): head.extra.weight" in msg
    assert "shape mismatches" not in msg


def test_only_unexpected_keys_still_rejected(tmp_path):
    """Strict loading: an otherwise complete state dict with one extra key is refused."""
    enc = build_encoder("resnet8", 10)
    state = dict(enc.state_dict())
    state["projector.0.weight"] = torch.zeros(128, 64)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    target = build_encoder("resnet8", 10)
    before = target.conv1.weight.clone()
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(target, path)
    msg = str(info.value)
    assert "unexpected keys (1): projector.0.weight" in msg
    assert "missing keys" not in msg and "shape mismatches" not in msg
    assert torch.equal(target.conv1.weight, before)


def test_class_count_mismatch_names_fc_shapes(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save(build_encoder("resnet8", 10).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(build_encoder("resnet8", 100), path)
    msg = str(info.value)
    assert "classifier for 10 classes" in msg and "has 100 classes" in msg
    with pytest.raises(CheckpointMismatchError) as info:
        load_matching_state_dict(build_encoder("resnet8", 100), torch.load(path), source=str(path))
    msg = str(info.value)
    assert "fc.weight: file (10, 64) vs model (100, 64)" in msg
    assert "fc.bias: file (10,) vs model (100,)" in msg
    assert "missing keys" not in msg and "unexpected keys" not in msg


def test_small_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    src = build_encoder("resnet8x4", 10)
    path = tmp_path / "small.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(4)
    dst = build_encoder("resnet8x4", 10)
    load_encoder_weights(dst, path)
    _assert_state_equal(dst, src.state_dict())


def test_truncated_file_raises_naming_path(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(build_encoder("resnet8", 10).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(build_encoder("resnet8", 10), bad)
    assert str(bad) in str(info.value)


def test_random_bytes_file_raises_naming_path(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(build_encoder("resnet8", 10), bad)
    assert str(bad) in str(info.value)


def test_non_dict_checkpoint_raises(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_weights(build_encoder("resnet8", 10), path)
    assert str(path) in str(info.value) and "Tensor" in str(info.value)


def test_missing_path_raises_file_not_found(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_encoder_weights(build_encoder("resnet8", 10), path)
    assert not isinstance(info.value, CheckpointMismatchError)
    assert str(path) in str(info.value)
