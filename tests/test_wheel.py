"""The package as a user installs it: the built wheel, installed into an empty folder, works from a
directory outside the checkout with nothing of the checkout importable."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.wheel


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _source_modules() -> set[str]:
    """Every module under desupcon/ in the checkout, as dotted names."""
    out = set()
    for path in (ROOT / "desupcon").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sdist and wheel built from the checkout (no network: the build tools come from the test extra)."""
    pytest.importorskip("build", reason="the wheel test needs the test extra (pip install -e .[test])")
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], cwd=ROOT)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0], "dir": dist}


def test_twine_accepts_the_distributions(built):
    pytest.importorskip("twine", reason="needs the test extra")
    _run([sys.executable, "-m", "twine", "check", "--strict", str(built["wheel"]), str(built["sdist"])], cwd=ROOT)


def test_the_wheel_holds_every_module(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = {n for n in wheel.namelist() if n.startswith("desupcon/") and n.endswith(".py")}
    in_wheel = {".".join(Path(n).with_suffix("").parts[:-1] if n.endswith("__init__.py")
                         else Path(n).with_suffix("").parts) for n in names}
    missing = _source_modules() - in_wheel
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"


def test_installed_wheel_runs_outside_the_checkout(built, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target),
          str(built["wheel"])], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The installed folder first; the checkout is on no path (pytest's own pythonpath is not inherited).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(target)
    env["MPLBACKEND"] = "Agg"
    modules = sorted(_source_modules() - {"desupcon.__main__"})  # (that one runs the command line)
    check = (
        "import importlib, pathlib, sys\n"
        f"target = pathlib.Path({str(target)!r}).resolve()\n"
        f"root = pathlib.Path({str(ROOT)!r}).resolve()\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    where = pathlib.Path(module.__file__).resolve()\n"
        "    assert target in where.parents, f'{name} imported from {where}, not the installed wheel'\n"
        "import desupcon\n"
        "assert desupcon.__version__ not in ('', '0+unknown'), desupcon.__version__\n"
        "print('imported', len(" f"{modules!r}" "))\n"
    )
    out = _run([sys.executable, "-c", check], cwd=work, env=env)
    assert f"imported {len(modules)}" in out.stdout
    script = target / "bin" / "desupcon"
    assert script.is_file(), "the wheel installs no `desupcon` command"
    help_text = _run([sys.executable, str(script), "--help"], cwd=work, env=env).stdout
    assert "train" in help_text and "usage" in help_text
    assert _run([sys.executable, "-m", "desupcon", "--help"], cwd=work, env=env).stdout == help_text
    _run([sys.executable, str(script), "train", "--preset", "quick", "--method", "ce", "--epochs", "1",
          "--device", "cpu", "--output-dir", str(work / "out")], cwd=work, env=env)
    checkpoints = list((work / "out" / "pth_models").glob("*.pth"))
    assert checkpoints, "the one-epoch run wrote no checkpoint under pth_models/"

