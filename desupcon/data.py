"""Datasets held in memory as uint8 tensors, and batched two-view augmentation (SPEC section 3).

Datasets: `cifar100`, `cifar10` (read from torchvision's on-disk pickles, downloaded through
torchvision when allowed), `npz:<dir>` (train.npz / test.npz / classes.json) and the embedded
`digits` (scikit-learn, no download).

Augmentation runs on whole batches on the training device with per-sample random parameters drawn
from a CPU generator (so a seed gives the same batches on every device and the GPU never waits on
the host): random crop with zero padding, horizontal flip, brightness/contrast/saturation jitter,
normalisation. No PIL and no per-image Python loop.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from desupcon.store.checkpoint import atomic_write_bytes, atomic_write_json, OutputWriteError
from desupcon.engine.devices import to_device
from desupcon.errors import DesupconError
from desupcon.config.settings import SUBSET_SAMPLINGS

DATASETS = ("cifar100", "cifar10", "digits", "npz:<dir>")


class DatasetNotFoundError(DesupconError, FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says where to put it."""


class DatasetFormatError(DesupconError, ValueError):
    """Dataset files of the wrong shape or content (an npz folder); the message names what is wrong."""


@dataclass
class ImageDataset:
    """Train and test splits as uint8 (N, 3, H, W) tensors with int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    train_coarse_labels: torch.Tensor | None = None
    test_coarse_labels: torch.Tensor | None = None
    coarse_classes: list[str] | None = None
    mean: torch.Tensor = field(init=False)
    std: torch.Tensor = field(init=False)

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise DatasetFormatError(f"{self.name} {split} images must be uint8 (N, 3, H, W), got "
                                         f"{images.dtype} {tuple(images.shape)}")
            if labels.shape != (images.shape[0],):
                raise DatasetFormatError(f"{self.name} {split}: {images.shape[0]} images but "
                                         f"{labels.shape[0]} labels")
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DatasetFormatError(f"{self.name} {split} labels must lie in [0, {len(self.classes)}), "
                                         f"got [{int(labels.min())}, {int(labels.max())}]")
        self._check_coarse_labels()
        self.mean, self.std = channel_statistics(self.train_images)

    def _check_coarse_labels(self) -> None:
        """Superclass labels, when present, cover both splits and give each class one superclass."""
        coarse = {"train": self.train_coarse_labels, "test": self.test_coarse_labels}
        if all(c is None for c in coarse.values()):
            return
        if any(c is None for c in coarse.values()):
            raise DatasetFormatError(f"{self.name}: coarse_labels in one split only; give both train and "
                                     "test their coarse_labels, or neither")
        n_coarse = len(self.coarse_classes) if self.coarse_classes is not None else None
        for split, c in coarse.items():
            labels = getattr(self, f"{split}_labels")
            if c.shape != labels.shape:
                raise DatasetFormatError(f"{self.name} {split}: {labels.shape[0]} labels but "
                                         f"{tuple(c.shape)} coarse_labels; they must be one per image")
            if c.numel() and (c.min() < 0 or (n_coarse is not None and c.max() >= n_coarse)):
                raise DatasetFormatError(f"{self.name} {split} coarse_labels must lie in [0, {n_coarse}), "
                                         f"got [{int(c.min())}, {int(c.max())}]")
        fine = torch.cat([self.train_labels, self.test_labels]).cpu()
        both = torch.cat([coarse["train"], coarse["test"]]).cpu()
        pairs = torch.unique(torch.stack([fine, both], 1), dim=0)
        classes, counts = torch.unique(pairs[:, 0], return_counts=True)
        if (counts > 1).any():
            k = int(classes[counts > 1][0])
            supers = pairs[pairs[:, 0] == k, 1].tolist()
            raise DatasetFormatError(
                f"{self.name}: coarse_labels do not map each class to one superclass (class {k} "
                f"'{self.classes[k]}' has superclasses {supers}); fix or drop the coarse_labels arrays")

    def superclass_of_class(self) -> torch.Tensor | None:
        """(num_classes,) the superclass of every class (-1 for a class without images), or None."""
        if self.train_coarse_labels is None:
            return None
        out = torch.full((self.num_classes,), -1, dtype=torch.long)
        fine = torch.cat([self.train_labels, self.test_labels]).cpu()
        out[fine] = torch.cat([self.train_coarse_labels, self.test_coarse_labels]).cpu()
        return out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    def to(self, device: torch.device | str, images: bool = True) -> "ImageDataset":
        """Compute on `device`: the statistics move there, and the images and labels too unless
        `images` is False (then they stay on the host, pinned, and travel batch by batch)."""
        device = torch.device(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        for name in ("train_images", "train_labels", "test_images", "test_labels",
                     "train_coarse_labels", "test_coarse_labels"):
            value = getattr(self, name)
            if value is None:
                continue
            if images:
                setattr(self, name, value.to(device))
            elif device.type == "cuda":
                setattr(self, name, value.pin_memory())
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.train_images, self.test_images))


def _hwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _labels(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------

def load_digits_dataset(image_size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits as uint8 RGB, resized, with a stratified seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = torch.from_numpy(digits.images).float().mul(255.0 / 16.0)[:, None]
    gray = F.interpolate(gray, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = gray.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=digits.target, random_state=seed)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return ImageDataset("digits", images[train_idx], labels[train_idx], images[test_idx],
                        labels[test_idx], [str(d) for d in range(10)])


def available_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_npy_header(path: Path, npz, key: str) -> None:
    """The member's header, read before its array: the shape it claims must fit in the bytes the
    member holds and in this machine's memory (else a 1 kB file could ask for terabytes)."""
    name = f"{key}.npy"
    if name not in npz.zip.namelist():
        return
    try:
        with npz.zip.open(name) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return  # not an .npy header: `_npz_array` names the member
    needed = math.prod(shape) * dtype.itemsize
    held = npz.zip.getinfo(name).file_size
    if needed > held:
        raise DatasetFormatError(f"{path}: member `{key}` claims shape {shape} of {dtype} ({needed} bytes) but holds "
                                 f"{held} bytes; the file is damaged or forged: write it again")
    memory = available_memory()
    if memory is not None and needed > memory:
        raise DatasetFormatError(f"{path}: member `{key}` ({shape} of {dtype}) needs {needed / 2**30:.1f} GiB, more "
                                 f"than this machine's {memory / 2**30:.1f} GiB; use a subset of it")


def _npz_array(path: Path, npz, key: str) -> np.ndarray:
    _check_npy_header(path, npz, key)
    try:
        value = npz[key]
    except ValueError as exc:  # object arrays: refused without unpickling
        raise DatasetFormatError(f"{path}: array `{key}` holds Python objects ({exc}); store plain numeric "
                                 "arrays (numpy.savez with uint8 images and int64 labels)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetFormatError(f"{path}: array `{key}` is truncated or damaged ({exc}); write the file "
                                 "again") from None
    if not isinstance(value, np.ndarray):  # a member that is not an .npy array reads back as raw bytes
        raise DatasetFormatError(f"{path}: member `{key}` is not a numpy array (it reads as {type(value).__name__}); "
                                 "write the file with numpy.savez(path, images=..., labels=...)")
    return value


def _checked_labels(path: Path, values: np.ndarray, key: str, n_images: int) -> torch.Tensor:
    if values.ndim == 2 and values.shape[0] == n_images:
        raise DatasetFormatError(f"{path}: `{key}` has shape {values.shape} (one-hot?); store one class "
                                 f"index per image, e.g. {key}=onehot.argmax(1)")
    if values.ndim != 1:
        raise DatasetFormatError(f"{path}: `{key}` must be 1-D (one class index per image), got shape "
                                 f"{values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        kind = "strings" if values.dtype.kind in "US" else str(values.dtype)
        raise DatasetFormatError(f"{path}: `{key}` must hold integer class indices, got {kind}; map "
                                 "class names to 0..K-1 and list the names in classes.json")
    if values.shape[0] != n_images:
        raise DatasetFormatError(f"{path}: {n_images} images but {values.shape[0]} entries in `{key}`; "
                                 "give one per image")
    if values.size and values.min() < 0:
        raise DatasetFormatError(f"{path}: `{key}` has negative values (min {int(values.min())}); class "
                                 "indices start at 0")
    return torch.from_numpy(values.astype(np.int64))


def _read_npz_split(path: Path) -> dict:
    """One split file, checked: `images` uint8 N x H x W x 3 (N >= 1), integer `labels` (and
    `coarse_labels`) of one class index per image. Nothing is unpickled."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} not found: an npz dataset folder needs train.npz and test.npz with arrays "
            "`images` (uint8, N x H x W x 3) and `labels` (int64, N)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"\x93NUM":
        raise DatasetFormatError(f"{path} is a single .npy array, not an .npz archive; write it with "
                                 "numpy.savez(path, images=..., labels=...)")
    if head != b"PK\x03\x04":  # every .npz is a zip archive; numpy would guess a pickle and offer to load it
        raise DatasetFormatError(f"{path} is not a readable .npz archive (it does not start as a zip archive "
                                 "does); write it with numpy.savez(path, images=..., labels=...)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetFormatError(f"{path} is not a readable .npz archive ({str(exc).splitlines()[0][:100]}); "
                                 "write it with numpy.savez(path, images=..., labels=...)") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DatasetFormatError(f"{path} is a single .npy array, not an .npz archive; write it with "
                                 "numpy.savez(path, images=..., labels=...)")
    with npz:
        if "images" not in npz.files or "labels" not in npz.files:
            raise DatasetFormatError(f"{path} must hold arrays `images` and `labels`, has {npz.files}")
        images = _npz_array(path, npz, "images")
        if images.ndim == 3:
            raise DatasetFormatError(f"{path}: `images` has shape {images.shape} (greyscale?); store "
                                     "N x H x W x 3, e.g. numpy.repeat(images[..., None], 3, axis=3)")
        if images.ndim != 4 or images.shape[3] != 3:
            raise DatasetFormatError(f"{path}: `images` must be N x H x W x 3 (channels last), got shape "
                                     f"{images.shape}")
        if images.dtype != np.uint8:
            raise DatasetFormatError(f"{path}: `images` must be uint8 (0-255), got {images.dtype}")
        if images.shape[0] == 0:
            raise DatasetFormatError(f"{path} holds no images; both splits need at least one")
        out = {"images": _hwc_to_tensor(images),
               "labels": _checked_labels(path, _npz_array(path, npz, "labels"), "labels", images.shape[0])}
        if "coarse_labels" in npz.files:
            out["coarse_labels"] = _checked_labels(path, _npz_array(path, npz, "coarse_labels"),
                                                   "coarse_labels", images.shape[0])
    return out


def load_npz_dataset(directory: str | Path) -> ImageDataset:
    """The folder format: train.npz / test.npz (`images` uint8 NHWC, `labels`, optional
    `coarse_labels`) and an optional classes.json ({"classes": [...], "coarse_classes": [...]}).
    Without classes.json the classes are 0..K-1 with K - 1 the largest label, and every one of them
    must have training images (a stray label would otherwise make classes out of nothing)."""
    directory = Path(directory)
    splits = {split: _read_npz_split(directory / f"{split}.npz") for split in ("train", "test")}
    train_size, test_size = (tuple(splits[s]["images"].shape[2:]) for s in ("train", "test"))
    if train_size != test_size:
        raise DatasetFormatError(f"{directory}: training images are {train_size[0]}x{train_size[1]} but test "
                                 f"images {test_size[0]}x{test_size[1]}; store both splits at one size")
    names = _read_class_names(directory / "classes.json")
    labels = {s: splits[s]["labels"] for s in splits}
    if "classes" in names:
        classes = names["classes"]
        for split, values in labels.items():
            if int(values.max()) >= len(classes):
                raise DatasetFormatError(f"{directory / f'{split}.npz'}: label {int(values.max())} but "
                                         f"classes.json names {len(classes)} classes")
    else:
        n_classes = int(max(labels["train"].max(), labels["test"].max())) + 1
        missing = sorted(set(range(n_classes)) - set(labels["train"].unique().tolist()))
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise DatasetFormatError(
                f"{directory}: labels go up to {n_classes - 1} but classes {shown} have no training images; "
                "without classes.json the classes must be 0..K-1 all present: fix the labels or add "
                'classes.json {"classes": [names]}')
        classes = [str(i) for i in range(n_classes)]
    coarse = {s: splits[s].get("coarse_labels") for s in splits}
    coarse_classes = None
    if coarse["train"] is not None:
        n_coarse = int(max(int(c.max()) for c in coarse.values() if c is not None and c.numel())) + 1
        coarse_classes = names.get("coarse_classes") or [f"superclass_{i}" for i in range(n_coarse)]
    return ImageDataset(f"npz:{directory}", splits["train"]["images"], labels["train"],
                        splits["test"]["images"], labels["test"], classes,
                        coarse["train"], coarse["test"], coarse_classes)


def _read_class_names(path: Path) -> dict[str, list[str]]:
    """classes.json: {"classes": [fine names], optional "coarse_classes": [superclass names]}."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path} is not valid JSON ({exc}); it must be "
                                 '{"classes": [names], "coarse_classes": [names]}') from exc
    if not isinstance(content, dict) or not isinstance(content.get("classes"), list):
        raise DatasetFormatError(f'{path} must be an object with a list "classes" (and optionally '
                                 '"coarse_classes"), e.g. {"classes": ["apple", ...]}')
    out = {}
    for key in ("classes", "coarse_classes"):
        if key in content:
            if not isinstance(content[key], list) or not all(isinstance(n, str) for n in content[key]):
                raise DatasetFormatError(f'{path}: "{key}" must be a list of strings')
            out[key] = list(content[key])
    return out


# torchvision's on-disk layout of the CIFAR pickles.
_CIFAR_LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "meta": "batches.meta", "label_key": "labels", "names_key": "label_names"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"],
                 "meta": "meta", "label_key": "fine_labels", "names_key": "fine_label_names"},
}


def cifar_checksums(name: str) -> dict[str, str]:
    """{file: official MD5} of torchvision's CIFAR pickles (the lists of its own integrity check)."""
    import torchvision.datasets as tvd
    cls = tvd.CIFAR100 if name == "cifar100" else tvd.CIFAR10
    return {**dict(cls.train_list), **dict(cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only what the CIFAR pickles hold: dicts, lists, strings, numbers and numpy arrays.
    Any other global (a function to call, a class to build) is refused before it is looked up."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                          ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def _unpickle(path: Path, md5: str, dataset: str) -> dict:
    """A CIFAR pickle, verified against its official MD5 before a byte of it is unpickled, then
    unpickled with `ArraysOnlyUnpickler`."""
    import hashlib
    content = path.read_bytes()
    digest = hashlib.md5(content, usedforsecurity=False).hexdigest()
    if digest != md5:
        raise DatasetFormatError(
            f"{path}: MD5 {digest} differs from the official {dataset} file's {md5}; it is damaged or "
            f"not the original (never unpickled): delete {path.parent} and download it again (--download)")
    try:
        out = ArraysOnlyUnpickler(io.BytesIO(content), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DatasetFormatError(f"{path}: refused ({exc}); the official {dataset} files hold only arrays, "
                                 "lists and strings") from None
    if not isinstance(out, dict):
        raise DatasetFormatError(f"{path} holds a {type(out).__name__}, not the CIFAR dict of arrays")
    return out


def _cifar_files_present(root: Path, layout: dict) -> bool:
    folder = root / layout["folder"]
    return all((folder / name).is_file() for name in layout["train"] + layout["test"] + [layout["meta"]])


def load_cifar_dataset(name: str, root: str | Path, download: bool = True) -> ImageDataset:
    """CIFAR-10/100 from torchvision's pickles under `root`, downloading them when allowed."""
    layout = _CIFAR_LAYOUT[name]
    root = Path(root)
    if not _cifar_files_present(root, layout) and download:
        import torchvision
        from torchvision.datasets.utils import download_and_extract_archive
        cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
        try:  # the archive's MD5 is checked before it is unpacked; nothing is unpickled here
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:  # offline, proxy, disk
            raise DatasetNotFoundError(
                f"{name} is not under {root} and downloading it failed ({type(exc).__name__}: {exc}). "
                f"Place the extracted '{layout['folder']}' folder (from the official "
                f"{name.upper()} python archive) in {root}, or pass --data-root to where it is.") from exc
    if not _cifar_files_present(root, layout):
        raise DatasetNotFoundError(
            f"{name} not found: expected {root / layout['folder']} with files "
            f"{', '.join(layout['train'] + layout['test'] + [layout['meta']])}. Run with --download "
            f"(needs internet) or place the extracted official python archive there "
            "(--data-root sets the folder).")
    folder = root / layout["folder"]
    checksums = cifar_checksums(name)
    meta = _unpickle(folder / layout["meta"], checksums[layout["meta"]], name)
    parts = {}
    for split in ("train", "test"):
        batches = [_unpickle(folder / f, checksums[f], name) for f in layout[split]]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        images = data.reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b[layout["label_key"]]) for b in batches])
        coarse = (np.concatenate([np.asarray(b["coarse_labels"]) for b in batches])
                  if "coarse_labels" in batches[0] else None)
        parts[split] = (torch.from_numpy(images.copy()), _labels(labels),
                        _labels(coarse) if coarse is not None else None)
    return ImageDataset(name, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1],
                        list(meta[layout["names_key"]]), parts["train"][2], parts["test"][2],
                        list(meta["coarse_label_names"]) if "coarse_label_names" in meta else None)


def check_dataset_available(name: str, root: str | Path = "data", download: bool = True) -> None:
    """Raise DatasetNotFoundError now (before any other work) when `name` cannot be had: an npz
    folder without its files, or torchvision's CIFAR files missing with downloads turned off."""
    if name in _CIFAR_LAYOUT:
        layout = _CIFAR_LAYOUT[name]
        if not download and not _cifar_files_present(Path(root), layout):
            raise DatasetNotFoundError(
                f"{name} not found: expected {Path(root) / layout['folder']} with files "
                f"{', '.join(layout['train'] + layout['test'] + [layout['meta']])} (downloads are off: "
                "--no-download); place the extracted official python archive there, point --data-root at it "
                "or allow --download")
    elif name.startswith("npz:"):
        folder = Path(name[len("npz:"):])
        missing = [f for f in ("train.npz", "test.npz") if not (folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(f"--dataset {name}: {', '.join(str(folder / f) for f in missing)} not "
                                       "found; an npz folder holds train.npz and test.npz (`data subset` writes one)")


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), antialiased bilinear."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for start in range(0, images.shape[0], 4096):  # bounded memory for large datasets
        x = images[start:start + 4096].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_dataset(name: str, root: str | Path = "data", download: bool = True,
                 image_size: int | None = None) -> ImageDataset:
    """Dispatch on the dataset name: cifar100, cifar10, digits or npz:<dir>.

    `image_size` resizes every image (None keeps the dataset's own size; digits default to 32).
    """
    if name == "digits":
        return load_digits_dataset(image_size or 32)
    if name in _CIFAR_LAYOUT:
        dataset = load_cifar_dataset(name, root, download)
    elif name.startswith("npz:"):
        dataset = load_npz_dataset(name[len("npz:"):])
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if image_size is not None and image_size != dataset.image_size:
        needed = 3 * image_size ** 2 * (len(dataset.train_labels) + len(dataset.test_labels))
        memory = available_memory()
        if memory is not None and 2 * needed > memory:  # (the resize holds a float copy of a chunk too)
            raise DatasetFormatError(f"--image-size {image_size}: {dataset.name} resized would take "
                                     f"{needed / 2**30:.1f} GiB, more than half of this machine's {memory / 2**30:.1f} "
                                     "GiB; choose a smaller size or a subset")
        dataset.train_images = resize_images(dataset.train_images, image_size)
        dataset.test_images = resize_images(dataset.test_images, image_size)
    return dataset




def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` indices drawn without replacement, each class represented in proportion to its size.

    Each class gets floor(n * size / total) images; the images left over go one each to the classes
    with the largest fractional share (ties in a seeded random order), so a balanced dataset gives
    equal counts per class (up to one image when n is not a multiple of the number of classes).
    Within a class the images are a seeded random choice; the result keeps the source's order.
    """
    labels = labels.cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    share = counts.double() * n / labels.shape[0]
    take = share.floor().long()
    left = n - int(take.sum())
    if left:
        tie_break = torch.rand(len(classes), generator=generator, dtype=torch.float64)
        order = sorted(range(len(classes)), key=lambda k: (-float(share[k] - take[k]), float(tie_break[k])))
        for k in order[:left]:
            take[k] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def subsample(dataset: ImageDataset, train: int | None, test: int | None, seed: int = 0,
              sampling: str = "stratified") -> ImageDataset:
    """A seeded subset of each split (for CPU-sized runs on big datasets): `stratified` (each class
    in proportion to its size, equal counts on a balanced dataset) or `random` (a uniform draw of
    images, whose class counts vary: the scheme of runs before stratification)."""
    if sampling not in SUBSET_SAMPLINGS:
        raise ValueError(f"unknown subset sampling {sampling!r}; choose {' or '.join(SUBSET_SAMPLINGS)}")
    g = torch.Generator().manual_seed(seed)

    def pick(labels, n):
        if not n or n >= labels.shape[0]:
            return None
        if sampling == "random":
            return torch.randperm(labels.shape[0], generator=g)[:n]
        return stratified_indices(labels, n, g)

    out = ImageDataset.__new__(ImageDataset)
    out.__dict__.update(dataset.__dict__)
    for split, n in (("train", train), ("test", test)):
        idx = pick(getattr(dataset, f"{split}_labels"), n)
        if idx is None:
            continue
        for key in (f"{split}_images", f"{split}_labels", f"{split}_coarse_labels"):
            value = getattr(dataset, key)
            setattr(out, key, value[idx.to(value.device)] if value is not None else None)
    return out


def per_class_subset(dataset: ImageDataset, train_per_class: int | None, test_per_class: int | None,
                     seed: int = 0) -> ImageDataset:
    """Exactly `train_per_class` / `test_per_class` images of every class (None: the whole split);
    an error names the smallest class when one has fewer images than asked for."""
    sizes = {}
    for split, k in (("train", train_per_class), ("test", test_per_class)):
        if k is None:
            continue
        if k < 1:
            raise ValueError(f"--{split}-per-class must be at least 1, got {k}")
        labels = getattr(dataset, f"{split}_labels").cpu()
        counts = torch.bincount(labels, minlength=dataset.num_classes)
        present = counts[counts > 0]
        if int(present.min()) < k:
            smallest = int(torch.nonzero(counts == present.min())[0])
            raise ValueError(f"{dataset.name} {split}: class {smallest} '{dataset.classes[smallest]}' has "
                             f"{int(present.min())} images, fewer than the {k} per class asked for")
        if not bool((present == present[0]).all()):
            raise ValueError(f"{dataset.name} {split}: classes of unequal sizes ({int(present.min())} to "
                             f"{int(present.max())} images); a per-class subset needs a balanced split")
        sizes[split] = k * len(present)
    return subsample(dataset, sizes.get("train"), sizes.get("test"), seed=seed, sampling="stratified")


NPZ_FOLDER_FILES = ("train.npz", "test.npz", "classes.json")


def write_npz_dataset(dataset: ImageDataset, directory: str | Path) -> Path:
    """Write `dataset` as an npz folder (train.npz, test.npz, classes.json) that `load_npz_dataset`
    reads back unchanged. The files are written into a hidden sibling folder (with copies of any
    other files of the folder) that then takes the folder's place (a folder being replaced is moved
    aside first and removed after), so a kill at
    any moment leaves the old folder, the new one or neither, never a mix of the two; hidden
    folders left by killed writers are removed first."""
    directory = Path(directory)
    partial = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    try:
        return _write_npz_folder(dataset, directory, partial)
    except OSError as exc:  # a full disk, a folder that cannot be written: the old folder stays
        shutil.rmtree(partial, ignore_errors=True)
        raise OutputWriteError(exc.errno, f"cannot write the dataset to {directory} ({exc.strerror or exc}: "
                                          f"{exc.filename or directory}); choose another folder or make room") from None


def _write_npz_folder(dataset: ImageDataset, directory: Path, partial: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(directory)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for split in ("train", "test"):
        arrays = {"images": getattr(dataset, f"{split}_images").cpu().permute(0, 2, 3, 1).contiguous().numpy(),
                  "labels": getattr(dataset, f"{split}_labels").cpu().numpy().astype(np.int64)}
        coarse = getattr(dataset, f"{split}_coarse_labels")
        if coarse is not None:
            arrays["coarse_labels"] = coarse.cpu().numpy().astype(np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(partial / f"{split}.npz", buffer.getvalue())
    names = {"classes": list(dataset.classes)}
    if dataset.coarse_classes is not None:
        names["coarse_classes"] = list(dataset.coarse_classes)
    atomic_write_json(partial / "classes.json", names)
    if directory.exists() and any(directory.iterdir()):
        for other in directory.iterdir():  # what is not the dataset's own stays (a part's part.json)
            if other.name not in NPZ_FOLDER_FILES:
                (shutil.copytree if other.is_dir() else shutil.copy2)(other, partial / other.name)
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        os.replace(directory, old)
        os.replace(partial, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if directory.exists():
            directory.rmdir()
        os.replace(partial, directory)
    return directory


def _remove_stale_partials(directory: Path) -> None:
    """Remove the hidden folders that writers of `directory` killed before the end left behind."""
    for stale in [*directory.parent.glob(f".{directory.name}.partial-*"),
                  *directory.parent.glob(f".{directory.name}.old-*")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

def channel_statistics(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (n - 1) of uint8 images (N, 3, H, W) scaled to [0, 1],
    from exact integer sums over chunks of images: no float64 copy of the whole set (8x its size)."""
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    for part in images.split(chunk):
        values = part.to(torch.int64)
        total += values.sum(dim=(0, 2, 3))
        squares += values.square().sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total.double() / n
    var = (squares.double() - total.double() * mean) / max(n - 1, 1)
    return (mean / 255).float(), (var.clamp(min=0).sqrt() / 255).clamp(min=1e-3).float()


@dataclass
class AugmentParams:
    """Per-sample random parameters of one augmented view."""

    offsets: torch.Tensor  # (B, 2) int64 crop offsets (row, col) in [0, 2 * padding]
    flip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B, 3) brightness, contrast, saturation factors

    def slice(self, part: slice) -> "AugmentParams":
        return AugmentParams(self.offsets[part], self.flip[part], self.jitter[part])


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 standardised with the dataset's channel mean/std."""
    x = images.float().div_(255)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


class TwoViewAugment:
    """Random crop (zero padding), horizontal flip and colour jitter on a batch, per sample.

    The padding is 4 pixels for 32x32 images (SPEC 3); `for_size` scales it with the image.
    """

    @classmethod
    def for_size(cls, mean: torch.Tensor, std: torch.Tensor, image_size: int,
                 jitter: float = 0.2) -> "TwoViewAugment":
        return cls(mean, std, padding=max(1, image_size // 8), jitter=jitter)

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, padding: int = 4,
                 flip_prob: float = 0.5, jitter: float = 0.2):
        self.mean, self.std = mean, std
        self.padding, self.flip_prob, self.jitter = padding, flip_prob, jitter

    def sample_params(self, batch: int, generator: torch.Generator) -> AugmentParams:
        offsets = torch.randint(0, 2 * self.padding + 1, (batch, 2), generator=generator)
        flip = torch.rand(batch, generator=generator) < self.flip_prob
        jitter = 1 + self.jitter * (2 * torch.rand(batch, 3, generator=generator) - 1)
        return AugmentParams(offsets, flip, jitter)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device -> normalised float32 augmented batch."""
        device = images.device
        b, _, h, w = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p))
        offsets = to_device(params.offsets, device)
        flip = to_device(params.flip, device)
        rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H)
        cols_forward = torch.arange(w, device=device)
        cols = offsets[:, 1:] + torch.where(flip[:, None], w - 1 - cols_forward, cols_forward)
        batch_idx = torch.arange(b, device=device)[:, None, None]
        # Advanced indexing gathers every sample's own crop (and flip) in one call: (B, H, W, 3).
        crops = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
        x = crops.permute(0, 3, 1, 2).float().div_(255)
        x = self._colour_jitter(x, to_device(params.jitter, device))
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)

    @staticmethod
    def _colour_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Brightness, then contrast, then saturation (torchvision's formulas, fixed order)."""
        brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in factors.unbind(1))
        x = (x * brightness).clamp_(0, 1)
        grey_mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (contrast * x + (1 - contrast) * grey_mean).clamp_(0, 1)
        return (saturation * x + (1 - saturation) * _grayscale(x)).clamp_(0, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample_params(images.shape[0], generator))


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  augment: TwoViewAugment, generator: torch.Generator, drop_last: bool = True,
                  views: int = 2, shard: tuple[int, int] = (0, 1)
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """One shuffled epoch of `(indices, view1, view2, labels)`; indices stay on the CPU.

    With `views=1` (teacher training, probes) view2 is None and not computed.
    The order and the augmentation parameters come from the CPU `generator`, so the same seed
    yields the same batches on any device. They are drawn for the whole epoch before the first
    batch, in the order the batches use them (the same draws as batch by batch), and reach the
    device in one copy each rather than several copies per step. A dataset smaller than one batch
    gives one batch. Batches are computed on the device of the normalisation statistics
    (`augment.mean`); images kept on the host (too large for the GPU) are copied there batch by batch.

    `shard=(rank, world)`: this process's contiguous slice of every global batch (several GPUs).
    Every rank draws the global batch's order and augmentation parameters, so the slices together
    are exactly the single-process batch; a last partial batch is trimmed to a multiple of `world`.
    """
    n = labels.shape[0]
    device = augment.mean.device
    rank, world = shard
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    plan: list[tuple[torch.Tensor, list[AugmentParams]]] = []
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        params = [augment.sample_params(idx.shape[0], generator) for _ in range(views)]
        if world > 1:
            per_rank = idx.shape[0] // world
            if per_rank == 0:
                continue
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            idx, params = idx[part], [p.slice(part) for p in params]
        plan.append((idx, params))
    if not plan:
        return
    indices = torch.cat([idx for idx, _ in plan])
    on_images = to_device(indices, images.device)  # gathers images and labels where they live
    epoch_labels = to_device(labels[on_images], device)
    epoch_params = [AugmentParams(*(to_device(torch.cat([getattr(p[v], key) for _, p in plan]), device)
                                    for key in ("offsets", "flip", "jitter")))
                    for v in range(views)]
    start = 0
    for idx, _ in plan:
        rows = slice(start, start + idx.shape[0])
        start = rows.stop
        batch = to_device(images[on_images[rows]], device)
        view1 = augment.apply(batch, epoch_params[0].slice(rows))
        view2 = augment.apply(batch, epoch_params[1].slice(rows)) if views == 2 else None
        yield idx, view1, view2, epoch_labels[rows]


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean: torch.Tensor, std: torch.Tensor):
    """Test-time batches on the device of `mean`: normalisation only, in order."""
    for start in range(0, labels.shape[0], batch_size):
        yield (normalise(to_device(images[start:start + batch_size], mean.device), mean, std),
               to_device(labels[start:start + batch_size], mean.device))
