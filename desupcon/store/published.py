"""The published checkpoints (SPEC 11): what their names mean and how they are imported.

Users download the published `.pth` files (plain state dicts) into `pth_models/`. A file under a
published name is used instead of training the run that name describes, when that run follows a
published protocol with the published teacher. It is *imported* once: a desupcon checkpoint is
written to `pth_models/imported/<name>.pth` (the downloaded file is never modified), marked
"published checkpoint" and tied to the downloaded file by its SHA-256, and from then on it is
loaded, analysed and reported like any run of ours.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from desupcon.config import HUB_TEACHER, RunConfig, preset, protocol_of, run_name

PUBLISHED_SOURCE = "published checkpoint"
_SUFFIX = "_resnet18_cifar100"
_NUMBER = r"(\d+(?:\.\d+)?)"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def published_config(name: str) -> RunConfig | None:
    """The run a published student name describes (SPEC 11), or None for any other name."""
    if not name.endswith(_SUFFIX):
        return None
    stem = name[len("student_"):-len(_SUFFIX)] if name.startswith("student_") else None
    if stem is None:
        return None
    paper, bank = preset("paper"), preset("paper-bank")
    lw = {"method": "lw-supcrd", "temperature": 0.07, "adaptive_beta": True, "bank_size": 0}
    simple = {"undistilled": (paper, {"method": "ce"}),
              "baseline_crd": (paper, {"method": "crd", "temperature": 0.07}),
              "baseline_supcon": (paper, {"method": "supcon", "temperature": 0.07}),
              "baseline_crd_nobank": (bank, {"method": "crd", "temperature": 0.07}),
              "baseline_crd_bank4096": (bank, {"method": "crd", "temperature": 0.07, "bank_size": 4096}),
              "lwsupcrd_nobank": (bank, lw),
              "lwsupcrd_bank4096": (bank, {**lw, "bank_size": 4096})}
    if stem in simple:
        base, method = simple[stem]
        return base.replace(method=method)
    match = re.fullmatch(rf"alpha_{_NUMBER}_beta_{_NUMBER}(?:_adaptive)?", stem)
    if match:
        return paper.replace(method={**lw, "alpha": float(match[1]), "beta": float(match[2])})
    match = re.fullmatch(rf"alpha_{_NUMBER}_beta_{_NUMBER}_temp_{_NUMBER}", stem)
    if match:
        return paper.replace(method={**lw, "alpha": float(match[1]), "beta": float(match[2]),
                                     "temperature": float(match[3])})
    match = re.fullmatch(rf"hybrid_lambda_{_NUMBER}", stem)
    if match:
        return paper.replace(method={**lw, "method": "hybrid", "lam": float(match[1])})
    return None


def published_names(cfg: RunConfig) -> list[str]:
    """Names a published checkpoint of this run could have (empty unless the run follows a
    published protocol with the published teacher and the published seed)."""
    if (protocol_of(cfg) not in ("paper", "paper-bank") or cfg.model.teacher_weights != HUB_TEACHER
            or cfg.optim.seed != 42):
        return []
    names = [run_name(cfg)]
    m = cfg.method
    if m.method == "lw-supcrd" and cfg.preset == "paper" and not m.bank_size:
        a, b = repr(float(m.alpha)), repr(float(m.beta))
        names += [f"student_alpha_{a}_beta_{b}_adaptive{_SUFFIX}", f"student_alpha_{a}_beta_{b}{_SUFFIX}"]
    out = []
    for name in names:
        described = published_config(name)
        if described is not None and described.identity() == cfg.replace(
                data={"data_root": described.data.data_root, "download": described.data.download}
        ).identity() and name not in out:
            out.append(name)
    return out


def student_state_from_published(state: dict) -> dict:
    """Our Student layout from the published one: `classifier.*` is the encoder's `fc.*`."""
    out = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            key = "encoder.fc." + key[len("classifier."):]
        out[key] = value
    return out


def imported_path(models_dir: Path, name: str) -> Path:
    return models_dir / "imported" / f"{name}.pth"


def load_plain_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()
            if isinstance(v, torch.Tensor)}
