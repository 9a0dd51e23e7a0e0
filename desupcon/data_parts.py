"""A dataset cut into parts small enough to carry one at a time, and joined back exactly.

A GPU machine lent for a short session receives only a small copy of the checkout per call, so the
full CIFAR-100 (168 MB) travels as K parts over K calls and is joined on the machine. Each part is
an ordinary npz folder (train.npz, test.npz, classes.json: a contiguous slice of both splits, read
by the checked loader) plus `part.json`, which says which slice it is and the digest of the whole
dataset's arrays. `join_parts` refuses a missing, repeated or foreign part, and checks the joined
arrays against the digest, so a joined copy is the source image for image.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from pathlib import Path

import torch

from desupcon import data as data_mod
from desupcon.errors import DesupconError
from desupcon.store.checkpoint import atomic_write_json

PART_FILE = "part.json"
_SPLIT_KEYS = ("images", "labels", "coarse_labels")


class DatasetPartsError(DesupconError, ValueError):
    """Parts that do not make up one dataset; the message names the part and what is wrong."""


def dataset_digest(dataset: data_mod.ImageDataset) -> str:
    """sha256 of every array of both splits (shapes included) and of the class names."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        for key in _SPLIT_KEYS:
            value = getattr(dataset, f"{split}_{key}")
            if value is None:
                h.update(f"{split}_{key}:none".encode())
                continue
            value = value.cpu().contiguous()
            h.update(f"{split}_{key}:{tuple(value.shape)}:{value.dtype}".encode())
            h.update(value.numpy().tobytes())
    h.update(json.dumps([list(dataset.classes), list(dataset.coarse_classes or [])]).encode())
    return h.hexdigest()


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    return [(k * n // parts, (k + 1) * n // parts) for k in range(parts)]


def _slice(dataset: data_mod.ImageDataset, train: tuple[int, int], test: tuple[int, int]) -> data_mod.ImageDataset:
    out = data_mod.ImageDataset.__new__(data_mod.ImageDataset)
    out.__dict__.update(dataset.__dict__)
    for split, (a, b) in (("train", train), ("test", test)):
        for key in _SPLIT_KEYS:
            value = getattr(dataset, f"{split}_{key}")
            setattr(out, f"{split}_{key}", value[a:b] if value is not None else None)
    return out


def part_folder_name(k: int, parts: int) -> str:
    return f"part-{k}-of-{parts}"


def write_parts(dataset: data_mod.ImageDataset, out: str | Path, parts: int) -> list[Path]:
    """Write `dataset` as `parts` npz folders out/part-K-of-N/ (slices of both splits in order)."""
    n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
    if not 1 <= parts <= min(n_train, n_test):
        raise DatasetPartsError(f"--parts must be in [1, {min(n_train, n_test)}] (every part holds training "
                                f"and test images), got {parts}")
    digest = dataset_digest(dataset)
    folders = []
    for k, (train, test) in enumerate(zip(_bounds(n_train, parts), _bounds(n_test, parts)), start=1):
        folder = Path(out) / part_folder_name(k, parts)
        data_mod.write_npz_dataset(_slice(dataset, train, test), folder)
        atomic_write_json(folder / PART_FILE, {"part": k, "parts": parts, "digest": digest,
                                               "train": list(train), "test": list(test),
                                               "train_total": n_train, "test_total": n_test})
        folders.append(folder)
    return folders


MAX_PARTS = 10_000  # far more than a dataset is ever cut into; bounds what a part file may claim
MAX_PART_FILE_BYTES = 64 * 1024


def _read_part(folder: Path) -> dict:
    """The part's description, checked: a small regular file, every field of its type and range."""
    path = folder / PART_FILE
    if not path.is_file():
        raise DatasetPartsError(f"{folder}: no {PART_FILE}; it is not a part written by `desupcon data split`")
    if path.stat().st_size > MAX_PART_FILE_BYTES:
        raise DatasetPartsError(f"{path} is {path.stat().st_size} bytes, not a part description (at most "
                                f"{MAX_PART_FILE_BYTES}); carry that part again")
    try:
        info = json.loads(path.read_text())
        info = {key: info[key] for key in ("part", "parts", "digest", "train", "test", "train_total", "test_total")}
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetPartsError(f"{path} is unreadable ({reprlib.repr(exc)}); carry that part again") from None
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    bad = next((k for k in ("part", "parts", "train_total", "test_total") if not count(info[k])), None)
    if bad is None and not 1 <= info["part"] <= info["parts"] <= MAX_PARTS:
        bad = "part" if info["parts"] <= MAX_PARTS else "parts"
    for split in ("train", "test"):  # the slice [start, stop) of the split this part holds
        span = info[split]
        if bad is None and not (isinstance(span, list) and len(span) == 2 and all(map(count, span))
                                and span[0] <= span[1] <= info[f"{split}_total"]):
            bad = split
    if bad is None and not isinstance(info["digest"], str):
        bad = "digest"
    if bad is not None:
        raise DatasetPartsError(f"{path}: {bad} is {reprlib.repr(info[bad])}, not what `desupcon data split` "
                                f"writes (parts 1..{MAX_PARTS}, slices [start, stop] within the totals, a digest "
                                "string); carry that part again")
    return info


def find_parts(folders: list[str | Path]) -> list[Path]:
    """The part folders among `folders`, each either a part or a folder holding part-K-of-N/ folders."""
    found = []
    for folder in map(Path, folders):
        if (folder / PART_FILE).is_file():
            found.append(folder)
        elif folder.is_dir():
            found += sorted(p for p in folder.glob("part-*-of-*") if (p / PART_FILE).is_file())
        else:
            raise DatasetPartsError(f"{folder} does not exist; pass the part folders (or the folder holding them)")
    return found


def join_parts(folders: list[str | Path]) -> data_mod.ImageDataset:
    """The dataset the parts were cut from, checked against the digest written with them."""
    found = find_parts(folders)
    if not found:
        raise DatasetPartsError(f"no parts in {', '.join(map(str, folders))}; write them with `desupcon data split`")
    infos = {folder: _read_part(folder) for folder in found}
    first = next(iter(infos.values()))
    by_number: dict[int, Path] = {}
    for folder, info in infos.items():
        if info["digest"] != first["digest"] or info["parts"] != first["parts"]:
            raise DatasetPartsError(f"{folder} belongs to another dataset than {found[0]}; join the parts of one split")
        if info["part"] in by_number:
            raise DatasetPartsError(f"part {info['part']} appears twice: {by_number[info['part']]} and {folder}")
        by_number[info["part"]] = folder
    missing = sorted(set(range(1, first["parts"] + 1)) - set(by_number))
    if missing:
        raise DatasetPartsError(f"parts {reprlib.repr(missing)[1:-1]} of {first['parts']} are missing; "
                                "carry them and join again")
    pieces = [data_mod.load_npz_dataset(by_number[k]) for k in range(1, first["parts"] + 1)]
    joined = _concatenate(pieces)
    if dataset_digest(joined) != first["digest"]:
        raise DatasetPartsError(f"the joined parts differ from the dataset they were cut from (digest "
                                f"{first['digest'][:12]}); a part is damaged: write and carry the parts again")
    return joined


def _concatenate(pieces: list[data_mod.ImageDataset]) -> data_mod.ImageDataset:
    first = pieces[0]
    arrays = {}
    for split in ("train", "test"):
        for key in _SPLIT_KEYS:
            values = [getattr(p, f"{split}_{key}") for p in pieces]
            arrays[f"{split}_{key}"] = None if values[0] is None else torch.cat(values)
    return data_mod.ImageDataset(first.name, arrays["train_images"], arrays["train_labels"],
                                 arrays["test_images"], arrays["test_labels"], first.classes,
                                 arrays["train_coarse_labels"], arrays["test_coarse_labels"],
                                 first.coarse_classes)
