"""Atomic file writes and safe checkpoint loading.

Every output (checkpoints, JSON logs, results, reports, plots) is written to a temporary file in
the destination folder, flushed, fsynced and renamed over the target, so a crash or a full disk
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "desupcon-checkpoint-v1"
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A file that is not a usable desupcon checkpoint; the message names the file and why."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should read like normal files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _reject_non_finite(obj, where: str = "$"):
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write a non-finite number ({obj}) at {where}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _reject_non_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _reject_non_finite(v, f"{where}[{i}]")


def atomic_write_json(path: str | Path, obj) -> None:
    """JSON with NaN/inf refused: a non-finite number is never written as a result."""
    _reject_non_finite(obj)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(path: str | Path, obj) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); delete or restore it") from exc


def load_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict:
    """torch.load with weights_only=True, checking the file is one of ours and of the right kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a PyTorch file: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a desupcon checkpoint (expected a dict with "
                              f"format={CHECKPOINT_FORMAT!r}); for plain teacher weights use "
                              "--teacher-weights")
    if expected_kind is not None and ckpt.get("kind") != expected_kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {expected_kind!r}")
    return ckpt


@contextlib.contextmanager
def locked(path: str | Path):
    """An exclusive advisory lock on `path`.lock, for read-modify-write of shared result files."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_json_records(path: str | Path, key: str, record: dict) -> dict:
    """Insert/replace one record of a JSON object file under a lock, keeping everyone else's."""
    path = Path(path)
    with locked(path):
        records = read_json(path) if path.is_file() else {}
        records[key] = record
        atomic_write_json(path, records)
    return records
