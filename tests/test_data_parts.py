"""A dataset cut into parts and joined back (`data split` / `data join`): the joined copy equals the
source array for array, and parts that do not make up one dataset are refused in one line."""

import json
import shutil

import numpy as np
import pytest
import torch

from desupcon import cli
from desupcon.data import ImageDataset, load_npz_dataset, write_npz_dataset
from desupcon.data_parts import DatasetPartsError, dataset_digest, join_parts, write_parts


def _dataset(n_train=23, n_test=11, coarse=True) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    train_labels = torch.arange(n_train) % 6
    test_labels = torch.arange(n_test) % 6
    supers = torch.tensor([0, 0, 1, 1, 2, 2])
    return ImageDataset("toy", torch.randint(0, 256, (n_train, 3, 8, 8), generator=g, dtype=torch.uint8),
                        train_labels, torch.randint(0, 256, (n_test, 3, 8, 8), generator=g, dtype=torch.uint8),
                        test_labels, [f"c{i}" for i in range(6)],
                        supers[train_labels] if coarse else None, supers[test_labels] if coarse else None,
                        ["s0", "s1", "s2"] if coarse else None)


def _same(a: ImageDataset, b: ImageDataset) -> None:
    for key in ("train_images", "train_labels", "test_images", "test_labels", "train_coarse_labels",
                "test_coarse_labels"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or torch.equal(x, y), key
    assert a.classes == b.classes and a.coarse_classes == b.coarse_classes


@pytest.mark.parametrize("parts", [1, 3, 11])
@pytest.mark.parametrize("coarse", [True, False])
def test_join_of_the_parts_is_the_source(tmp_path, parts, coarse):
    source = _dataset(coarse=coarse)
    folders = write_parts(source, tmp_path / "parts", parts)
    assert [f.name for f in folders] == [f"part-{k}-of-{parts}" for k in range(1, parts + 1)]
    # each part is an ordinary npz folder holding a slice of both splits, in order
    sizes = [len(load_npz_dataset(f).train_labels) for f in folders]
    assert sum(sizes) == 23 and max(sizes) - min(sizes) <= 1
    joined = join_parts([tmp_path / "parts"])  # the folder holding them
    _same(joined, source)
    # the order the part folders are given in does not matter
    _same(join_parts(list(reversed(folders))), source)


def test_digest_changes_with_one_pixel_one_label_and_a_class_name():
    base = dataset_digest(_dataset())
    for change in ("pixel", "label", "name"):
        d = _dataset()
        if change == "pixel":
            d.train_images[5, 1, 2, 3] ^= 1
        elif change == "label":
            d.test_labels[0] = 5
        else:
            d.classes[2] = "other"
        assert dataset_digest(d) != base, change


def test_missing_repeated_and_foreign_parts_are_refused(tmp_path):
    folders = write_parts(_dataset(), tmp_path / "a", 3)
    with pytest.raises(DatasetPartsError, match=r"^parts 2 of 3 are missing"):
        join_parts([folders[0], folders[2]])
    shutil.copytree(folders[1], tmp_path / "copy")
    with pytest.raises(DatasetPartsError, match="part 2 appears twice"):
        join_parts([*folders, tmp_path / "copy"])
    other = write_parts(_dataset(n_train=24), tmp_path / "b", 3)
    with pytest.raises(DatasetPartsError, match="belongs to another dataset"):
        join_parts([folders[0], other[1], folders[2]])
    with pytest.raises(DatasetPartsError, match="does not exist"):
        join_parts([tmp_path / "nowhere"])
    with pytest.raises(DatasetPartsError, match="--parts must be in"):
        write_parts(_dataset(), tmp_path / "c", 12)  # more parts than test images


def test_a_damaged_part_is_found_by_the_digest(tmp_path):
    folders = write_parts(_dataset(), tmp_path / "parts", 2)
    part = load_npz_dataset(folders[1])
    part.train_images[0, 0, 0, 0] ^= 7  # one pixel changed; the file itself stays a valid npz folder
    write_npz_dataset(part, folders[1])
    with pytest.raises(DatasetPartsError, match="differ from the dataset they were cut from"):
        join_parts([tmp_path / "parts"])
    (folders[0] / "part.json").write_text("{not json")
    with pytest.raises(DatasetPartsError, match="unreadable"):
        join_parts([tmp_path / "parts"])


def test_cli_split_then_join_writes_the_same_files(tmp_path, capsys):
    source = tmp_path / "source"
    write_npz_dataset(_dataset(), source)
    assert cli.main(["data", "split", str(source), str(tmp_path / "parts"), "--parts", "2"]) in (0, None)
    assert cli.main(["data", "join", str(tmp_path / "joined"), str(tmp_path / "parts")]) in (0, None)
    for name in ("train.npz", "test.npz"):
        a, b = np.load(source / name), np.load(tmp_path / "joined" / name)
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert json.loads((tmp_path / "joined" / "classes.json").read_text()) == \
        json.loads((source / "classes.json").read_text())
    # joining again into the full folder, or into a part, is refused with exit 2 and one line
    for out in (tmp_path / "joined", tmp_path / "parts" / "part-1-of-2"):
        assert cli.main(["data", "join", str(out), str(tmp_path / "parts")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("not empty" in err or "is one of the parts" in err), err
