"""Every architecture's stages (`forward_stages`): the literature's feats / preact entries with the
declared channels and the shapes of the published table at 32x32, preact differing from feats
exactly where the architecture says, the final map and pooled vector equal to the plain forward's
bit for bit, no BatchNorm statistics touched by reading pre-activations, and the folded teacher's
stages equal to the unfolded teacher's."""

import copy

import pytest
import torch

from desupcon.models import ARCHITECTURES, build_encoder

# (C, H, W) of feats[0..n] at 32x32 input, as the KD literature's models give them
EXPECTED = {
    **{f"resnet{d}": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)] for d in (8, 14, 20, 32, 44, 56, 110)},
    **{a: [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)] for a in ("resnet8x4", "resnet32x4")},
    **{a: [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)] for a in ("wrn_16_1", "wrn_40_1")},
    **{a: [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)] for a in ("wrn_16_2", "wrn_40_2")},
    **{f"vgg{d}": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)] for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    "ShuffleV1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "ShuffleV2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)],
    **{a: [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
       for a in ("ResNet18", "ResNet34", "resnet18", "resnet34")},
    **{a: [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)] for a in ("ResNet50", "resnet50")},
}
# the architectures whose stage outputs are linear (preact is feats itself)
LINEAR_STAGES = {"MobileNetV2"}
# the architectures whose final map is one layer after the last stage
FINAL_MAP_AFTER_STAGES = {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "MobileNetV2", "ShuffleV2"}


def test_every_architecture_has_its_expected_stages():
    assert set(EXPECTED) == set(ARCHITECTURES)


def _trained_like(arch: str) -> torch.nn.Module:
    """An encoder with non-trivial BatchNorm statistics and affine parameters, as a trained one has."""
    torch.manual_seed(0)
    encoder = build_encoder(arch, 10)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return encoder


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES, key=str.lower))
def test_stages_of(arch):
    encoder = _trained_like(arch)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert encoder.stage_shapes((32, 32)) == EXPECTED[arch]
    assert encoder.stage_channels() == [c for c, _, _ in EXPECTED[arch]]
    for mode in ("train", "eval"):
        getattr(encoder, mode)()
        before = copy.deepcopy(encoder.state_dict())
        plain = encoder.forward_feature_map(x)
        statistics_once = copy.deepcopy(encoder.state_dict())
        encoder.load_state_dict(before)
        stages = encoder.forward_stages(x, preact=True)
        # reading the pre-activations updates the BatchNorm statistics exactly as one forward does
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, statistics_once[key]), f"{mode}: {key} moved differently"
        assert torch.equal(stages.final_map, plain), "the final map differs from forward_feature_map"
        assert torch.equal(stages.pooled, encoder.pool_features(plain))
        assert [tuple(f.shape[1:]) for f in stages.feats] == EXPECTED[arch]
        assert [tuple(p.shape) for p in stages.preact] == [tuple(f.shape) for f in stages.feats]
        assert torch.equal(stages.preact[0], stages.feats[0])
        same = [torch.equal(p, f) for p, f in zip(stages.preact[1:], stages.feats[1:])]
        assert all(same) if arch in LINEAR_STAGES else not any(same), f"{mode}: preact == feats at {same}"
        if arch not in LINEAR_STAGES and arch != "ShuffleV2":  # (its preact is in unshuffled order)
            if arch.startswith("wrn"):  # the raw residual stream is read by the next BatchNorm
                bns = encoder.stage_batchnorms()
                if mode == "eval":
                    assert torch.allclose(stages.preact[1], bns[0](stages.feats[1]), atol=1e-6)
            else:  # a stage output is the ReLU of its pre-activation
                for p, f in zip(stages.preact[1:], stages.feats[1:]):
                    assert torch.equal(torch.relu(p), f)
        if arch in FINAL_MAP_AFTER_STAGES:
            assert stages.final_map.shape != stages.feats[-1].shape or not torch.equal(stages.final_map, stages.feats[-1])
        else:
            assert torch.equal(stages.final_map, stages.feats[-1])
        no_preact = encoder.forward_stages(x) if mode == "eval" else None
        if no_preact is not None:
            assert no_preact.preact is None and all(torch.equal(a, b) for a, b in zip(no_preact.feats, stages.feats))
    batchnorms = encoder.stage_batchnorms()
    if arch.startswith("Shuffle"):
        assert batchnorms is None
    else:
        assert [bn.num_features for bn in batchnorms] == encoder.stage_channels()[1:]


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                  "ResNet18", "resnet18"])
def test_the_folded_teachers_stages_equal_the_unfolded(arch):
    from desupcon.models import Teacher
    encoder = _trained_like(arch).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    teacher = Teacher(encoder)
    assert teacher.fold_batchnorm(x) > 0  # the copy every later teacher forward runs on
    folded = teacher.__dict__["inference_encoder"]
    with torch.no_grad():
        a, b = encoder.forward_stages(x, preact=True), folded.forward_stages(x, preact=True)
    for i, (u, f) in enumerate(zip(a.feats + a.preact, b.feats + b.preact)):
        assert torch.allclose(u, f, atol=1e-4, rtol=1e-4), f"entry {i}: {(u - f).abs().max():.2e}"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES, key=str.lower))
def test_the_declared_last_stage_is_what_follows_the_last_but_one_stage(arch):
    """The encoder's parameters fall into those that compute feats[n-1], the declared last stage and
    the classifier, with no overlap; fine-tuning the last stage in a probe trains exactly it."""
    from desupcon.probes import FrozenEncoderProbe
    encoder = build_encoder(arch, 10).eval()
    names = {id(p): n for n, p in encoder.named_parameters()}
    last = {id(p) for module in encoder.last_stage_modules() for p in module.parameters()}
    classifier = {id(p) for p in encoder.fc.parameters()}
    encoder.forward_stages(torch.randn(2, 3, 32, 32)).feats[-2].sum().backward()
    earlier = {id(p) for p in encoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert last and not last & earlier and not last & classifier
    uncovered = set(names) - earlier - last - classifier
    assert not uncovered, f"parameters in no part: {[names[i] for i in uncovered][:5]}"
    encoder.zero_grad(set_to_none=True)
    probe = FrozenEncoderProbe(encoder, 10, finetune_last_stage=True)
    probe.train()
    probe(torch.randn(4, 3, 32, 32)).logits.sum().backward()
    trained = {id(p) for p in encoder.parameters() if p.grad is not None}
    assert trained == last
