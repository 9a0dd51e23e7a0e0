"""Where teacher weights come from (SPEC 2, 6 and 11): local files of every common kind, the model
hub through `huggingface_hub`, and the published `teacher_resnet50_cifar100*.pth` files.

Accepted files: a plain `state_dict` saved with `torch.save` (`.pth`, `.pt`, a hub
`pytorch_model.bin`), a timm training checkpoint (`.pth.tar`: `state_dict` plus `args`),
`.safetensors`, and desupcon teacher checkpoints. Layout: torchvision/timm ResNet names (`conv1`,
`bn1`, `layer1..`, `fc`); a classifier named `classifier` or `final_classifier` is renamed to `fc`,
`module.` prefixes are stripped and `aux_classifier.*` keys are dropped (and reported).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import torch
import torch.nn as nn

from desupcon.store.checkpoint import CHECKPOINT_FORMAT, CheckpointError, describe_load_failure
from desupcon.config import HUB_TEACHER
from desupcon.errors import DesupconError
from desupcon.models import (CheckpointMismatchError, identify_architecture, load_matching_state_dict,
                     normalise_state_dict_layout)
from desupcon.models.zoo import RELEASED_CHECKPOINT, RELEASED_TEACHERS

log = logging.getLogger("desupcon")

HUB_PREFIX = "hf-hub:"
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # timm repositories ship one or both
DROPPED_PREFIXES = ("aux_classifier.",)
PROJECTION_PREFIX = "projection."  # the published teacher-with-projection head (SPEC 11)
RELEASED = "released"  # --teacher-weights released[:FOLDER]: mdistiller's released CIFAR teachers
RELEASED_FOLDER = "download_ckpts/cifar_teachers"  # where mdistiller's own scripts unpack them


class TeacherWeightsUnavailableError(DesupconError, FileNotFoundError):
    """The configured teacher weights cannot be had; the message says every way on."""


def unavailable_message(source: str, reason: str) -> str:
    repo = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    return (f"the teacher weights {repo} are not available ({reason}). Download model.safetensors "
            f"(or pytorch_model.bin) from https://huggingface.co/{repo} and either put it at "
            f"pth_models/teacher_resnet50_cifar100.pth under --output-dir or pass --teacher-weights "
            f"PATH; or train a teacher instead with --train-teacher")


def hub_file(source: str) -> Path:
    """The weights file of `hf-hub:<repo id>`: fetched into the huggingface_hub cache when online,
    read from that cache offline (HF_HUB_OFFLINE=1 or no network)."""
    repo = source[len(HUB_PREFIX):]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as exc:
        raise TeacherWeightsUnavailableError(unavailable_message(
            source, "the huggingface_hub package is not installed: pip install huggingface_hub")) from exc
    online = _hub_reachable()
    reasons = []
    for filename in HUB_FILENAMES:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=not online))
        except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
            reasons.append(f"{filename}: {type(exc).__name__}")
        except Exception as exc:  # network failures, unknown repository, gated repository
            reasons.append(f"{filename}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    where = "not on the hub" if online else "offline, and not in the huggingface_hub cache"
    raise TeacherWeightsUnavailableError(unavailable_message(source, f"{where}: {'; '.join(reasons)}"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers (without it, the hub client's retries take a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def released_teacher_path(arch: str, folder: str | Path | None = None) -> Path:
    """Where mdistiller's released CIFAR-100 teacher of `arch` lies once `teachers fetch` unpacked
    `cifar_teachers.tar`: <folder>/<arch>_vanilla/ckpt_epoch_240.pth."""
    if arch not in RELEASED_TEACHERS:
        raise TeacherWeightsUnavailableError(
            f"--teacher-weights {RELEASED}: mdistiller releases no {arch} teacher; released: "
            f"{', '.join(RELEASED_TEACHERS)}; give a weights file or --train-teacher")
    return Path(folder or RELEASED_FOLDER).expanduser() / RELEASED_TEACHERS[arch] / RELEASED_CHECKPOINT


def resolve_source(source: str, arch: str | None = None) -> Path:
    """A local path for `source`: a file, `hf-hub:<repo id>`, or `released[:FOLDER]` (the released
    teacher of `arch` unpacked by `teachers fetch`, in download_ckpts/cifar_teachers by default)."""
    if source.startswith(HUB_PREFIX):
        return hub_file(source)
    if source == RELEASED or source.startswith(RELEASED + ":"):
        path = released_teacher_path(arch, source[len(RELEASED) + 1:] or None)
        if not path.is_file():
            raise TeacherWeightsUnavailableError(
                f"--teacher-weights {source}: {path} not found; get mdistiller's released teachers with "
                f"`desupcon.py teachers fetch` (or unpack cifar_teachers.tar into {path.parent.parent})")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise TeacherWeightsUnavailableError(
            f"--teacher-weights {source}: file not found; give a .pth/.pth.tar/.safetensors/.bin "
            f"file, {HUB_TEACHER}, or --train-teacher")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of any accepted weights file (see the module docstring), layout normalised."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(f"{path} is a .safetensors file: pip install safetensors") from exc
        try:
            raw = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({exc})") from exc
    else:
        try:
            # timm's training checkpoints keep their argparse settings beside the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointMismatchError(f"{describe_load_failure(path, exc)}; expected a ResNet "
                                          "state dict saved with torch.save(model.state_dict(), path)") from exc
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        if not isinstance(raw.get("encoder"), dict):
            raise CheckpointMismatchError(f"{path} is a desupcon {raw.get('kind')!r} checkpoint "
                                          "without teacher weights; expected a teacher checkpoint")
        raw = raw["encoder"]
    if not isinstance(raw, dict):
        raise CheckpointMismatchError(f"{path} holds a {type(raw).__name__}, expected a state dict "
                                      "(a dict of tensors)")
    state = normalise_state_dict_layout(raw)
    dropped = [k for k in state if k.startswith(DROPPED_PREFIXES)]
    if dropped:
        log.info(f"{path}: dropped {len(dropped)} keys not part of the teacher "
                 f"({', '.join(sorted({k.split('.')[0] for k in dropped}))})")
        for key in dropped:
            del state[key]
    if not state:
        raise CheckpointMismatchError(f"{path} holds no tensors, expected a ResNet state dict")
    return state


def split_projection(state: dict) -> tuple[dict, dict]:
    """(backbone + classifier, projection head renamed to our `head.` indices) of a published
    teacher-with-projection file; the head part is empty for a plain teacher."""
    head = {k[len(PROJECTION_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTION_PREFIX)}
    body = {k: v for k, v in state.items() if not k.startswith(PROJECTION_PREFIX)}
    return body, head


def load_encoder_weights(encoder: nn.Module, state: dict, source: str, num_classes: int,
                         dataset_name: str, arch: str | None = None) -> None:
    fc = state.get("fc.weight")
    if fc is not None and fc.ndim == 2 and fc.shape[0] != num_classes:
        raise CheckpointMismatchError(
            f"teacher weights {source} have a classifier for {fc.shape[0]} classes, but the dataset "
            f"{dataset_name} has {num_classes} classes; use teacher weights trained on {dataset_name} "
            "(or --train-teacher)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointMismatchError(
            f"teacher weights {source} hold NaN or infinite values in {len(bad)} tensors ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}): a diverged training; use another file or --train-teacher")
    expected = f" (expected {arch} weights)" if arch else ""
    try:
        load_matching_state_dict(encoder, state, source=f"teacher weights {source}{expected}")
    except CheckpointMismatchError:
        found = identify_architecture(state)
        if found is None or found == arch or arch is None:
            raise
        raise CheckpointMismatchError(f"teacher weights {source}: a {found} state dict, but --teacher-arch "
                                      f"is {arch}; pass --teacher-arch {found}") from None


def is_plain_state_dict_file(path: Path) -> bool:
    """Whether `path` is a weights file that is not a desupcon checkpoint (a published one)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(raw, dict) and raw.get("format") != CHECKPOINT_FORMAT and any(
        isinstance(v, torch.Tensor) for v in raw.values())


def fingerprint(*modules: nn.Module) -> str:
    """A content hash of the modules' state (parameters and buffers): 16 hex digits."""
    digest = hashlib.sha256()
    for module in modules:
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            tensor = value.detach().cpu().contiguous()
            digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
