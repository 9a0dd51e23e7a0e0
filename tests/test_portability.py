"""The package imports and its result files update where the OS has no `fcntl` (Windows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from desupcon.store import checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_records_update_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "fcntl", None)
    path = tmp_path / "json_results" / "records.json"
    with checkpoint.locked(path):
        pass
    checkpoint.update_json_records(path, "a", {"acc": 1.0})
    checkpoint.update_json_records(path, "b", {"acc": 2.0})
    assert json.loads(path.read_text()) == {"a": {"acc": 1.0}, "b": {"acc": 2.0}}


IMPORT_WITHOUT_FCNTL = r"""
import importlib, json, pkgutil, sys, warnings
sys.modules["fcntl"] = None  # what `import fcntl` finds on Windows: ImportError
warnings.simplefilter("ignore")  # third-party libraries may warn that they lock less
import desupcon
for module in pkgutil.walk_packages(desupcon.__path__, "desupcon."):
    if module.name != "desupcon.__main__":  # that one runs the command line
        importlib.import_module(module.name)
from desupcon.store import checkpoint
assert checkpoint.fcntl is None
checkpoint.update_json_records(sys.argv[1], "run", {"acc": 1.0})
print(json.dumps(json.load(open(sys.argv[1]))))
"""


def test_package_imports_without_fcntl(tmp_path):
    target = tmp_path / "records.json"
    done = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_FCNTL, str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"run": {"acc": 1.0}}
