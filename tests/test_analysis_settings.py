"""Analysis settings out of range fail at once, in one line with exit status 2, before any model is
loaded or anything written: probe --k/--epochs/--lr/--batch-size, compare --mi-k/--mi-dims/--cka-sigma
and an unwritable --json."""

import pytest

from desupcon.cli import main


@pytest.mark.parametrize("argv, flag", [
    (["probe", "missing.pth", "--kind", "knn", "--k", "0"], "--k 0"),
    (["probe", "missing.pth", "--kind", "linear", "--epochs", "0"], "--epochs 0"),
    (["probe", "missing.pth", "--kind", "linear", "--lr", "nan"], "--lr nan"),
    (["probe", "missing.pth", "--kind", "linear", "--batch-size", "-3"], "--batch-size -3"),
    (["compare", "a.pth", "b.pth", "--mi-k", "0"], "--mi-k 0"),
    (["compare", "a.pth", "b.pth", "--mi-dims", "0"], "--mi-dims 0"),
    (["compare", "a.pth", "b.pth", "--cka-sigma", "nan"], "--cka-sigma nan"),
    (["compare", "a.pth", "b.pth", "--cka-sigma", "-1"], "--cka-sigma -1.0"),
])
def test_out_of_range_analysis_settings_are_one_line_errors(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and flag in err, err
    assert "out of range" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_unwritable_json_path_fails_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["compare", "a.pth", "b.pth", "--json", str(blocker / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a_file" in err, err
