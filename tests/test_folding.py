"""The frozen teacher's BatchNorms folded into its convolutions: the same function (against the
unfolded model, on BatchNorm statistics far from the identity), every BatchNorm that follows a
convolution folded, the saved teacher untouched, and no fold where it would change the outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from desupcon.models import Teacher, build_encoder
from desupcon.models.folding import conv_batchnorm_pairs, fold_batchnorm
from desupcon.store.weights import fingerprint

ARCHS = ["resnet50", "resnet8", "resnet32x4", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet18"]


def _features_and_logits(encoder, x):
    features = encoder.pool_features(encoder.forward_feature_map(x))
    return features, encoder.fc(features)


def _random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_folded_encoder_computes_the_same_features_and_logits(arch):
    torch.manual_seed(0)
    encoder = _random_statistics(build_encoder(arch, 100))
    example = torch.randn(2, 3, 32, 32)
    folded, count = fold_batchnorm(encoder, _features_and_logits, example)
    after_conv = len(conv_batchnorm_pairs(encoder, _features_and_logits, example))
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    assert 0 < count <= after_conv
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == batchnorms - count
    if not arch.startswith("wrn"):  # every BatchNorm follows a convolution read by it alone
        assert count == after_conv == batchnorms
    else:  # pre-activation: BatchNorms mostly precede convolutions, and the stem's output is also the
        assert count == after_conv - 1  # first block's identity path, so that one BatchNorm stays
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        (f0, z0), (f1, z1) = _features_and_logits(encoder, x), _features_and_logits(folded, x)
    assert torch.allclose(z1, z0, rtol=0, atol=1e-5 * z0.abs().max().item())
    assert torch.allclose(f1, f0, rtol=0, atol=1e-5 * f0.abs().max().item())


def test_the_teacher_forward_uses_the_folded_copy_and_saves_the_original():
    torch.manual_seed(0)
    teacher = Teacher(_random_statistics(build_encoder("resnet8", 10))).eval()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    print_before = fingerprint(teacher.encoder, teacher.head)
    x = torch.randn(8, 3, 32, 32)
    out = teacher(x)
    features, logits = out.features, out.logits
    assert teacher.fold_batchnorm(torch.randn(2, 3, 32, 32)) == 9
    out = teacher(x)
    folded_features, folded_logits = out.features, out.logits
    assert teacher._inference_encoder(x) is not teacher.encoder
    assert torch.allclose(folded_logits, logits, rtol=0, atol=1e-5 * logits.abs().max().item())
    assert torch.allclose(folded_features, features, rtol=0, atol=1e-5 * features.abs().max().item())
    assert folded_logits.dtype == torch.float32
    saved = teacher.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    assert fingerprint(teacher.encoder, teacher.head) == print_before


class SharedOutput(nn.Module):
    """conv -> (bn, and the conv's output again): folding the conv would change the second use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_no_fold_where_the_convolution_output_is_used_again():
    model = _random_statistics(SharedOutput())
    folded, count = fold_batchnorm(model, lambda m, x: m(x), torch.randn(2, 3, 8, 8))
    assert count == 0 and folded is model


def _cast_calls(teacher, x) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            teacher(x)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


@pytest.mark.parametrize("fold", [True, False])
def test_weights_cast_once_give_autocasts_outputs_without_its_casts(fold):
    """bf16 weights kept (cast once): under bf16 autocast the same features and logits bit for bit
    as autocast casting them on every call, and one cast fewer per weight; outside that autocast
    region the float32 encoder runs; the saved state stays float32."""
    torch.manual_seed(0)
    teacher = Teacher(_random_statistics(build_encoder("resnet8", 10))).eval()
    if fold:
        teacher.fold_batchnorm(torch.randn(2, 3, 32, 32))
    x = torch.randn(8, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher(x)
        features, logits = out.features, out.logits
    casts_before = _cast_calls(teacher, x)
    cast = teacher.cast_weights_once(torch.bfloat16)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in teacher.encoder.modules())
    assert cast == convolutions > 0  # resnet8's convolutions (its one Linear, the classifier, stays float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher(x)
        features_cast, logits_cast = out.features, out.logits
    assert torch.equal(features_cast, features) and torch.equal(logits_cast, logits)
    assert logits_cast.dtype == torch.float32
    assert _cast_calls(teacher, x) <= casts_before - cast
    # float32 call (and fp16 autocast): the encoder itself, in float32
    assert teacher(x).features.dtype == torch.float32 and teacher._inference_encoder(x) is teacher.encoder
    assert all(v.dtype == torch.float32 for v in teacher.state_dict().values() if v.is_floating_point())
