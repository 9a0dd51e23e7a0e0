"""Starting the command line costs only what it uses: `import desupcon`, `import desupcon.cli` and
`desupcon --help` load neither torchvision's models nor the analysis stack (matplotlib,
scikit-learn, SciPy, plotly); each is imported where it is used."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torchvision", "matplotlib", "sklearn", "scipy", "plotly", "torch._dynamo")


@pytest.mark.parametrize("statement", [
    "import desupcon",
    "import desupcon.cli",
    "import sys; from desupcon.cli import main; sys.argv = ['desupcon', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass",
    "import sys; from desupcon.cli import main; sys.argv = ['desupcon', 'train', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass",
])
def test_start_imports_nothing_heavy(statement):
    probe = statement + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"{statement!r} imported {out.stdout.splitlines()[-1]}"


def test_the_torchvision_architectures_still_build():
    from desupcon.models import build_encoder
    encoder = build_encoder("resnet18", 10)
    assert encoder.feature_dim == 512 and type(encoder).__name__ == "CifarTorchvisionResNet"
