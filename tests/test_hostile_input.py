"""Hostile and clumsy input (issue 22): dataset files verified before they are trusted, npz folders
checked with one-line errors, every setting range-checked, inputs checked in a useful order."""

import json
import os
import pickle

import numpy as np
import pytest

from desupcon import data
from desupcon.cli import main
from desupcon.data import DatasetFormatError, load_dataset


class RunsAShellCommand:
    """A pickle payload: unpickling it would call os.system (touching a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_cifar100(root, marker):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rows = np.zeros((2, 3072), np.uint8)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rows, "fine_labels": [0, 1], "coarse_labels": [0, 0]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a", "b"], "payload": RunsAShellCommand(marker)}, f)
    return folder


def test_crafted_pickle_fails_the_official_checksum_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    _crafted_cifar100(tmp_path / "root", marker)
    with pytest.raises(DatasetFormatError, match="MD5 .* differs from the official cifar100 file's"):
        load_dataset("cifar100", tmp_path / "root", download=False)
    assert not marker.exists()


def test_crafted_pickle_with_matching_checksums_is_still_refused(tmp_path, accept_cifar_files):
    marker = tmp_path / "pwned"
    accept_cifar_files(_crafted_cifar100(tmp_path / "root", marker))
    with pytest.raises(DatasetFormatError, match="system is not allowed"):
        load_dataset("cifar100", tmp_path / "root", download=False)
    assert not marker.exists()


def test_cli_reports_the_crafted_pickle_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _crafted_cifar100(tmp_path / "root", marker)
    code = main(["data", "subset", "cifar100", str(tmp_path / "out"), "--data-root", str(tmp_path / "root"),
                 "--no-download", "--train-per-class", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# npz folders
# ----------------------------------------------------------------------------------------------

def _good_split(n=12, classes=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "labels": np.arange(n) % classes}


def _folder(tmp_path, train=None, test=None, classes_json=None, raw=None):
    folder = tmp_path / "npzdata"
    folder.mkdir()
    for split, arrays in (("train", train or _good_split()), ("test", test or _good_split(6, seed=1))):
        if raw and split in raw:
            (folder / f"{split}.npz").write_bytes(raw[split])
        else:
            np.savez(folder / f"{split}.npz", **arrays)
    if classes_json is not None:
        (folder / "classes.json").write_text(classes_json if isinstance(classes_json, str)
                                             else json.dumps(classes_json))
    return folder


def _one_line_exit_2(capsys, folder, *flags):
    code = main(["data", "subset", f"npz:{folder}", str(folder.parent / "out"), "--train-per-class", "1",
                 *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _npy_bytes(array):
    import io
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD_FOLDERS = {
    "greyscale images": (dict(train={"images": np.zeros((4, 8, 8), np.uint8), "labels": np.arange(4) % 2}),
                         "greyscale?"),
    "float images": (dict(train={"images": np.zeros((4, 8, 8, 3), np.float32), "labels": np.arange(4) % 2}),
                     "must be uint8"),
    "empty test split": (dict(test={"images": np.zeros((0, 8, 8, 3), np.uint8), "labels": np.zeros(0, int)}),
                         "holds no images"),
    "string labels": (dict(train={"images": np.zeros((3, 8, 8, 3), np.uint8), "labels": np.array(["a", "b", "c"])}),
                      "integer class indices, got strings"),
    "float labels": (dict(train={"images": np.zeros((3, 8, 8, 3), np.uint8), "labels": np.array([0.0, 1.7, 2.0])}),
                     "integer class indices, got float64"),
    "object labels": (dict(train={"images": np.zeros((2, 8, 8, 3), np.uint8),
                                  "labels": np.array([0, None], dtype=object)}), "Python objects"),
    "one-hot labels": (dict(train={"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.eye(4, dtype=int)}),
                       "one-hot?"),
    "negative labels": (dict(train={"images": np.zeros((2, 8, 8, 3), np.uint8), "labels": np.array([0, -1])}),
                        "negative values"),
    "stray label": (dict(train={"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, 2, 57])}),
                    "classes 3, 4, 5, 6, 7, 8, 9, 10 ... have no training images"),
    "label count": (dict(train={"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, 2])}),
                    "4 images but 3 entries in `labels`"),
    "sizes differ": (dict(test={"images": np.zeros((3, 16, 16, 3), np.uint8), "labels": np.arange(3)}),
                     "training images are 8x8 but test images 16x16"),
    "coarse length": (dict(train={**_good_split(), "coarse_labels": np.zeros(5, int)}),
                      "12 images but 5 entries in `coarse_labels`"),
    "missing key": (dict(train={"pixels": np.zeros((2, 8, 8, 3), np.uint8)}), "must hold arrays `images` and `labels`"),
    "label beyond classes.json": (dict(classes_json={"classes": ["a", "b"]}), "label 2 but classes.json names 2"),
    "malformed classes.json": (dict(classes_json="{not json"), "not valid JSON"),
    "list-shaped classes.json": (dict(classes_json=["a", "b", "c"]), "must be an object with a list"),
    "empty train.npz": (dict(raw={"train": b""}), "not a readable .npz archive"),
    "truncated train.npz": (dict(raw={"train": b"PK\x03\x04" + b"\x00" * 40}), "not a readable .npz archive"),
    "random bytes": (dict(raw={"train": bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))}),
                     "not a readable .npz archive (it does not start as a zip archive does)"),
    "a .npy named train.npz": (dict(raw={"train": _npy_bytes(np.zeros((2, 8, 8, 3), np.uint8))}),
                               "single .npy array"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_npz_folders_exit_2_with_one_line(tmp_path, capsys, case):
    spec, problem = BAD_FOLDERS[case]
    folder = _folder(tmp_path, **spec)
    err = _one_line_exit_2(capsys, folder)
    assert problem in err, err
    if "raw" not in spec and "classes_json" not in spec:
        assert str(folder) in err  # the file (or folder) is named


def test_truncated_array_inside_a_valid_archive(tmp_path, capsys):
    folder = _folder(tmp_path)
    content = (folder / "train.npz").read_bytes()
    (folder / "train.npz").write_bytes(content[: len(content) // 2])
    assert "train.npz" in _one_line_exit_2(capsys, folder)


def test_a_good_folder_still_loads(tmp_path):
    folder = _folder(tmp_path, classes_json={"classes": ["a", "b", "c"]})
    ds = load_dataset(f"npz:{folder}")
    assert ds.num_classes == 3 and ds.train_images.shape == (12, 3, 8, 8) and ds.classes == ["a", "b", "c"]
    # a class without training images is fine when classes.json says the classes exist
    train = {"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, 1, 0])}
    folder2 = tmp_path / "second"
    folder2.mkdir()
    np.savez(folder2 / "train.npz", **train)
    np.savez(folder2 / "test.npz", **_good_split(3, seed=2))
    (folder2 / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert load_dataset(f"npz:{folder2}").num_classes == 3


def test_cifar_checksums_are_torchvisions():
    sums = data.cifar_checksums("cifar100")
    assert set(sums) == {"train", "test", "meta"} and all(len(v) == 32 for v in sums.values())
    assert len(data.cifar_checksums("cifar10")) == 7


# ----------------------------------------------------------------------------------------------
# Settings: every logit, SDD and NCE setting has a range
# ----------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (["--method", "sd-kd", "--sdd-scales", "0"], "--sdd-scales must be grid sizes"),
    (["--method", "sd-kd", "--sdd-scales", "-2"], "--sdd-scales must be grid sizes"),
    (["--method", "sd-kd", "--sdd-scales", "64"], "--sdd-scales must be grid sizes"),
    (["--method", "sd-kd", "--sdd-scales", "2", "4"], "must include 1"),
    (["--method", "sd-kd", "--sdd-scales", "1", "3"], "must divide"),
    (["--method", "crd-nce", "--nce-negatives", "0"], "--nce-negatives must be >= 1"),
    (["--method", "crd-nce", "--nce-negatives=-3"], "--nce-negatives must be >= 1"),
    (["--method", "kd", "--logit-temperature", "0"], "--logit-temperature must be > 0"),
    (["--method", "kd", "--logit-temperature=-4"], "--logit-temperature must be > 0"),
    (["--method", "crd-nce", "--nce-weight=-1"], "--nce-weight must be >= 0"),
    (["--method", "dkd", "--dkd-beta=-8"], "--dkd-beta must be >= 0"),
    (["--method", "dkd", "--warmup=-1"], "--warmup must be >= 0"),
    (["--method", "kd", "--kd-weight=-0.5"], "--kd-weight must be >= 0"),
    (["--method", "lw-supcrd", "--logit-term", "mse"], "--logit-term 'mse' is unknown"),
    (["--method", "two-stage", "--phase2-epochs", "0"], "--phase2-epochs must be >= 1"),
]


@pytest.mark.parametrize("flags, problem", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, flags, problem):
    code = main(["train", "--preset", "quick", "--device", "cpu", "--output-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and problem in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "pth_models").exists() or not any((tmp_path / "pth_models").iterdir())


# ----------------------------------------------------------------------------------------------
# Order of checks
# ----------------------------------------------------------------------------------------------

def test_analyze_names_the_bad_file_before_any_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pth").write_bytes(b"garbage\n")
    assert main(["analyze", "garbage.pth", "--no-plots", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "garbage.pth is not a readable PyTorch checkpoint" in err and "cifar" not in err.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth"]  # no data folder, no download


def test_missing_data_and_missing_teacher_are_named_together(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "--dataset", "cifar100", "--data-root", str(tmp_path / "nowhere"), "--no-download",
                 "--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "2 inputs are missing" in err
    assert str(tmp_path / "nowhere" / "cifar-100-python") in err and "resnet50_cifar100" in err


def test_refused_pickle_is_not_called_corrupted(tmp_path):
    from desupcon.store.checkpoint import CheckpointError, load_checkpoint
    import torch
    marker = tmp_path / "pwned"
    torch.save({"x": RunsAShellCommand(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "evil.pth")
    assert "refused to run (nothing in it was executed)" in str(err.value) and "system" in str(err.value)
    assert "corrupted" not in str(err.value) and not marker.exists()


def test_report_on_a_mistyped_folder_creates_nothing(tmp_path, capsys):
    assert main(["report", "--output-dir", str(tmp_path / "mistyped")]) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "mistyped").exists()


# ----------------------------------------------------------------------------------------------
# Collapsed runs
# ----------------------------------------------------------------------------------------------

def test_degenerate_embeddings_give_nan_with_a_reason():
    import math
    import torch
    from desupcon.analysis import metrics as analysis
    zeros = torch.zeros(6, 4)
    assert math.isnan(analysis.uniformity(zeros)) and math.isnan(analysis.alignment_class(zeros, [0, 0, 1, 1, 2, 2]))
    assert math.isnan(analysis.alignment_instance(zeros, zeros))
    one_dead = torch.randn(6, 4)
    one_dead[3] = 0
    assert analysis.degenerate_reason(one_dead) == "1 of 6 embeddings are zero or non-finite vectors (no direction)"
    out = analysis.analyze_embeddings(one_dead, [0, 0, 1, 1, 2, 2])
    assert out["uniformity"] is None and out["alignment_class"] is None and out["zero_vectors"] == pytest.approx(1 / 6)
    assert analysis.degenerate_reason(torch.randn(6, 4)) is None
    # coinciding (but non-zero) points stay defined: uniformity exactly 0
    assert analysis.uniformity(torch.ones(5, 3)) == pytest.approx(0.0, abs=1e-12)


def test_collapse_reasons_thresholds():
    from desupcon.analysis.evaluate import collapse_reasons
    healthy = {"uniformity": -2.1, "zero_vectors": 0.0, "backbone": {"uniformity": -1.4, "zero_vectors": 0.0}}
    assert collapse_reasons({"test_acc": 61.0, "best_test_acc": 62.0}, 10, 450, healthy) == []
    # 10 classes, 450 test images: chance 10 %, sd 1.41 %: 14.2 % is the ceiling
    assert "accuracy at chance" in collapse_reasons({"best_test_acc": 14.0}, 10, 450, healthy)[0]
    assert collapse_reasons({"best_test_acc": 14.5}, 10, 450, healthy) == []
    flat = {**healthy, "backbone": {"uniformity": -0.0001, "zero_vectors": 0.0}}
    assert "backbone embeddings collapsed" in collapse_reasons({"best_test_acc": 50.0}, 10, 450, flat)[0]
    dead = {**healthy, "backbone": {"uniformity": None, "zero_vectors": 1.0}}
    assert "100 % of the test embeddings are zero vectors" in collapse_reasons({"best_test_acc": 50.0}, 10, 450, dead)[0]


def test_a_run_at_lr_1e3_is_flagged_collapsed(tmp_path, tiny_config, caplog):
    import logging
    from desupcon import report
    from desupcon.store.checkpoint import read_json
    from desupcon.session import Session
    cfg = tiny_config(tmp_path, train_images=320, test_images=200, epochs=2).replace(
        method={"method": "ce"}, optim={"lr": 1e3, "schedule": "constant"})
    with caplog.at_level(logging.WARNING, logger="desupcon"):
        result = Session(cfg).run(cfg)
    records = read_json(next((tmp_path / "json_results").glob("comprehensive_results_*.json")))
    record = records[result.name]
    assert record["collapsed"] and "COLLAPSED" in caplog.text and result.name in caplog.text
    text = report.build_report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| CE student"))
    assert row.rstrip(" |").endswith(f"seed {cfg.optim.seed}: " + record["collapsed"][0].split(" (")[0])


def test_a_collapsed_logit_distiller_keeps_its_record_with_nulls_and_its_mark(tmp_path, capsys):
    """KD at lr 1e3 leaves NaN in some analysis metrics: they are stored as null with the reason,
    the run keeps its record, and the report marks it."""
    from desupcon import report
    from desupcon.store.checkpoint import read_json
    out = tmp_path / "out"
    code = main(["train", "--preset", "quick", "--epochs", "4", "--lr", "1e3", "--method", "kd", "--train-subset",
                 "160", "--test-subset", "64", "--batch-size", "32", "--teacher-epochs", "1", "--device", "cpu",
                 "--output-dir", str(out)])
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    records = read_json(next((out / "json_results").glob("comprehensive_results_*.json")))
    (name, record), = ((k, v) for k, v in records.items() if k.startswith("student_kd_"))
    assert record["collapsed"]
    nulls = [k for k, v in record["metrics"]["backbone"].items() if v is None]
    assert not nulls or any(r.startswith("analysis metrics not finite (") for r in record["collapsed"])
    row = next(line for line in report.build_report(out).splitlines() if line.startswith("| KD "))
    assert "seed 0: " in row and "nan" not in row


def test_non_finite_metrics_become_nulls_named_in_the_collapse_reasons():
    from desupcon.analysis.evaluate import finite_or_null
    clean, bad = finite_or_null({"uniformity": -1.5, "backbone": {"uniformity": float("nan"),
                                                                  "alignment_class": float("inf"), "k": 3}})
    assert clean == {"uniformity": -1.5, "backbone": {"uniformity": None, "alignment_class": None, "k": 3}}
    assert bad == ["backbone.uniformity", "backbone.alignment_class"]


def test_nan_teacher_weights_are_refused(tmp_path, capsys):
    import torch
    from desupcon.models import build_encoder
    state = build_encoder("resnet8", 10).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    code = main(["train", "--preset", "quick", "--teacher-arch", "resnet8", "--teacher-weights", str(path),
                 "--train-subset", "64", "--test-subset", "32", "--epochs", "1", "--device", "cpu",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or infinite values" in err and "layer1.0.conv1.weight" in err
    assert not list((tmp_path / "out" / "pth_models").glob("teacher_*.pth"))


def test_teacher_probe_leaves_no_epoch_checkpoint_and_force_reprobes_every_epoch(tmp_path, tiny_config):
    from desupcon.session import Session
    cfg = tiny_config(tmp_path).replace(teacher={"probe_epochs": 3})
    _, metrics = Session(cfg).teacher()
    assert not (tmp_path / "pth_models" / "in_progress").exists()
    from desupcon.store.checkpoint import load_checkpoint
    from desupcon.teacher import teacher_checkpoint_path
    first = load_checkpoint(teacher_checkpoint_path(cfg))["log"]
    Session(cfg, force_teacher=True).teacher()
    again = load_checkpoint(teacher_checkpoint_path(cfg))["log"]
    assert [e["epoch"] for e in again] == [1, 2, 3] and len(again) == len(first)


def test_two_npz_folders_of_one_name_have_their_own_teacher_and_runs(tmp_path):
    from desupcon.config import dataset_tag, preset, run_name, teacher_run_name
    a, b = tmp_path / "one" / "cifar100", tmp_path / "two" / "cifar100"
    cfg = preset("quick").replace(model={"teacher_weights": None})
    cfg_a, cfg_b = (cfg.replace(data={"dataset": f"npz:{p}"}) for p in (a, b))
    assert dataset_tag(f"npz:{a}").startswith("npz-cifar100-")
    assert teacher_run_name(cfg_a) != teacher_run_name(cfg_b) and run_name(cfg_a) != run_name(cfg_b)
    assert dataset_tag(f"npz:{a}") == dataset_tag(f"npz:{a}/")  # the same folder, however written
