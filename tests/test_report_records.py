"""`report` reads the records as untrusted input: a bad records file or record is skipped with one
line naming the file and what is wrong; the good records around it are still reported."""

import json
import logging

import pytest

from desupcon.cli import main
from desupcon.store.records import build_record

RECORDS = "json_results/comprehensive_results_resnet8_digits.json"


def _record(tiny_config, tmp_path, name: str, acc: float) -> dict:
    cfg = tiny_config(tmp_path).replace(method={"method": "ce"})
    return build_record({"name": name, "config": cfg.to_dict(),
                         "metrics": {"test_acc": acc, "train_acc": acc + 1, "best_test_acc": acc, "best_epoch": 2}})


def _write(tmp_path, content) -> None:
    path = tmp_path / RECORDS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _report(tmp_path, capsys, caplog) -> tuple[str, list[str]]:
    with caplog.at_level(logging.WARNING, logger="desupcon"):
        assert main(["report", "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return (tmp_path / "results.md").read_text() if (tmp_path / "results.md").is_file() else captured.out, \
        [r.getMessage() for r in caplog.records if r.getMessage().startswith("report: skipping")]


def _bad(record: dict, change: str) -> object:
    r = json.loads(json.dumps(record))
    if change == "a string record":
        return "student_x"
    if change == "no config":
        del r["config"]
    elif change == "no kind":
        del r["kind"]
    elif change == "a string accuracy":
        r["accuracy"]["test_acc"] = "high"
    elif change == "an unknown configuration key":
        r["config"]["optim"]["warp_speed"] = 9
    elif change == "a missing section":
        del r["config"]["optim"]
    elif change == "an unknown method":
        r["config"]["method"] = {"method": "telepathy"}
    elif change == "a list seed":
        r["seed"] = [0]
    return r


@pytest.mark.parametrize("change, field", [
    ("a string record", "not an object"), ("no config", "config is None"), ("no kind", "kind is None"),
    ("a string accuracy", "accuracy.test_acc is 'high'"), ("an unknown configuration key", "warp_speed"),
    ("a missing section", "no optim section"), ("an unknown method", "method 'telepathy' is unknown"),
    ("a list seed", "seed is [0]"),
])
def test_a_bad_record_is_skipped_with_a_line_and_the_others_reported(tmp_path, tiny_config, capsys, caplog,
                                                                     change, field):
    good = _record(tiny_config, tmp_path, "student_good_seed0", 61.25)
    _write(tmp_path, {"student_good_seed0": good, "student_bad_seed0": _bad(good, change)})
    text, skipped = _report(tmp_path, capsys, caplog)
    assert len(skipped) == 1 and "student_bad_seed0" in skipped[0] and field in skipped[0], skipped
    assert RECORDS.split("/")[-1] in skipped[0]
    assert "61.25" in text


@pytest.mark.parametrize("content, why", [
    ("[1, 2, 3]", "holds a JSON list"),
    ('{"student_x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests its JSON too deeply"),
    ('{"student_x": {"kind": "student", "seed": 0, "accuracy": {"test_acc": NaN}}}', "config is None"),
])
def test_an_unusable_records_file_is_skipped_with_a_line(tmp_path, capsys, caplog, content, why):
    _write(tmp_path, content)
    _, skipped = _report(tmp_path, capsys, caplog)
    assert len(skipped) == 1 and why in skipped[0], skipped


def test_a_non_finite_accuracy_is_refused(tmp_path, tiny_config, capsys, caplog):
    good = _record(tiny_config, tmp_path, "student_good_seed0", 61.25)
    text = json.dumps({"student_good_seed0": good}).replace("61.25", "NaN", 1)
    _write(tmp_path, text)
    report, skipped = _report(tmp_path, capsys, caplog)
    assert len(skipped) == 1 and "is nan, not a finite number" in skipped[0], skipped
    assert "nan" not in report.lower().replace("nanoGPT", "")
