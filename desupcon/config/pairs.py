"""The KD literature's 13 standard CIFAR-100 teacher -> student pairs (SPEC 17): their per-pair
settings and their published figures.

Per-pair settings (mdistiller's configs) are defaults chosen from the pair, under any flag given:
- the student's learning rate under the mdistiller protocol: 0.01 for the MobileNetV2 and
  ShuffleNet students, the protocol's 0.05 otherwise;
- DKD's beta (the weight of its non-target term) for every method whose default beta is DKD's 8.
A run's name carries these settings only where they differ from the pair's default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StandardPair:
    """One row of SPEC 17: published top-1 (KD and CRD: RepDistiller's runs, last epoch; DKD and the
    logit-standardised forms: best epoch, DKD a 5-run mean). None: not published."""

    teacher: str
    student: str
    teacher_acc: float
    student_acc: float
    dkd_beta: float
    kd: float
    crd: float
    dkd: float | None
    kd_ls: float | None = None
    dkd_ls: float | None = None

    @property
    def key(self) -> str:
        return f"{self.teacher}:{self.student}"

    def published(self) -> dict[str, float]:
        """method -> published top-1 %, with "teacher" and "ce" for the two models alone."""
        out = {"teacher": self.teacher_acc, "ce": self.student_acc, "kd": self.kd, "crd-nce": self.crd,
               "dkd": self.dkd, "kd-ls": self.kd_ls, "dkd-ls": self.dkd_ls}
        return {k: v for k, v in out.items() if v is not None}


STANDARD_PAIRS = (
    StandardPair("resnet56", "resnet20", 72.34, 69.06, 2, 70.66, 71.16, 71.97, 71.43, 72.32),
    StandardPair("resnet110", "resnet32", 74.31, 71.14, 2, 73.08, 73.48, 74.11, 74.17, 74.29),
    StandardPair("resnet32x4", "resnet8x4", 79.42, 72.50, 8, 73.33, 75.51, 76.32, 76.62, 77.01),
    StandardPair("wrn_40_2", "wrn_16_2", 75.61, 73.26, 6, 74.92, 75.48, 76.23, 76.11, 76.39),
    StandardPair("wrn_40_2", "wrn_40_1", 75.61, 71.98, 6, 73.54, 74.14, 74.81, 74.37, 74.89),
    StandardPair("vgg13", "vgg8", 74.64, 70.36, 6, 72.98, 73.94, 74.68, 74.36, 74.81),
    StandardPair("resnet32x4", "ShuffleV1", 79.42, 70.50, 8, 74.07, 75.11, 76.45),
    StandardPair("wrn_40_2", "ShuffleV1", 75.61, 70.50, 8, 74.83, 76.05, 76.70),
    StandardPair("vgg13", "MobileNetV2", 74.64, 64.60, 6, 67.37, 69.73, 69.71, 68.61, 69.98),
    StandardPair("ResNet50", "MobileNetV2", 79.34, 64.60, 8, 67.35, 69.11, 70.35, 69.02, 70.45),
    StandardPair("resnet32x4", "ShuffleV2", 79.42, 71.82, 8, 74.45, 75.65, 77.07, 75.56, 77.37),
    # RepDistiller's two extra pairs, without DKD figures; beta follows the teacher's family
    StandardPair("resnet110", "resnet20", 74.31, 69.06, 2, 70.67, 71.46, None),
    StandardPair("ResNet50", "vgg8", 79.34, 70.36, 8, 73.81, 74.30, None),
)
PAIRS = {(p.teacher, p.student): p for p in STANDARD_PAIRS}

# SPEC 13's SDD figures of seed 003's pair (resnet32x4 -> resnet8x4; SD-KD with M = [1, 2]).
PUBLISHED_SDD = {("resnet32x4", "resnet8x4"): {"sd-kd": 76.63, "sd-dkd": 76.63}}

# RepDistiller's README tables of the feature distillers, in the pairs' order above (None: not run).
# Its training script ends by saying that its published figures are last-epoch accuracies.
REPDISTILLER_FEATURE_FIGURES = {
    "fitnet": (69.21, 71.06, 73.50, 73.58, 72.24, 71.02, 73.59, 73.73, 64.14, 63.16, 73.54, 68.99, 70.69),
    "at": (70.55, 72.31, 73.44, 74.08, 72.77, 71.43, 71.73, 73.32, 59.40, 58.58, 72.73, 70.22, 71.84),
    "sp": (69.67, 72.69, 72.94, 73.83, 72.43, 72.68, 73.48, 74.52, 66.30, 68.08, 74.56, 70.04, 73.34),
    "cc": (69.63, 71.48, 72.97, 73.56, 72.21, 70.71, 71.14, 71.38, 64.86, 65.43, 71.29, 69.48, 70.25),
    "vid": (70.38, 72.61, 73.09, 74.11, 73.30, 71.23, 73.38, 73.61, 65.56, 67.57, 73.40, 70.16, 70.30),
    "rkd": (69.61, 71.82, 71.90, 73.35, 72.22, 71.48, 72.28, 72.21, 64.52, 64.43, 73.21, 69.25, 71.50),
    "pkt": (70.34, 72.61, 73.64, 74.54, 73.45, 72.88, 74.10, 73.89, 67.13, 66.52, 74.69, 70.25, 73.01),
    "nst": (69.60, 71.96, 73.30, 73.68, 72.24, 71.53, 74.12, 74.89, 58.16, 64.96, 74.68, 69.53, 71.28),
}
# Which epoch each published figure is: RepDistiller's runs (KD, CRD and its feature distillers)
# report the last epoch; the DKD, logit-standardisation and SDD papers (mdistiller's trainer) the best.
LAST_EPOCH_FIGURES = ("kd", "crd-nce", *REPDISTILLER_FEATURE_FIGURES)

LIGHT_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
LIGHT_STUDENT_LR = 0.01
PAIR_LR_PRESETS = ("mdistiller",)  # the protocols whose student lr follows the pair
DKD_DEFAULT_BETA = 8.0


def standard_pair(teacher: str, student: str) -> StandardPair | None:
    return PAIRS.get((teacher, student))


def published_figures(teacher: str, student: str) -> dict[str, float]:
    """Every published top-1 of the pair under the mdistiller protocol (SPEC 13 and 17), the
    feature distillers' from RepDistiller's tables."""
    pair = standard_pair(teacher, student)
    if pair is None:
        return dict(PUBLISHED_SDD.get((teacher, student), {}))
    index = STANDARD_PAIRS.index(pair)
    feature = {m: figures[index] for m, figures in REPDISTILLER_FEATURE_FIGURES.items() if figures[index] is not None}
    return {**pair.published(), **feature, **PUBLISHED_SDD.get((teacher, student), {})}


def published_epoch(method: str) -> str | None:
    """"last" or "best": which epoch a method's published figure reports (None for the teacher and
    the plain student, whose figures are the models' own)."""
    if method in ("teacher", "ce"):
        return None
    return "last" if method in LAST_EPOCH_FIGURES else "best"


def dkd_beta(teacher: str, student: str) -> float:
    """DKD's beta for the pair: the table's, else DKD's own default 8."""
    pair = standard_pair(teacher, student)
    return float(pair.dkd_beta) if pair else DKD_DEFAULT_BETA


def student_lr(preset_name: str, student: str, preset_lr: float) -> float:
    """The student's learning rate the pair implies under a preset (SPEC 17)."""
    if preset_name in PAIR_LR_PRESETS and student in LIGHT_STUDENTS:
        return LIGHT_STUDENT_LR
    return preset_lr


def parse_pair(text: str, canonical) -> tuple[str, str]:
    """`TEACHER:STUDENT` -> (teacher, student) in the registry's spelling (`canonical(name)`)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--pair {text!r}: expected TEACHER:STUDENT, e.g. resnet32x4:ShuffleV1")
    return canonical(parts[0]), canonical(parts[1])
