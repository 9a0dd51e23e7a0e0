"""Superclass labels, stratified subsets, the npz subset writer and the real CIFAR-100 copy."""

import json
from pathlib import Path

import pytest
import torch

from desupcon import cli
from desupcon.config import preset, run_name
from desupcon.data import (DatasetFormatError, ImageDataset, load_dataset, load_npz_dataset,
                           per_class_subset, stratified_indices, subsample, write_npz_dataset)

REAL_CIFAR100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def _dataset(train_labels, test_labels, coarse_of_class=None, names=None, coarse_names=None):
    """Image i of a split holds i in its first two pixels (so a subset can be traced back)."""
    def images(n):
        x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        idx = torch.arange(n)
        x[:, 0, 0, 0], x[:, 1, 0, 0] = (idx % 256).to(torch.uint8), (idx // 256).to(torch.uint8)
        return x
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    k = int(max(train_labels.max(), test_labels.max())) + 1
    coarse = (None, None)
    if coarse_of_class is not None:
        table = torch.as_tensor(coarse_of_class)
        coarse = (table[train_labels], table[test_labels])
        coarse_names = coarse_names or [f"s{i}" for i in range(int(table.max()) + 1)]
    return ImageDataset("toy", images(len(train_labels)), train_labels, images(len(test_labels)), test_labels,
                        names or [f"c{i}" for i in range(k)], *coarse, coarse_names)


def _ids(images):
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


# ------------------------------------------------------------------------------------------------
# Superclass labels are checked
# ------------------------------------------------------------------------------------------------

def test_coarse_labels_that_split_a_class_are_refused():
    labels = torch.arange(40) % 4
    coarse = labels // 2
    coarse[5] = 0  # image 5 is class 1 (superclass 0): fine; image 6 is class 2 -> superclass 1 ...
    coarse[6] = 0  # ... now class 2 has superclasses {0, 1}
    with pytest.raises(DatasetFormatError, match=r"class 2 'c2' has superclasses \[0, 1\]"):
        ImageDataset("toy", torch.zeros(40, 3, 2, 2, dtype=torch.uint8), labels,
                     torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4), ["c0", "c1", "c2", "c3"],
                     coarse, torch.arange(4) // 2, ["a", "b"])


def test_coarse_labels_across_splits_must_agree():
    # each split on its own is consistent; together class 0 lies in two superclasses
    with pytest.raises(DatasetFormatError, match="one superclass"):
        ImageDataset("toy", torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                     torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["x", "y"],
                     torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1]), ["a", "b"])


@pytest.mark.parametrize("train_coarse, test_coarse, message", [
    (torch.tensor([0, 0, 0]), torch.tensor([0, 0]), "4 labels but"),
    (torch.tensor([0, 0, 0, 5]), torch.tensor([0, 0]), r"must lie in \[0, 2\)"),
    (torch.tensor([0, 0, 0, 0]), None, "one split only"),
])
def test_malformed_coarse_labels_are_refused(train_coarse, test_coarse, message):
    with pytest.raises(DatasetFormatError, match=message):
        ImageDataset("toy", torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                     torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["x", "y"],
                     train_coarse, test_coarse, ["a", "b"])


def test_superclass_of_class():
    ds = _dataset(torch.arange(30) % 6, torch.arange(12) % 6, coarse_of_class=[2, 0, 2, 1, 0, 1])
    assert ds.superclass_of_class().tolist() == [2, 0, 2, 1, 0, 1]
    assert _dataset(torch.arange(6) % 3, torch.arange(3)).superclass_of_class() is None


def test_npz_reads_superclass_names_and_checks_classes_json(tmp_path):
    ds = _dataset(torch.arange(24) % 4, torch.arange(8) % 4, coarse_of_class=[1, 0, 1, 0],
                  names=["wolf", "car", "dog", "truck"], coarse_names=["vehicles", "canines"])
    write_npz_dataset(ds, tmp_path / "ds")
    back = load_npz_dataset(tmp_path / "ds")
    assert back.classes == ["wolf", "car", "dog", "truck"]
    assert back.coarse_classes == ["vehicles", "canines"]
    assert back.superclass_of_class().tolist() == [1, 0, 1, 0]
    for bad, message in (("[1, 2]", "must be an object"), ("{not json", "not valid JSON"),
                         ('{"classes": ["a", "b", "c", "d"], "coarse_classes": [1, 2]}', "list of strings")):
        (tmp_path / "ds" / "classes.json").write_text(bad)
        with pytest.raises(DatasetFormatError, match=message):
            load_npz_dataset(tmp_path / "ds")


# ------------------------------------------------------------------------------------------------
# Stratified subsets
# ------------------------------------------------------------------------------------------------

def test_stratified_subset_has_equal_counts_on_a_balanced_split():
    ds = _dataset(torch.arange(1000) % 10, torch.arange(300) % 10, coarse_of_class=[i // 5 for i in range(10)])
    sub = subsample(ds, 200, 50, seed=0)
    assert torch.bincount(sub.train_labels, minlength=10).tolist() == [20] * 10
    counts = torch.bincount(sub.test_labels, minlength=10).tolist()
    assert sorted(counts) == [5] * 10  # 50 of 300 over 10 classes: exactly 5 each
    ids = _ids(sub.train_images)
    assert len(set(ids)) == 200 and ids == sorted(ids)  # without replacement, the source's order
    assert sub.train_labels.tolist() == [i % 10 for i in ids]  # labels travel with their images
    assert sub.train_coarse_labels.tolist() == [(i % 10) // 5 for i in ids]


def test_stratified_subset_remainder_and_proportions():
    # classes of 600, 300 and 100 images: 100 of them -> 60 / 30 / 10
    labels = torch.cat([torch.zeros(600), torch.ones(300), torch.full((100,), 2)]).long()
    idx = stratified_indices(labels, 100, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[idx], minlength=3).tolist() == [60, 30, 10]
    # 23 of a balanced 10-class split: 2 each, and 3 classes (seeded) get one more
    labels = torch.arange(500) % 10
    counts = torch.bincount(labels[stratified_indices(labels, 23, torch.Generator().manual_seed(1))], minlength=10)
    assert sorted(counts.tolist()) == [2] * 7 + [3] * 3


def test_subsets_are_seeded_and_the_random_scheme_remains():
    ds = _dataset(torch.arange(1000) % 10, torch.arange(100) % 10)
    a, b = (_ids(subsample(ds, 100, None, seed=3).train_images) for _ in range(2))
    assert a == b and a != _ids(subsample(ds, 100, None, seed=4).train_images)
    counts = [torch.bincount(subsample(ds, 100, None, seed=s, sampling="random").train_labels,
                             minlength=10).tolist() for s in range(5)]
    assert any(c != [10] * 10 for c in counts)  # a uniform draw of images: unequal class counts
    with pytest.raises(ValueError, match="stratified or random"):
        subsample(ds, 100, None, sampling="balanced")


def test_subset_sampling_is_part_of_the_identity_and_name():
    base = preset("quick").replace(data={"train_subset": 500})
    random = base.replace(data={"subset_sampling": "random"})
    assert base.identity() != random.identity()
    assert run_name(base) != run_name(random) and "samplingrandom" in run_name(random)
    # an identity from before the scheme existed (a random subset, no key) is the random scheme's
    assert "subset_sampling" not in random.data_identity()
    # without a subset the scheme changes nothing: same identity, same name
    full, full_random = preset("quick"), preset("quick").replace(data={"subset_sampling": "random"})
    assert full.identity() == full_random.identity() and run_name(full) == run_name(full_random)


# ------------------------------------------------------------------------------------------------
# The subset writer and its command
# ------------------------------------------------------------------------------------------------

def test_per_class_subset_round_trips_through_the_npz_writer(tmp_path):
    ds = _dataset(torch.arange(600) % 6, torch.arange(120) % 6, coarse_of_class=[0, 0, 1, 1, 2, 2])
    sub = per_class_subset(ds, 7, 3, seed=5)
    assert torch.bincount(sub.train_labels).tolist() == [7] * 6 and torch.bincount(sub.test_labels).tolist() == [3] * 6
    write_npz_dataset(sub, tmp_path / "out")
    back = load_npz_dataset(tmp_path / "out")
    for key in ("train_images", "train_labels", "test_images", "test_labels", "train_coarse_labels",
                "test_coarse_labels"):
        assert torch.equal(getattr(back, key), getattr(sub, key)), key
    assert back.classes == ds.classes and back.coarse_classes == ds.coarse_classes
    assert _ids(per_class_subset(ds, 7, 3, seed=5).train_images) == _ids(sub.train_images)
    assert _ids(per_class_subset(ds, 7, 3, seed=6).train_images) != _ids(sub.train_images)
    with pytest.raises(ValueError, match="has 100 images, fewer than the 101"):
        per_class_subset(ds, 101, None)


def test_data_subset_command(tmp_path, capsys):
    ds = _dataset(torch.arange(400) % 4, torch.arange(80) % 4, coarse_of_class=[0, 1, 0, 1],
                  names=["wolf", "car", "dog", "truck"])
    write_npz_dataset(ds, tmp_path / "src")
    assert cli.main(["data", "subset", str(tmp_path / "src"), str(tmp_path / "out"), "--train-per-class", "10",
                     "--test-per-class", "2", "--seed", "1"]) == 0
    out = load_dataset(f"npz:{tmp_path / 'out'}")
    assert torch.bincount(out.train_labels).tolist() == [10] * 4 and torch.bincount(out.test_labels).tolist() == [2] * 4
    assert out.classes == ["wolf", "car", "dog", "truck"] and out.superclass_of_class().tolist() == [0, 1, 0, 1]
    assert "40 training and 8 test images of 4 classes" in capsys.readouterr().out
    # a second write into the same folder needs --overwrite; a per-class count too large is one line
    assert cli.main(["data", "subset", str(tmp_path / "src"), str(tmp_path / "out"), "--train-per-class", "5"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["data", "subset", str(tmp_path / "src"), str(tmp_path / "big"), "--train-per-class", "500"]) == 2
    assert "fewer than the 500 per class" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The real CIFAR-100 (../shared/data/cifar100)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (REAL_CIFAR100 / "train.npz").is_file(),
                    reason=f"the real CIFAR-100 npz folder is not at {REAL_CIFAR100} (shared/ absent)")
def test_real_cifar100_npz_loads_with_superclasses():
    ds = load_dataset(f"npz:{REAL_CIFAR100}")
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.classes[:5] == ["apple", "aquarium_fish", "baby", "bear", "beaver"] and len(ds.classes) == 100
    assert len(ds.coarse_classes) == 20 and "large_carnivores" in ds.coarse_classes
    assert torch.bincount(ds.train_labels, minlength=100).tolist() == [500] * 100
    assert torch.bincount(ds.test_labels, minlength=100).tolist() == [100] * 100
    assert torch.bincount(ds.train_coarse_labels, minlength=20).tolist() == [2500] * 20
    supers = ds.superclass_of_class()
    assert torch.bincount(supers, minlength=20).tolist() == [5] * 20  # five classes per superclass
    name = dict(zip(ds.classes, supers.tolist()))
    assert name["wolf"] == name["lion"] and name["wolf"] != name["pickup_truck"]
    published = torch.tensor([0.50707516, 0.48654887, 0.44091784])  # the README's training statistics
    assert torch.allclose(ds.mean, published, atol=1e-6)
    sub = subsample(ds, 2000, 500, seed=0)
    assert torch.bincount(sub.train_labels, minlength=100).tolist() == [20] * 100
    assert torch.bincount(sub.test_labels, minlength=100).tolist() == [5] * 100


def test_a_run_on_an_npz_folder_records_superclass_structure_in_both_spaces(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = _dataset(torch.arange(120) % 6, torch.arange(60) % 6, coarse_of_class=[0, 0, 1, 1, 2, 2])
    ds.train_images = torch.randint(0, 256, ds.train_images.shape[:2] + (8, 8), generator=g, dtype=torch.uint8)
    ds.test_images = torch.randint(0, 256, ds.test_images.shape[:2] + (8, 8), generator=g, dtype=torch.uint8)
    write_npz_dataset(ds, tmp_path / "ds")
    out = tmp_path / "out"
    assert cli.main(["train", "--preset", "quick", "--dataset", f"npz:{tmp_path / 'ds'}", "--method", "lw-supcrd",
                     "--teacher-arch", "resnet8", "--student-arch", "resnet8", "--train-teacher",
                     "--teacher-epochs", "1", "--probe-epochs", "1", "--epochs", "1", "--train-subset", "60", "--batch-size", "16", "--teacher-batch-size", "16",
                     "--device", "cpu", "--output-dir", str(out)]) == 0
    records = {}
    for path in (out / "json_results").glob("comprehensive_results_*.json"):
        records.update(json.loads(path.read_text()))
    kinds = {r["kind"] for r in records.values()}
    assert kinds == {"student", "teacher"}
    for record in records.values():
        for space in (record["metrics"], record["metrics"]["backbone"]):
            assert -2 <= space["superclass_margin"] <= 2
            assert space["superclass_nearest_rate"] in [k / 6 for k in range(7)]


@pytest.mark.parametrize("killed_at", ["test.npz", "classes.json"])
def test_a_writer_killed_between_files_leaves_the_old_folder_whole(tmp_path, monkeypatch, killed_at):
    """`data subset --overwrite` killed before its second or third file: the folder still holds the
    old dataset entirely (never the new train.npz beside the old test.npz), and the rerun replaces it
    and clears what the killed writer left."""
    from desupcon import data as data_mod
    old = _dataset(torch.arange(60) % 3, torch.arange(30) % 3)
    write_npz_dataset(old, tmp_path / "out")
    new = per_class_subset(old, 4, 2, seed=1)
    real = {name: getattr(data_mod, name) for name in ("atomic_write_bytes", "atomic_write_json")}

    def killing(name):
        def write(path, payload):
            if Path(path).name == killed_at:
                raise KeyboardInterrupt
            real[name](path, payload)
        return write
    for name in real:
        monkeypatch.setattr(data_mod, name, killing(name))
    monkeypatch.setattr(data_mod, "_process_alive", lambda pid: False)  # the killed writer is gone
    with pytest.raises(KeyboardInterrupt):
        write_npz_dataset(new, tmp_path / "out")
    back = load_npz_dataset(tmp_path / "out")
    assert torch.equal(back.train_labels, old.train_labels) and torch.equal(back.test_labels, old.test_labels)
    for name, function in real.items():
        monkeypatch.setattr(data_mod, name, function)
    write_npz_dataset(new, tmp_path / "out")
    back = load_npz_dataset(tmp_path / "out")
    assert torch.equal(back.train_labels, new.train_labels) and torch.equal(back.test_labels, new.test_labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
