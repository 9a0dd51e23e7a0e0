"""Every run setting declared once: its section and field of `RunConfig`, its command-line flag,
its run-name tag, its help text and its valid range.

The data, model, optimiser and teacher settings are the table here (a new one: one field in its
dataclass and one line here; the defaults are the presets', `config.PRESETS`). The method
settings are declared by the methods that read them (`methods/`, with their defaults;
`method_setting`), so a new method brings its own. The command line's flags (`cli.run_flags`),
the run names' tags (`config.run_name`) and the range checks (`validation.validate_config`) are
derived from `all_settings()`. Checks that join several settings (a step schedule needs
milestones) or need the data stay in `validation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# The choices of the settings that take names (config, data and validation use these).
SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("adam", "sgd")
INITS = ("kaiming", "pytorch")
HYBRID_SCALINGS = ("running", "plain")
BANK_MODES = ("class-aware", "negatives-only")
SUBSET_SAMPLINGS = ("stratified", "random")
LOGIT_TERMS = ("none", "kd", "dkd")

# (test, rule in words) pairs for `Setting.valid`
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
WEIGHT = (lambda v: v >= 0, ">= 0 (a weight)")
AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
UNIT_INTERVAL = (lambda v: 0 <= v <= 1, "in [0, 1]")
POSITIVE_OR_NONE = (lambda v: v is None or v > 0, "> 0")
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Setting:
    """One setting. `kind` is the flag's type (`[int]`: several values); `flag` None: set by a
    configuration file only; `tag` None: never part of a run name; `valid` a (test, rule) pair
    and `choices` the allowed values (checked by `validation.validate_config`)."""

    section: str
    field: str
    flag: str | None
    kind: type | list
    help: str
    tag: str | None = None
    valid: tuple[Callable, str] | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    off_flag: str | None = None  # a switch (`kind` bool): the flag that turns it off, and its help
    off_help: str = ""
    default: object = None  # a method setting's default (the other sections' defaults are the presets')

    @property
    def name(self) -> str:
        """How messages name it: its flag, else `section.field`."""
        return self.flag or f"{self.section}.{self.field}"

    def allowed(self) -> tuple[str, ...]:
        return self.choices() if callable(self.choices) else self.choices


def _methods():
    from desupcon.config import method_names  # the methods are declared by their classes (methods/)
    return method_names()


def method_setting(field: str, flag: str | None, kind, help: str, tag: str | None = None, valid=None,
                   default=None, **more) -> Setting:
    """A setting of the method section, declared by the method(s) that read it (`methods/`)."""
    return Setting("method", field, flag, kind, help, tag, valid, default=default, **more)


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # data
    S("data", "dataset", "--dataset", str, "cifar100, cifar10, digits or npz:<folder>"),
    S("data", "data_root", "--data-root", str, "folder holding (or receiving) the dataset files"),
    S("data", "download", "--download", bool, "download torchvision datasets when missing (default)",
      off_flag="--no-download", off_help="never download; fail if the files are missing"),
    S("data", "train_subset", "--train-subset", int,
      "train on a seeded subset of N images (stratified: classes in proportion)", "ntrain", POSITIVE_OR_NONE),
    S("data", "test_subset", "--test-subset", int,
      "evaluate on a seeded subset of N images (stratified: classes in proportion)", "ntest", POSITIVE_OR_NONE),
    S("data", "subset_sampling", "--subset-sampling", str,
      "how --train-subset/--test-subset draw: stratified (default) or random (uniform over images, as "
      "runs before stratified subsets)", "sampling", choices=SUBSET_SAMPLINGS),
    S("data", "image_size", "--image-size", int, "resize every image to N x N pixels", "img",
      (lambda v: v is None or 0 < v <= MAX_IMAGE_SIZE,
       f"in [1, {MAX_IMAGE_SIZE}] (the zoo's models run at 32 to 224)")),
    S("data", "color_jitter", "--color-jitter", float, "colour-jitter strength j (factors in [1-j, 1+j]; 0: "
      "none, as the mdistiller protocol)", "jitter", NON_NEGATIVE),
    # model
    S("model", "teacher_arch", "--teacher-arch", str, "teacher architecture (resnet50, resnet32x4, wrn_40_2, ...)",
      "teacher"),
    S("model", "student_arch", "--student-arch", str,
      "student architecture (resnet18, resnet8, MobileNetV2, ShuffleV1, ...)"),
    S("model", "teacher_weights", "--teacher-weights", str,
      "teacher weights: a .pth/.pth.tar/.safetensors/.bin file, hf-hub:<repo id> (the paper presets' "
      "default), or released[:FOLDER] (mdistiller's released teacher of --teacher-arch, `teachers fetch`)"),
    S("model", "init", "--init", str, "convolution initialisation: kaiming (default, as published) or pytorch",
      "init", choices=INITS),
    # method
    S("method", "method", "--method", str, "training method: {choices}", choices=_methods),
    # the method settings: declared by the methods that read them (methods/)
    # student optimisation
    S("optim", "epochs", "--epochs", int, "student training epochs", "ep", AT_LEAST_ONE),
    S("optim", "batch_size", "--batch-size", int, "images per batch (two views each)", "bs",
      (lambda v: v >= 2, ">= 2 (contrastive losses need pairs)")),
    S("optim", "optimizer", "--optimizer", str, "student optimiser: adam or sgd (momentum --momentum)", "opt",
      choices=OPTIMIZERS),
    S("optim", "lr", "--lr", float, "student (encoder and projector) learning rate (default: the preset's; "
      "light students of the mdistiller pairs 0.01)", "lr", POSITIVE),
    S("optim", "momentum", "--momentum", float, "SGD momentum", "mom", FRACTION),
    S("optim", "weight_decay", "--weight-decay", float, "student weight decay", "wd", NON_NEGATIVE),
    S("optim", "schedule", "--schedule", str, "student learning-rate schedule: constant, cosine or step", "sched",
      choices=SCHEDULES),
    S("optim", "milestones", "--milestones", [int], "epochs after which --schedule step multiplies the lr "
      "by --lr-decay (e.g. 150 180 210)", "steps"),
    S("optim", "lr_decay", "--lr-decay", float, "learning-rate factor at each milestone of --schedule step",
      "decay", (lambda v: 0 < v <= 1, "in (0, 1]")),
    S("optim", "grad_clip", "--grad-clip", float, "clip the gradient norm at this value (SDD's trainer: 40)",
      "clip", POSITIVE_OR_NONE),
    S("optim", "drop_last", "--drop-last", bool, "drop the last partial batch of every epoch (paper-bank)",
      "droplast", off_flag="--keep-last", off_help="keep the last partial batch (paper)"),
    S("optim", "classifier_lr", "--classifier-lr", float,
      "online linear classifier learning rate (constant, no weight decay)", "clslr", POSITIVE),
    S("optim", "head_lr", "--head-lr", float, "teacher projection head learning rate during distillation",
      "headlr", POSITIVE),
    S("optim", "seed", "--seed", int, "student seed (data order, initialisation)", "seed"),
    # the teacher's own settings
    S("teacher", "epochs", "--teacher-epochs", int, "teacher cross-entropy epochs (with --train-teacher)", "tep"),
    S("teacher", "optimizer", "--teacher-optimizer", str, "teacher cross-entropy optimiser: adam or sgd", "topt",
      choices=OPTIMIZERS),
    S("teacher", "lr", "--teacher-lr", float, "teacher cross-entropy learning rate", "tlr", POSITIVE),
    S("teacher", "batch_size", "--teacher-batch-size", int, "teacher training and probe batch size", "tbs",
      (lambda v: v >= 2, ">= 2")),
    S("teacher", "weight_decay", "--teacher-weight-decay", float, "teacher cross-entropy weight decay", "twd",
      NON_NEGATIVE),
    S("teacher", "schedule", "--teacher-schedule", str, "teacher learning-rate schedule: constant or cosine",
      "tsched", choices=SCHEDULES),
    S("teacher", "seed", "--teacher-seed", int, "teacher seed (its training and its probe)", "tseed"),
    S("teacher", "probe_epochs", "--probe-epochs", int, "cosine-probe epochs of the teacher's projection head",
      "pep", NON_NEGATIVE),
    S("teacher", "probe_lr", None, float, "the cosine probe's Adam learning rate", "plr", POSITIVE),
    S("teacher", "probe_temperature", None, float, "the cosine probe's temperature", "ptemp", POSITIVE),
)


def all_settings() -> tuple[Setting, ...]:
    """Every setting: the table above, then the method settings of every registered method."""
    from desupcon.config import method_settings
    return (*SETTINGS, *method_settings().values())


def flagged() -> tuple[Setting, ...]:
    """The settings that take a value on the command line."""
    return tuple(s for s in all_settings() if s.flag is not None and s.kind is not bool)


def switches() -> tuple[Setting, ...]:
    """The `--x` / `--no-x` pairs."""
    return tuple(s for s in all_settings() if s.kind is bool and s.off_flag)


def tag_of(section: str, field: str) -> str:
    """The run-name tag of a setting."""
    return next(s.tag for s in all_settings() if (s.section, s.field) == (section, field))
