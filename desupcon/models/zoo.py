"""The KD literature's CIFAR-100 model zoo (SPEC 2 and 17) beyond the small ResNets.

Wide ResNets, VGG with BatchNorm, the tables' half-width MobileNetV2, ShuffleNet V1 / V2 and the
zoo's own CIFAR ResNet18/34/50 (`shortcut`, `linear`), built with exactly the parameters of the
literature's `models/cifar` (mdistiller and RepDistiller share it) and under the same parameter
names, so that a released teacher file loads as it is. The one renaming is the classifier: every
encoder here calls it `fc` (what the wrappers use); the original's name for it is in
`ORIGINAL_CLASSIFIER` and `models.normalise_state_dict_layout` maps it.

Each family is a module of its own (wide_resnet, vgg, mobilenet, shufflenet, zoo_resnet; their
shared tail in encoder.py). Every encoder exposes `forward_stages` (the literature's stage outputs and pre-activations, and the
final map: `stages.py`), `forward_feature_map` (the final map SDD pools, after the last
BatchNorm/ReLU), `pool_features`, `forward_features` and `feature_dim`, like the ResNets of
`models.py`, and starts from its original's initialisation.
"""

from __future__ import annotations

from desupcon.models.mobilenet import MobileNetV2
from desupcon.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from desupcon.models.vgg import VGG, VGG_LAYOUTS
from desupcon.models.wide_resnet import WideResNet
from desupcon.models.zoo_resnet import ZooBasicBlock, ZooBottleneck, ZooResNet


# name as the literature writes it -> builder(num_classes)
ZOO = {
    **{f"wrn_{d}_{w}": (lambda d, w: lambda k: WideResNet(d, w, k))(d, w)
       for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": (lambda d: lambda k: VGG(d, k))(d) for d in VGG_LAYOUTS},
    "MobileNetV2": lambda k: MobileNetV2(k),
    "ShuffleV1": lambda k: ShuffleNetV1(k),
    "ShuffleV2": lambda k: ShuffleNetV2(k),
    "ResNet18": lambda k: ZooResNet(ZooBasicBlock, (2, 2, 2, 2), k),
    "ResNet34": lambda k: ZooResNet(ZooBasicBlock, (3, 4, 6, 3), k),
    "ResNet50": lambda k: ZooResNet(ZooBottleneck, (3, 4, 6, 3), k),
}

# The original's name of the classifier where it is not `fc` (its parameters load into `fc`).
ORIGINAL_CLASSIFIER = {
    **{f"vgg{d}": "classifier" for d in VGG_LAYOUTS},
    "MobileNetV2": "classifier.0",
    "ShuffleV1": "linear", "ShuffleV2": "linear",
    "ResNet18": "linear", "ResNet34": "linear", "ResNet50": "linear",
}

# mdistiller's released CIFAR-100 teachers (`cifar_teachers.tar`): folder name per architecture.
RELEASED_TEACHERS = {arch: f"{arch}_vanilla" for arch in
                     ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")}
RELEASED_CHECKPOINT = "ckpt_epoch_240.pth"

