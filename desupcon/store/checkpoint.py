"""Atomic file writes and safe checkpoint loading.

Every output (checkpoints, JSON logs, results, reports, plots) is written to a temporary file in
the destination folder, flushed, fsynced and renamed over the target, so a crash or a full disk
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import reprlib
import tempfile
import time
from pathlib import Path

import torch

from desupcon.errors import DesupconError

log = logging.getLogger("desupcon")

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks (see `locked`)
    fcntl = None

CHECKPOINT_FORMAT = "desupcon-checkpoint-v1"
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(DesupconError, ValueError):
    """A file that is not a usable desupcon checkpoint; the message names the file and why."""


class OutputWriteError(DesupconError, OSError):
    """An output that could not be written (unwritable folder, full disk); names the file."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# Temporary files are `.<target name>.<pid>.<random>.tmp` beside the target. One left behind by a
# process killed mid-write is removed by the next write of the same target once that process is
# gone (and the file is older than _STALE_TMP_SECONDS, in case the folder is shared between hosts).
_STALE_TMP_SECONDS = 600.0
_TMP_NAME_CHARS = 120  # keeps the temporary name under the 255-byte file-name limit


def _tmp_prefix(path: Path) -> str:
    return f".{path.name[:_TMP_NAME_CHARS]}."


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; assume it is alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | Path, min_age: float = _STALE_TMP_SECONDS) -> list[Path]:
    """Delete temporary files of `path` left by writers that died mid-write; returns them."""
    path = Path(path)
    prefix, removed, now = _tmp_prefix(path), [], time.time()
    with contextlib.suppress(OSError):
        for tmp in path.parent.iterdir():
            name = tmp.name
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            pid_text = name[len(prefix):].split(".", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime >= min_age:
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def remove_stale_temporaries_in(folder: str | Path, min_age: float = _STALE_TMP_SECONDS) -> list[Path]:
    """`remove_stale_temporaries` for every file of `folder`: the temporaries of writers that died
    mid-write, whatever file they were writing (`.<name>.<pid>.<random>.tmp`, the pid dead)."""
    removed, now = [], time.time()
    with contextlib.suppress(OSError):
        for tmp in Path(folder).iterdir():
            name = tmp.name
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            parts = name[:-len(".tmp")].rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid == os.getpid() or _pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime >= min_age:
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
            errno.EROFS: "the file system is read-only",
            errno.ENOTDIR: "a parent of it is a file, not a folder"}.get(exc.errno)
    detail = f"{reason}; {hint}" if hint and hint.lower() != reason.lower() else reason
    return OutputWriteError(exc.errno, f"cannot write {path} ({detail}). Nothing was changed: the "
                                       "previous version of the file, if any, is intact; choose "
                                       "another --output-dir or free space and rerun")


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, flush, fsync, rename over `path`.

    A crash, a kill or a full disk leaves either the old file or the new one, never part of one;
    on an error the temporary file is removed and an `OutputWriteError` names `path`. With
    `durable=False` (in-progress checkpoints) nothing is fsynced: still atomic for a crashed
    process, but a power failure may lose the latest version.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(path)}{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should read like normal files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise _write_error(path, exc) from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        if not durable:
            raise OSError
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    remove_stale_temporaries(path)


# room under an output folder for its subfolders and the longest file name a run writes there
ROOM_UNDER_OUTPUT = 400


def _check_path_lengths(directory: Path, existing: Path) -> None:
    """The folder's path, and the files a run writes under it, within the limits of the file system
    at `existing` (one name at most NAME_MAX bytes, a whole path at most PATH_MAX)."""
    def limit(name: str, default: int) -> int:
        try:
            return os.pathconf(existing, name)
        except (OSError, ValueError, AttributeError):
            return default
    name_max, path_max = limit("PC_NAME_MAX", 255), limit("PC_PATH_MAX", 4096)
    long = next((part for part in directory.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise OutputWriteError(errno.ENAMETOOLONG, f"output directory {reprlib.repr(str(directory))}: the folder "
                               f"name {reprlib.repr(long)} is {len(os.fsencode(long))} bytes, more than this system's "
                               f"{name_max}; choose a shorter one")
    total = len(os.fsencode(str(directory.absolute())))
    if total + ROOM_UNDER_OUTPUT > path_max:
        raise OutputWriteError(errno.ENAMETOOLONG, f"output directory {reprlib.repr(str(directory))} is {total} bytes "
                               f"long; the files under it would pass this system's {path_max}-byte path limit: "
                               f"choose a folder of at most {path_max - ROOM_UNDER_OUTPUT} bytes")


def check_writable(directory: str | Path) -> None:
    """Prove a file can be written in `directory` (or, when it does not exist yet, could be
    created in its nearest existing parent), creating nothing that stays behind.

    Called before any training, so that an unwritable output folder fails in seconds, not after
    hours of training; raises `OutputWriteError` naming the folder.
    """
    directory = Path(directory)
    _check_path_lengths(directory, Path(directory.absolute().anchor))
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a parent of it is a file, not a folder",
                                     str(existing))
        fd, probe = tempfile.mkstemp(prefix=f".write_test.{os.getpid()}.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputWriteError(exc.errno, f"output directory {directory} is not writable "
                                          f"({reason}: {exc.filename or existing}); choose another "
                                          "--output-dir") from exc


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


def atomic_torch_save(path: str | Path, obj, durable: bool = True) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue(), durable=durable)


def host_copy(obj):
    """`obj` with every tensor copied to host memory (a snapshot: training may change the originals
    in place right after)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundCheckpointWriter:
    """Epoch checkpoints written by one background thread while training goes on: `save` takes a
    host snapshot (the only part that waits for the device) and queues the write; writes land in
    the order they were queued, each atomic. `flush` waits for them and raises the first failure;
    call it before anything reads, replaces or removes those files (the loop flushes when its
    epochs end, on success or failure)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="desupcon-checkpoint")
        self._pending = []

    def save(self, path: str | Path, obj, durable: bool = False) -> None:
        snapshot = host_copy(obj)
        # the module's function looked up at write time (tests replace it to kill mid-run)
        self._pending.append(self._pool.submit(lambda: atomic_torch_save(path, snapshot, durable=durable)))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: write what is queued, and let the first error be the one raised
            self.close()
        except Exception as write_error:
            log.warning(f"an epoch checkpoint could not be written: {write_error}")


def read_json(path: str | Path):
    """Parse a JSON file; a corrupted one is a `CheckpointError` naming it (never silently replaced)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); it is left untouched: restore it "
                              "from a backup, or delete it to start a new one") from exc
    except RecursionError:
        raise CheckpointError(f"{path} nests its JSON too deeply to be a desupcon file; it is left untouched: "
                              "restore it from a backup, or delete it to start a new one") from None


def describe_load_failure(path: Path, exc: Exception) -> str:
    """Why `torch.load(path, weights_only=True)` failed, in words naming the file. A pickle the
    safe loader refused is said to be refused (nothing in it ran), not damaged."""
    text = str(exc)
    lower = text.lower()
    if "unsupported global" in lower:
        i = lower.find("global ")
        what = text[i + 7:].split()[0] if i >= 0 else "Python objects"
        return (f"{path} holds pickled Python objects ({what}) that the safe loader "
                "(weights_only=True) refused to run (nothing in it was executed); expected a desupcon "
                "checkpoint or a plain state dict of tensors")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if "WeightsUnpickler error:" in text and head[:1] == b"\x80":  # a real pickle (protocol 2+)
        reason = " ".join(text[text.find("WeightsUnpickler error:") + 23:].split("Check the documentation")[0].split())
        return (f"{path} is a pickle the safe loader (weights_only=True) refused ({reason[:120]}; nothing in it "
                "was executed); expected a desupcon checkpoint or a state dict saved with torch.save")
    first = " ".join(text.split()).split(". ")[0][:200]
    size = path.stat().st_size if path.is_file() else 0
    return (f"{path} is not a readable PyTorch checkpoint ({size} bytes; truncated, corrupted or "
            f"not a PyTorch file: {type(exc).__name__}: {first})")


def load_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict:
    """torch.load with weights_only=True, checking the file is one of ours and of the right kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(describe_load_failure(path, exc)) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a desupcon checkpoint (expected a dict with "
                              f"format={CHECKPOINT_FORMAT!r}); for plain teacher weights use "
                              "--teacher-weights")
    if expected_kind is not None and ckpt.get("kind") != expected_kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {expected_kind!r}")
    return ckpt


@contextlib.contextmanager
def locked(path: str | Path):
    """An exclusive advisory lock on `path`.lock, for read-modify-write of shared result files.

    Where the OS has no `fcntl` (Windows) there is no lock: one process at a time per output
    folder is then safe, and the writes themselves stay atomic.
    """
    lock_path = Path(str(path) + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as exc:
        raise _write_error(lock_path, exc) from exc
    with handle:
        if fcntl is None:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_json_records(path: str | Path, key: str, record: dict) -> dict:
    """Insert/replace one record of a JSON object file under a lock, keeping everyone else's.

    A corrupted or non-object file raises `CheckpointError` and is left as it is, so that the
    other runs' records in it are never silently lost.
    """
    return change_json_record(path, key, lambda _old: record)


def change_json_record(path: str | Path, key: str, change) -> dict:
    """Replace the record under `key` with `change(old record or None)`, read and written under
    the file's lock (so a concurrent writer's change is not lost); the others are kept. Errors as
    `update_json_records`. Returns all the records."""
    path = Path(path)
    with locked(path):
        records = read_json(path) if path.is_file() else {}
        if not isinstance(records, dict):
            raise CheckpointError(f"{path} holds a JSON {type(records).__name__}, expected an object "
                                  "keyed by run name; it is left untouched: restore or delete it")
        records[key] = change(records.get(key))
        atomic_write_json(path, records)
    return records


def check_json_records(path: str | Path) -> None:
    """Raise `CheckpointError` now if an existing records file could not be updated later."""
    path = Path(path)
    if path.is_file():
        records = read_json(path)
        if not isinstance(records, dict):
            raise CheckpointError(f"{path} holds a JSON {type(records).__name__}, expected an object "
                                  "keyed by run name; restore or delete it")


def load_partial(path: Path, identity: dict, name: str) -> dict | None:
    """The epoch checkpoint of a run in progress, if there is one of this configuration."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, expected_kind="in_progress")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. It is the epoch checkpoint of run {name} in progress: delete "
                              "it, or rerun with --no-resume to start this run over") from exc
    if state.get("identity") != identity:
        log.warning(f"[{name}] ignoring an epoch checkpoint of another configuration ({path})")
        return None
    return state


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return out


def remove_partial(paths, name: str) -> None:
    """The final checkpoint replaces the epoch checkpoint of a run in progress."""
    paths.partial_checkpoint(name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only removed when no other run is in progress
        paths.partial_checkpoint(name).parent.rmdir()
