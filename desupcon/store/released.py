"""mdistiller's released CIFAR-100 teachers (`cifar_teachers.tar`): download, check, unpack.

`desupcon.py teachers fetch` does what mdistiller's `fetch_pretrained_teachers.sh` does, with checks:
the archive is downloaded (or taken from `--archive`), its SHA-256 printed (and compared when
`--sha256` is given), every member checked before anything is written (regular files and folders
under `cifar_teachers/` only: no absolute paths, `..`, links or devices), unpacked into a temporary
folder, and every teacher in it read weights-only and identified by its parameter names and shapes:
`<arch>_vanilla/ckpt_epoch_240.pth` must hold a 100-class `<arch>`. Only then does the folder
replace `<dest>/cifar_teachers`, where `--teacher-weights released` finds it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from desupcon.errors import DesupconError
from desupcon.models import identify_architecture
from desupcon.store.weights import RELEASED_FOLDER, read_state_dict
from desupcon.models.zoo import RELEASED_CHECKPOINT, RELEASED_TEACHERS

log = logging.getLogger("desupcon")

RELEASE_URL = "https://github.com/megvii-research/mdistiller/releases/download/v0.1/cifar_teachers.tar"
ARCHIVE_ROOT = Path(RELEASED_FOLDER).name  # the archive's top folder, unpacked as it is
DEFAULT_DEST = str(Path(RELEASED_FOLDER).parent)


class ReleaseArchiveError(DesupconError, ValueError):
    """The archive cannot be had or fails a check; the message says which and what to do."""


def download(url: str, target: Path, timeout: float = 20.0) -> None:
    """`url` to `target` (written beside it, renamed when complete), with a progress bar."""
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise ReleaseArchiveError(
            f"cannot download {url} ({reason}); download it elsewhere, put it at {target} and run "
            f"`desupcon.py teachers fetch --archive {target}`") from None
    partial.replace(target)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


MAX_MEMBERS = 1_000  # the release holds a few dozen files
MAX_UNPACKED_BYTES = 4 << 30  # the release unpacks to well under a gigabyte


def checked_members(archive: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """The archive's members, each a regular file or folder inside `cifar_teachers/`, within the
    bounds of the release (count, total size) before anything is unpacked."""
    members = []
    for m in archive:
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise ReleaseArchiveError(f"{source} holds more than {MAX_MEMBERS} members; not mdistiller's archive, "
                                      "nothing was unpacked")
    total = sum(m.size for m in members if m.isfile())
    if total > MAX_UNPACKED_BYTES:
        raise ReleaseArchiveError(f"{source} would unpack to {total} bytes, more than the release's "
                                  f"{MAX_UNPACKED_BYTES}; not mdistiller's archive, nothing was unpacked")
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != ARCHIVE_ROOT:
            raise ReleaseArchiveError(f"{source}: member {m.name!r} lies outside {ARCHIVE_ROOT}/; "
                                      "not mdistiller's archive, nothing was unpacked")
        if not (m.isfile() or m.isdir()):
            raise ReleaseArchiveError(f"{source}: member {m.name!r} is a link or device, not a file; "
                                      "not mdistiller's archive, nothing was unpacked")
    return members


def check_teachers(folder: Path, source: Path) -> dict[str, Path]:
    """{arch: checkpoint} of the released teachers in `folder`, each read weights-only and
    identified by its parameters; a file holding another architecture is refused."""
    found = {}
    for arch, sub in RELEASED_TEACHERS.items():
        path = folder / sub / RELEASED_CHECKPOINT
        if not path.is_file():
            continue
        state = read_state_dict(path)
        seen = identify_architecture(state)
        classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
        if seen != arch or classes != 100:
            what = f"a {seen} state dict" if seen else "no architecture of the zoo"
            raise ReleaseArchiveError(f"{source}: {sub}/{RELEASED_CHECKPOINT} holds {what} "
                                      f"({classes} classes), expected a 100-class {arch}; nothing was installed")
        found[arch] = path
    if not found:
        raise ReleaseArchiveError(f"{source} holds none of the released teachers "
                                  f"({', '.join(f'{ARCHIVE_ROOT}/{s}/{RELEASED_CHECKPOINT}' for s in RELEASED_TEACHERS.values())})")
    return found


def fetch_released_teachers(dest: str | Path = DEFAULT_DEST, url: str = RELEASE_URL,
                            archive: str | Path | None = None, sha256: str | None = None,
                            overwrite: bool = False) -> dict:
    """Download (or take `archive`), check and unpack the released teachers into
    `<dest>/cifar_teachers`. Returns {"folder", "sha256", "teachers": {arch: path}, "missing"}."""
    dest = Path(dest).expanduser()
    try:
        return _fetch(dest, url, archive, sha256, overwrite)
    except OSError as exc:  # a full disk, a read-only or missing folder, a --dest that is a file
        where = exc.filename or dest
        raise ReleaseArchiveError(f"cannot write the teachers under --dest {dest} ({exc.strerror or exc}: "
                                  f"{where}); choose another --dest, or make room there") from None


def _fetch(dest: Path, url: str, archive: str | Path | None, sha256: str | None, overwrite: bool) -> dict:
    final = dest / ARCHIVE_ROOT
    if final.exists() and not overwrite:
        raise ReleaseArchiveError(f"{final} exists already; pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise ReleaseArchiveError(f"--dest {dest} is a file, not a folder; give a folder")
    dest.mkdir(parents=True, exist_ok=True)
    if archive is None:
        archive = dest / "cifar_teachers.tar"
        if not archive.is_file():
            download(url, archive)
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise ReleaseArchiveError(f"--archive {archive}: file not found")
    digest = sha256_of(archive)
    if sha256 is not None and digest != sha256.lower():
        raise ReleaseArchiveError(f"{archive}: SHA-256 {digest} differs from the expected {sha256}; "
                                  "the download is damaged or not the release: delete it and fetch again")
    try:
        with tarfile.open(archive, "r:") as tar:  # the release is a plain tar: no decompression bomb
            members = checked_members(tar, archive)
            with tempfile.TemporaryDirectory(dir=dest, prefix=".cifar_teachers.") as tmp:
                tar.extractall(tmp, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                teachers = check_teachers(Path(tmp) / ARCHIVE_ROOT, archive)
                if final.exists():
                    shutil.rmtree(final)
                (Path(tmp) / ARCHIVE_ROOT).replace(final)
    except tarfile.TarError as exc:
        raise ReleaseArchiveError(f"{archive} is not a readable tar archive ({exc}); delete it and fetch "
                                  "again") from None
    teachers = {arch: final / path.parent.name / path.name for arch, path in teachers.items()}
    return {"folder": str(final), "sha256": digest, "teachers": {a: str(p) for a, p in teachers.items()},
            "missing": [a for a in RELEASED_TEACHERS if a not in teachers]}
