"""`teachers fetch`: mdistiller's released CIFAR-100 teachers checked and unpacked where
`--teacher-weights released` finds them; tested on local archives built here."""

import io
import tarfile

import pytest
import torch

from desupcon import cli
from desupcon.store import weights as teacher_weights
from desupcon.models import build_encoder
from desupcon.store.released import ReleaseArchiveError, fetch_released_teachers, sha256_of


def _checkpoint_bytes(arch, classes=100, seed=0):
    torch.manual_seed(seed)
    encoder = build_encoder(arch, classes)
    state = {("linear" + k[2:] if arch.startswith("Shuffle") and k.startswith("fc.") else k): v
             for k, v in encoder.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"model": state, "epoch": 240, "best_acc": torch.tensor(72.3)}, buffer)
    return encoder.eval(), buffer.getvalue()


def _archive(path, members):
    """A tar at `path` from {member name: bytes, or None for a folder, or ("link", target)}."""
    with tarfile.open(path, "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture(scope="module")
def resnet56_release():
    return _checkpoint_bytes("resnet56")


def test_fetch_unpacks_checks_and_released_resolves(tmp_path, resnet56_release):
    encoder, blob = resnet56_release
    archive = _archive(tmp_path / "cifar_teachers.tar", {
        "cifar_teachers": None, "cifar_teachers/resnet56_vanilla": None,
        "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": blob})
    out = fetch_released_teachers(tmp_path / "dl", archive=archive, sha256=sha256_of(archive))
    assert list(out["teachers"]) == ["resnet56"]
    assert "wrn_40_2" in out["missing"] and "ResNet50" in out["missing"]
    path = teacher_weights.resolve_source(f"released:{tmp_path / 'dl' / 'cifar_teachers'}", "resnet56")
    assert path == tmp_path / "dl" / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    loaded = build_encoder("resnet56", 100)
    teacher_weights.load_encoder_weights(loaded, teacher_weights.read_state_dict(path), str(path), 100,
                                         "cifar100", "resnet56")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), encoder(x), rtol=0, atol=0)
    assert not [p for p in (tmp_path / "dl").iterdir() if p.name.startswith(".cifar_teachers.")]
    with pytest.raises(ReleaseArchiveError, match="exists already; pass --overwrite"):
        fetch_released_teachers(tmp_path / "dl", archive=archive)
    fetch_released_teachers(tmp_path / "dl", archive=archive, overwrite=True)


def test_released_without_the_file_names_the_command(tmp_path):
    with pytest.raises(teacher_weights.TeacherWeightsUnavailableError, match="teachers fetch"):
        teacher_weights.resolve_source(f"released:{tmp_path}", "wrn_40_2")
    with pytest.raises(teacher_weights.TeacherWeightsUnavailableError, match="releases no vgg8 teacher"):
        teacher_weights.resolve_source("released", "vgg8")


@pytest.mark.parametrize("members, problem", [
    ({"cifar_teachers/../../evil.txt": b"x"}, "outside cifar_teachers/"),
    ({"/tmp/evil.txt": b"x"}, "outside cifar_teachers/"),
    ({"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": ("link", "/etc/passwd")}, "link or device"),
    ({"other/readme.txt": b"x"}, "outside cifar_teachers/"),
])
def test_hostile_members_are_refused_before_anything_is_written(tmp_path, members, problem):
    archive = _archive(tmp_path / "bad.tar", members)
    dest = tmp_path / "dl"
    with pytest.raises(ReleaseArchiveError, match=problem):
        fetch_released_teachers(dest, archive=archive)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "cifar_teachers").exists()
    assert list(dest.iterdir()) == []


def test_a_teacher_of_another_architecture_is_refused(tmp_path):
    _, blob = _checkpoint_bytes("resnet20")
    archive = _archive(tmp_path / "t.tar", {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": blob})
    with pytest.raises(ReleaseArchiveError, match="holds a resnet20 state dict .*expected a 100-class resnet56"):
        fetch_released_teachers(tmp_path / "dl", archive=archive)
    assert not (tmp_path / "dl" / "cifar_teachers").exists()


def test_checksum_mismatch_and_non_archives(tmp_path, resnet56_release):
    archive = _archive(tmp_path / "t.tar", {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth":
                                            resnet56_release[1]})
    with pytest.raises(ReleaseArchiveError, match="SHA-256 .* differs"):
        fetch_released_teachers(tmp_path / "dl", archive=archive, sha256="0" * 64)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive at all" * 40)
    with pytest.raises(ReleaseArchiveError, match="not a readable tar archive"):
        fetch_released_teachers(tmp_path / "dl", archive=junk)


def test_offline_fetch_is_one_line_naming_where_to_put_the_file(tmp_path, capsys):
    code = cli.main(["teachers", "fetch", "--dest", str(tmp_path / "dl"),
                     "--url", "http://127.0.0.1:9/cifar_teachers.tar"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "cannot download http://127.0.0.1:9/cifar_teachers.tar" in err
    assert f"--archive {tmp_path / 'dl' / 'cifar_teachers.tar'}" in err
    assert not (tmp_path / "dl" / "cifar_teachers.tar.partial").exists()


def test_a_compressed_bomb_and_oversized_members_are_refused_before_unpacking(tmp_path, monkeypatch):
    import gzip
    from desupcon.store import released
    bomb = tmp_path / "bomb.tar"  # a gzip stream (100 MB of zeros, 100 kB on disk) named like the release
    with gzip.open(bomb, "wb") as f:
        for _ in range(100):
            f.write(bytes(1 << 20))
    with pytest.raises(ReleaseArchiveError, match="not a readable tar archive"):
        fetch_released_teachers(tmp_path / "dl", archive=bomb)
    monkeypatch.setattr(released, "MAX_UNPACKED_BYTES", 1000)
    big = _archive(tmp_path / "big.tar", {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": bytes(2000)})
    with pytest.raises(ReleaseArchiveError, match="would unpack to 2000 bytes"):
        fetch_released_teachers(tmp_path / "dl", archive=big)
    assert list((tmp_path / "dl").iterdir()) == []


def test_an_unwritable_dest_is_one_line(tmp_path, resnet56_release, capsys):
    archive = _archive(tmp_path / "t.tar", {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth":
                                            resnet56_release[1]})
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main(["teachers", "fetch", "--dest", str(a_file), "--archive", str(archive)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["teachers", "fetch", "--dest", str(a_file / "below"), "--archive", str(archive)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the teachers under --dest" in err and err.count("\n") == 1
    import os
    if os.geteuid() != 0:  # (root writes anywhere)
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        assert cli.main(["teachers", "fetch", "--dest", str(read_only), "--archive", str(archive)]) == 2
        assert "cannot write the teachers under --dest" in capsys.readouterr().err


def test_a_full_disk_while_unpacking_is_one_line(tmp_path, resnet56_release, monkeypatch):
    import errno
    archive = _archive(tmp_path / "t.tar", {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth":
                                            resnet56_release[1]})

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(ReleaseArchiveError, match="No space left on device"):
        fetch_released_teachers(tmp_path / "dl", archive=archive)
    assert not (tmp_path / "dl" / "cifar_teachers").exists()
