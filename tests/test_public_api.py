"""The public API: `import desupcon` is light, and every name it lists is there and works."""

import subprocess
import sys
from pathlib import Path

import pytest

import desupcon

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_package_loads_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, desupcon; print('torch' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("name", [n for n in desupcon.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    assert getattr(desupcon, name) is not None and name in dir(desupcon)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        desupcon.nothing_here


def test_a_run_through_the_public_api(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, epochs=1).replace(method={"method": "ce"})
    assert isinstance(cfg, desupcon.RunConfig)
    result = desupcon.Session(cfg, analyze=False).run(cfg)
    student, ckpt = desupcon.load_student(result.checkpoint)
    assert isinstance(student, desupcon.Student) and ckpt["name"] == result.name == desupcon.run_name(cfg)
    assert result.name in desupcon.build_report(tmp_path)


@pytest.mark.parametrize("module", ["desupcon.methods", "desupcon.methods.fitnet", "desupcon.data",
                                    "desupcon.store.records"])
def test_any_module_can_be_imported_first(module):
    """The methods and the configuration need each other's declarations: whichever is imported
    first, every method ends up registered, in the same order."""
    code = (f"import {module}; from desupcon.methods import METHODS; "
            "from desupcon.config import preset; print(','.join(METHODS)); print(preset('quick').method.method)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names, method = done.stdout.split()
    assert names.startswith("ce,supcon,crd,lw-supcrd,hybrid,kd,") and "fitnet" in names and method == "lw-supcrd"
