"""scripts/cpu_comparison.py's bookkeeping: seeds from separate calls merge into one table whose
means and paired differences are those of the per-seed figures."""

import importlib.util
import json
import statistics
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpu_comparison.py"


def _script():
    spec = importlib.util.spec_from_file_location("cpu_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved(path: Path, seed: int, kd: float, crd: float, two_stage: float) -> Path:
    own, knn = "own classifier (last epoch)", "k-NN (k=20)"
    rows = {"KD": {own: {str(seed): kd}, knn: {str(seed): kd - 1}},
            "CRD": {own: {str(seed): crd}, knn: {str(seed): crd + 5}},
            "two-stage CRD": {own: {str(seed): two_stage}, knn: {str(seed): crd + 5}}}
    path.write_text(json.dumps({"settings": {"group": "two-stage"}, "rows": rows}))
    return path


def test_merged_seeds_give_the_mean_and_the_paired_differences(tmp_path, capsys):
    cmp = _script()
    files = [_saved(tmp_path / "a.json", 0, kd=70.0, crd=61.0, two_stage=63.0),
             _saved(tmp_path / "b.json", 1, kd=69.0, crd=62.0, two_stage=63.5)]
    group, rows, columns = cmp.merge(files)
    assert group == "two-stage" and columns == ["own classifier (last epoch)", "k-NN (k=20)"]
    assert rows["CRD"]["own classifier (last epoch)"] == {0: 61.0, 1: 62.0}
    refs = cmp.references(group, rows)
    assert refs["two-stage CRD"] == ["KD", "CRD"] and refs["CRD"] == ["KD"]
    cmp.print_table(rows, columns, refs)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| two-stage CRD"))
    sd = statistics.stdev([63.0, 63.5])
    d_kd = [63.0 - 70.0, 63.5 - 69.0]
    se_kd = statistics.stdev(d_kd) / 2 ** 0.5
    assert f"63.25 ± {sd:.2f}" in line
    assert f"{statistics.fmean(d_kd):+.2f} ± {se_kd:.2f} vs KD" in line
    assert "+1.75 ± 0.25 vs CRD" in line  # differences 2.0 and 1.5


def test_published_references_pair_bank_arms_with_their_no_bank_arm():
    cmp = _script()
    labels = ["teacher resnet20", "CE student", "LW-SupCRD", "LW-SupCRD (paper-bank)",
              "LW-SupCRD + bank (paper-bank)"]
    refs = cmp.references("published", {label: {} for label in labels})
    assert "teacher resnet20" not in refs  # one model: no paired difference
    assert refs["CE student"] == [] and refs["LW-SupCRD"] == ["CE student"]
    assert refs["LW-SupCRD + bank (paper-bank)"] == ["CE student", "LW-SupCRD (paper-bank)"]
