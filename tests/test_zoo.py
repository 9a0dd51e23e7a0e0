"""The KD literature's CIFAR-100 zoo (SPEC 2 and 17): exact parameter counts, the original
parameter names (released teachers load as they are and give our module's logits), the final
feature maps SDD pools, name resolution, and one training step of every architecture as teacher
and as student under every family of method."""

import pytest
import torch

from desupcon import data
from desupcon.store import weights as teacher_weights
from desupcon.engine.build import make_student_run
from desupcon.engine.step import train_step
from desupcon.config import preset
from desupcon.engine.devices import DevicePolicy
from desupcon.models import ARCHITECTURES, CheckpointMismatchError, Teacher, build_encoder, canonical_arch
from desupcon.models.shufflenet import channel_shuffle
from desupcon.models.zoo import ZOO

# SPEC 2's counts at 100 classes (and the CIFAR ResNets of the same tables)
SPEC_PARAMETERS = {
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_40_2": 2_255_156, "wrn_16_2": 703_284,
    "wrn_40_1": 569_780, "vgg13": 9_462_180, "vgg8": 3_965_028, "MobileNetV2": 812_836,
    "ShuffleV1": 949_258, "ShuffleV2": 1_355_528, "ResNet50": 23_705_252,
}
# (channels, side) of the final pre-pool map at 32x32 input
FEATURE_MAPS = {
    "wrn_16_1": (64, 8), "wrn_16_2": (128, 8), "wrn_40_1": (64, 8), "wrn_40_2": (128, 8),
    **{f"vgg{d}": (512, 4) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": (1280, 2), "ShuffleV1": (960, 4), "ShuffleV2": (1024, 4),
    "ResNet18": (512, 4), "ResNet34": (512, 4), "ResNet50": (2048, 4),
}
# The originals' classifier names (mdistiller's / RepDistiller's models/cifar), written here
# independently of desupcon.models.zoo, and a few of each original's own parameter names.
ORIGINAL_CLASSIFIER = {"vgg8": "classifier", "vgg13": "classifier", "MobileNetV2": "classifier.0",
                       "ShuffleV1": "linear", "ShuffleV2": "linear", "ResNet18": "linear",
                       "ResNet50": "linear", "wrn_40_2": "fc", "wrn_16_1": "fc"}
ORIGINAL_KEYS = {
    "wrn_40_2": ["conv1.weight", "block1.layer.0.bn1.running_mean", "block1.layer.0.convShortcut.weight",
                 "block3.layer.5.conv2.weight", "bn1.weight"],
    "wrn_16_1": ["block1.layer.1.conv1.weight", "block2.layer.0.convShortcut.weight"],
    "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_var", "block0.3.weight",
              "block4.4.num_batches_tracked"],
    "vgg8": ["block0.0.weight", "block4.1.weight"],
    "MobileNetV2": ["conv1.0.weight", "conv1.1.running_mean", "blocks.0.0.conv.0.weight",
                    "blocks.6.0.conv.7.running_mean", "conv2.0.weight"],
    "ShuffleV1": ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.running_var"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer1.3.conv3.weight", "layer3.3.bn1.weight", "conv2.weight",
                  "bn2.running_mean"],
    "ResNet18": ["layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean", "layer4.1.conv2.weight"],
    "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "layer4.2.bn3.bias"],
}


def n_parameters(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", sorted(SPEC_PARAMETERS))
def test_parameter_counts_equal_spec(arch):
    assert n_parameters(build_encoder(arch, 100)) == SPEC_PARAMETERS[arch]


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_final_feature_map_and_logits(arch):
    torch.manual_seed(0)
    encoder = build_encoder(arch, 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fmap = encoder.forward_feature_map(x)
        logits = encoder(x)
    channels, side = FEATURE_MAPS[arch]
    assert fmap.shape == (3, channels, side, side)
    assert encoder.feature_dim == channels
    assert (fmap >= 0).all(), "the map SDD pools comes after the last ReLU"
    torch.testing.assert_close(logits, encoder.fc(fmap.mean(dim=(2, 3))), rtol=1e-5, atol=1e-5)


def to_original_layout(arch: str, state: dict) -> dict:
    """Our state dict under the original's names: only the classifier is named differently."""
    name = ORIGINAL_CLASSIFIER[arch]
    return {(name + k[2:] if k.startswith("fc.") else k): v for k, v in state.items()}


def _perturbed(arch, num_classes=100, seed=0):
    """An encoder whose BatchNorm statistics and affine parameters are not the initial ones (so
    a mis-mapped buffer would change the logits)."""
    torch.manual_seed(seed)
    encoder = build_encoder(arch, num_classes)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return encoder.eval()


@pytest.mark.parametrize("arch", sorted(ORIGINAL_KEYS))
def test_released_teacher_file_loads_and_gives_the_same_logits(tmp_path, arch):
    source = _perturbed(arch)
    original = to_original_layout(arch, source.state_dict())
    for key in ORIGINAL_KEYS[arch] + [f"{ORIGINAL_CLASSIFIER[arch]}.weight", f"{ORIGINAL_CLASSIFIER[arch]}.bias"]:
        assert key in original, f"{arch}: the original's parameter {key} is missing"
    path = tmp_path / "ckpt_epoch_240.pth"
    # mdistiller's checkpoint: the state dict under "model", beside training bookkeeping
    torch.save({"model": original, "epoch": 240, "best_acc": torch.tensor(75.6),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005}]}}, path)
    loaded = build_encoder(arch, 100)
    teacher_weights.load_encoder_weights(loaded, teacher_weights.read_state_dict(path), str(path), 100,
                                         "cifar100", arch)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source(x), rtol=0, atol=0)


def test_file_of_another_architecture_is_named_in_one_line(tmp_path):
    path = tmp_path / "wrn.pth"
    torch.save({"model": build_encoder("wrn_40_2", 100).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        teacher_weights.load_encoder_weights(build_encoder("vgg13", 100), teacher_weights.read_state_dict(path),
                                             str(path), 100, "cifar100", "vgg13")
    message = str(err.value)
    assert "a wrn_40_2 state dict, but --teacher-arch is vgg13" in message and "\n" not in message


def test_zoo_resnet50_file_into_torchvision_resnet50_says_which_layout(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save({"model": to_original_layout("ResNet50", build_encoder("ResNet50", 100).state_dict())}, path)
    with pytest.raises(CheckpointMismatchError, match="a ResNet50 state dict, but --teacher-arch is resnet50"):
        teacher_weights.load_encoder_weights(build_encoder("resnet50", 100), teacher_weights.read_state_dict(path),
                                             str(path), 100, "cifar100", "resnet50")


def test_missing_batchnorm_step_counters_are_tolerated(tmp_path):
    source = _perturbed("wrn_16_1", 10)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = build_encoder("wrn_16_1", 10)
    teacher_weights.load_encoder_weights(loaded, state, "old file", 10, "digits", "wrn_16_1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source(x), rtol=0, atol=0)


def test_channel_shuffle_is_the_group_interleaving():
    n, groups, per = 2, 3, 4
    x = torch.randn(n, groups * per, 2, 2)
    out = channel_shuffle(x, groups)
    for j in range(groups * per):  # output channel j takes group j % g, member j // g
        torch.testing.assert_close(out[:, j], x[:, (j % groups) * per + j // groups])


def test_names_resolve_case_insensitively_unless_ambiguous():
    assert canonical_arch("mobilenetv2") == "MobileNetV2"
    assert canonical_arch("SHUFFLEV1") == "ShuffleV1"
    assert canonical_arch("WRN_40_2") == "wrn_40_2"
    assert canonical_arch("resnet50") == "resnet50" and canonical_arch("ResNet50") == "ResNet50"
    with pytest.raises(ValueError, match="ambiguous: ResNet50 or resnet50"):
        canonical_arch("Resnet50")
    with pytest.raises(ValueError, match="unknown architecture 'mobilenetv3'"):
        canonical_arch("mobilenetv3")


def test_pytorch_init_resets_every_convolution():
    torch.manual_seed(0)
    kaiming = build_encoder("vgg8", 10)
    torch.manual_seed(0)
    default = build_encoder("vgg8", 10, init="pytorch")
    # Kaiming fan-out on a 3x3 conv of 64 outputs: std sqrt(2 / 576); PyTorch's default is uniform
    # with bound 1 / sqrt(fan_in) = 1 / sqrt(27) for the first conv: a std of 0.111
    assert abs(kaiming.block0[0].weight.std().item() - (2 / (9 * 64)) ** 0.5) < 0.01
    assert abs(default.block0[0].weight.std().item() - (1 / 27) ** 0.5 / 3 ** 0.5) < 0.01


# ----------------------------------------------------------------------------------------------
# One step of every architecture in every family of method, as teacher and as student
# ----------------------------------------------------------------------------------------------

METHODS = ("kd", "dkd", "sdd-lskd", "crd-nce", "lw-supcrd")


@pytest.fixture(scope="module")
def images32():
    """48 digits at 32x32 (every zoo network's design size), 10 classes."""
    dataset = data.load_dataset("digits", image_size=32)
    return data.subsample(dataset, 48, 16, seed=0)


def _one_step(dataset, teacher_arch, student_arch, method):
    cfg = preset("quick").replace(model={"teacher_arch": teacher_arch, "student_arch": student_arch},
                                  optim={"epochs": 1, "batch_size": 8}, device="cpu")
    cfg = cfg.with_method(method, warmup=0).replace(method={"nce_negatives": 16, "bank_size": 0})
    policy = DevicePolicy.choose(torch.device("cpu"))
    torch.manual_seed(0)
    teacher = policy.prepare(Teacher(build_encoder(teacher_arch, dataset.num_classes)))
    run = make_student_run(cfg, dataset, teacher, policy)
    before = {k: v.clone() for k, v in run.student.state_dict().items() if v.is_floating_point()}
    aug = data.TwoViewAugment(dataset.mean, dataset.std)
    batch = next(data.epoch_batches(dataset.train_images, dataset.train_labels, 8, aug,
                                    torch.Generator().manual_seed(0)))
    run.start_epoch()
    train_step([run], batch, teacher, policy)
    loss = float(run._total)
    assert torch.isfinite(torch.tensor(loss)), f"{teacher_arch} -> {student_arch} {method}: loss {loss}"
    changed = [k for k, v in run.student.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") and not k.startswith("encoder.fc.") for k in changed), \
        f"{teacher_arch} -> {student_arch} {method}: the student's encoder did not move"


@pytest.mark.parametrize("arch", sorted(ZOO, key=str.lower))
def test_every_architecture_trains_as_student_and_as_teacher(images32, arch):
    for method in METHODS:
        _one_step(images32, "resnet8", arch, method)
        _one_step(images32, arch, "resnet8", method)


def test_registry_keeps_torchvision_resnets_and_adds_the_zoo():
    for name in ("resnet18", "resnet34", "resnet50", "ResNet18", "ResNet34", "ResNet50", "wrn_16_1",
                 "vgg19", "ShuffleV2"):
        assert name in ARCHITECTURES
    assert "downsample" in dict(build_encoder("resnet18", 10).named_modules())["layer2.0"]._modules
    assert "shortcut" in dict(build_encoder("ResNet18", 10).named_modules())["layer2.0"]._modules


def test_zoo_students_in_lockstep_equal_their_solo_runs(tmp_path, tiny_config):
    """Different zoo students (a wide ResNet, ShuffleV2, VGG) sharing one zoo teacher's forwards
    give bit for bit the runs trained alone."""
    from desupcon.store.checkpoint import load_checkpoint
    from desupcon.session import Session
    base = tiny_config(tmp_path / "solo", train_images=64, test_images=32, epochs=1).replace(
        model={"teacher_arch": "wrn_16_1"})
    variants = [({"student_arch": "wrn_16_1"}, "kd"), ({"student_arch": "ShuffleV2"}, "sd-dkd"),
                ({"student_arch": "vgg8"}, "crd-nce")]

    def configs(cfg):
        return [cfg.replace(model=m).with_method(method).replace(method={"nce_negatives": 16})
                for m, method in variants]
    solo_session = Session(base, analyze=False)
    solo = [solo_session.run(c) for c in configs(base)]
    lock_base = base.replace(output_dir=str(tmp_path / "lock"))
    lock = Session(lock_base, analyze=False).run_many(configs(lock_base), lockstep=True)
    for a, b in zip(solo, lock):
        sa, sb = load_checkpoint(a.checkpoint)["student"], load_checkpoint(b.checkpoint)["student"]
        assert a.name == b.name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{a.name}: lockstep differs from solo"
