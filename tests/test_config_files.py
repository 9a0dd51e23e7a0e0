"""Configuration files and part descriptions as a hostile or clumsy user writes them: every value
checked against its declared type before anything is built, bounded messages, one line, exit 2."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from desupcon import data_parts
from desupcon.cli import main
from desupcon.data_parts import DatasetPartsError

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err, captured.err
    assert captured.err.count("\n") == 1, captured.err
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured.err


@pytest.mark.parametrize("text, needle", [
    ("method:\n  method: lw-supcrd\n  alpha: big\n", "method.alpha must be float, got 'big'"),
    ("method:\n  method: lw-supcrd\n  nosuch: 1\n", "unknown method setting 'nosuch'"),
    ("method: 5\n", "method must be an object of method settings"),
    ("method:\n  method: lw-supcrd\n  temperature: [1, 2]\n", "method.temperature must be float"),
    ("method:\n  method: [kd]\n", "method.method must be a method name"),
    ("method:\n  method: sd-kd\n  sdd_scales: [1, two]\n", "method.sdd_scales[1] must be int, got 'two'"),
    ("optim:\n  epochs: 3\n  epochs: 4\n", "the key 'epochs' appears twice"),
])
def test_a_bad_yaml_configuration_is_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    _one_line_error(capsys, main(["train", "--config", str(path), "--print-config"]), needle)


def test_a_json_object_repeating_a_key_is_refused(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text('{"preset": "quick", "preset": "paper"}')
    _one_line_error(capsys, main(["train", "--config", str(path), "--print-config"]), "'preset' appears twice")


def test_a_partial_file_takes_what_it_leaves_out_from_its_preset(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: quick\noptim:\n  epochs: 3\n")
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["train", "--preset", "quick", "--epochs", "3", "--print-config"]) == 0
    assert from_file == json.loads(capsys.readouterr().out)
    # another method than the preset's takes its own defaults, not the preset method's values
    path.write_text("preset: mdistiller\nmethod:\n  method: fitnet\n")
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    method = json.loads(capsys.readouterr().out)["method"]
    assert method == {"method": "fitnet", "ce_weight": 1.0, "feat_weight": 100.0, "hint_layer": 2}


ALIAS_BOMB = """preset: quick
optim:
  milestones: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a],
    &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c],
    &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e],
    &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f], &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g],
    &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]]
"""
MEMORY_LIMIT = 4 << 30  # address space: the interpreter with torch fits; writing 10^9 list items out does not


def _limited(code: str) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                 "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_AS"), reason="no address-space limit on this platform")
def test_a_tiny_yaml_of_nested_aliases_is_refused_within_a_memory_limit(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert path.stat().st_size < 600
    done = _limited(f"from desupcon import cli; raise SystemExit(cli.main(['train', '--config', {str(path)!r}, "
                    "'--print-config']))")
    if "failed to map segment" in done.stderr:
        pytest.skip("this interpreter cannot even import torch under the limit")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "optim.milestones[0] must be int, got [1, 1, 1" in done.stderr and len(done.stderr) < 400


def _part(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    info = {"part": 1, "parts": 2, "digest": "ab" * 32, "train": [0, 1], "test": [0, 1], "train_total": 2,
            "test_total": 2,
            **fields}
    (folder / data_parts.PART_FILE).write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize("fields, needle", [
    ({"parts": 10**12}, "parts is 1000000000000"),
    ({"parts": "3"}, "parts is '3'"),
    ({"part": 0}, "part is 0"),
    ({"part": 3}, "part is 3"),
    ({"train": True}, "train is True"),
    ({"test": [0, 3]}, r"test is \[0, 3\]"),
    ({"digest": 5}, "digest is 5"),
])
def test_a_part_description_is_checked_before_it_is_used(tmp_path, fields, needle):
    folder = _part(tmp_path / "part-1-of-2", **fields)
    with pytest.raises(DatasetPartsError, match=needle):
        data_parts.join_parts([folder])


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_AS"), reason="no address-space limit on this platform")
def test_a_part_claiming_a_trillion_parts_is_refused_within_a_memory_limit(tmp_path):
    folder = _part(tmp_path / "part-1-of-2", parts=10**12)
    done = _limited(f"from desupcon import cli; raise SystemExit(cli.main(['data', 'join', "
                    f"{str(tmp_path / 'joined')!r}, {str(folder)!r}]))")
    if "failed to map segment" in done.stderr:
        pytest.skip("this interpreter cannot even import torch under the limit")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "parts is 1000000000000" in done.stderr and not (tmp_path / "joined").exists()


def test_a_config_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path, capsys):
    import os
    fifo = tmp_path / "cfg.json"
    os.mkfifo(fifo)  # opening it would block until a writer came
    _one_line_error(capsys, main(["train", "--config", str(fifo), "--print-config"]), "is not a regular file")
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")  # reading it would never end
    _one_line_error(capsys, main(["train", "--config", str(zero), "--print-config"]), "is not a regular file")
    _one_line_error(capsys, main(["train", "--config", "/dev/null", "--print-config"]), "is not a regular file")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    _one_line_error(capsys, main(["train", "--config", str(empty), "--print-config"]), "is empty")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_config_is_one_line(tmp_path, capsys, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text(("a: " if suffix == ".yaml" else "") + "[" * 100_000 + "]" * 100_000)
    _one_line_error(capsys, main(["train", "--config", str(path), "--print-config"]), "nests too deeply")


def test_an_oversized_config_and_a_device_not_to_train_on_are_refused(tmp_path, capsys):
    path = tmp_path / "big.json"
    path.write_text('{"preset": "quick", "pad": "' + "x" * (2 << 20) + '"}')
    _one_line_error(capsys, main(["train", "--config", str(path), "--print-config"]), "more than a configuration")
    _one_line_error(capsys, main(["train", "--preset", "quick", "--device", "meta", "--print-config"]),
                    "--device 'meta' is not a device to train on")


def test_an_npz_member_that_is_not_an_array_is_one_line(tmp_path):
    import zipfile
    from desupcon.data import DatasetFormatError, load_npz_dataset
    for split in ("train", "test"):
        with zipfile.ZipFile(tmp_path / f"{split}.npz", "w") as z:
            z.writestr("images.npy", b"not an array at all")
            z.writestr("labels.npy", b"")
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b"]}')
    with pytest.raises(DatasetFormatError, match="member `images` is not a numpy array"):
        load_npz_dataset(tmp_path)


def test_a_long_dataset_folder_name_is_cut_in_run_names_and_stays_distinct():
    from desupcon.config import run_name, preset
    from desupcon.config.naming import MAX_TAG
    names = [run_name(preset("quick").replace(data={"dataset": f"npz:/data/{'n' * 240}{end}"})) for end in "ab"]
    assert all(len(n) < 200 for n in names) and names[0] != names[1]
    short = run_name(preset("quick").replace(data={"dataset": "npz:/data/cifar100"}))
    assert "npz-cifar100-" in short and MAX_TAG >= len("cifar100")


@pytest.mark.parametrize("folder, needle", [("e" * 300, "is 300 bytes, more than"),
                                            ("/".join(["d" * 200] * 20), "path limit")])
def test_an_output_folder_past_the_path_limits_is_one_line(tmp_path, capsys, folder, needle):
    out = tmp_path / folder
    _one_line_error(capsys, main(["train", "--preset", "quick", "--method", "ce", "--epochs", "1", "--device", "cpu",
                                  "--output-dir", str(out)]), needle)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_an_npz_header_claiming_more_than_the_member_holds_is_refused_before_allocating(tmp_path):
    import io
    import zipfile
    import numpy as np
    from desupcon.data import DatasetFormatError, load_npz_dataset
    header = io.BytesIO()  # 30 GB of images claimed, 100 bytes held
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**7, 32, 32, 3)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    for split in ("train", "test"):
        with zipfile.ZipFile(tmp_path / f"{split}.npz", "w") as z:
            z.writestr("images.npy", header.getvalue() + bytes(100))
            z.writestr("labels.npy", labels.getvalue())
    (tmp_path / "classes.json").write_text('{"classes": ["a"]}')
    with pytest.raises(DatasetFormatError, match=r"claims shape \(10000000, 32, 32, 3\) of uint8 \(30720000000 bytes\) "
                                                 r"but holds 228 bytes"):
        load_npz_dataset(tmp_path)


def test_an_image_size_past_the_bound_or_the_memory_is_refused(tmp_path, capsys, monkeypatch):
    from desupcon import data
    _one_line_error(capsys, main(["train", "--preset", "quick", "--image-size", "1000000", "--print-config"]),
                    "--image-size must be in [1, 1024]")
    data.write_npz_dataset(data.load_digits_dataset(16), tmp_path / "digits")
    monkeypatch.setattr(data, "available_memory", lambda: 1 << 20)  # a machine of 1 MiB
    with pytest.raises(data.DatasetFormatError, match="resized would take .* GiB, more than half"):
        data.load_dataset(f"npz:{tmp_path / 'digits'}", image_size=64)


def test_channel_statistics_equal_a_float64_evaluation_without_its_copy():
    import torch
    from desupcon.data import channel_statistics
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = images.to(torch.float64) / 255
    mean, std = channel_statistics(images, chunk=7)
    torch.testing.assert_close(mean.double(), pixels.mean(dim=(0, 2, 3)), rtol=0, atol=1e-7)
    torch.testing.assert_close(std.double(), pixels.std(dim=(0, 2, 3)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("out", ["a_file/sub", "a_file"])
def test_a_data_command_into_an_unwritable_folder_is_one_line(tmp_path, capsys, out):
    from desupcon import data
    data.write_npz_dataset(data.load_digits_dataset(16), tmp_path / "src")
    (tmp_path / "a_file").write_text("x")
    code = main(["data", "split", str(tmp_path / "src"), str(tmp_path / out), "--parts", "2"])
    _one_line_error(capsys, code, str(tmp_path / "a_file"))


def test_a_full_disk_while_writing_a_dataset_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    from desupcon import data
    from desupcon.store.checkpoint import OutputWriteError
    digits = data.load_digits_dataset(16)
    data.write_npz_dataset(digits, tmp_path / "out")

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(data, "atomic_write_bytes", full)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        data.write_npz_dataset(digits, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert data.load_npz_dataset(tmp_path / "out").train_labels.tolist() == digits.train_labels.tolist()
