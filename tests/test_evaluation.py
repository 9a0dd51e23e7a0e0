"""Every finished run is analysed and recorded; `analyze` reproduces it elsewhere; `report` lists it."""

import json
import shutil

import matplotlib.image
import pytest

import torch

from desupcon import report
from desupcon.store.checkpoint import load_checkpoint
from desupcon.cli import main
from desupcon.config import HUB_TEACHER, preset, teacher_run_name
from desupcon.store.records import records_path as comprehensive_results_path
from desupcon.session import Session

PICTURES = ("tsne.png", "alignment_uniformity.png", "training_curves.png", "hypersphere.html")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("analysed")
    cfg = tiny_config(root)
    session = Session(cfg)
    session.analyze_teacher()
    results = session.run_many([cfg.replace(method={"method": m}) for m in ("lw-supcrd", "ce")])
    return root, cfg, results


def test_every_run_is_analysed_recorded_and_drawn(analysed):
    root, cfg, results = analysed
    records = json.loads(comprehensive_results_path(
        Session(cfg).paths, cfg.model.student_arch, cfg.data.dataset).read_text())
    assert set(records) == {r.name for r in results} | {teacher_run_name(cfg, with_projection=True)}
    for r in results:
        assert "analysis" not in load_checkpoint(r.checkpoint)  # the record holds it; the checkpoint stays
        metrics = records[r.name]["metrics"]
        assert metrics == r.analysis
        assert -4.0 < metrics["uniformity"] < 0.0 and 0.0 <= metrics["alignment_class"] <= 4.0
        assert metrics["semantic_agreement_pearson"] is not None
        assert records[r.name]["accuracy"]["test_acc"] == r.metrics["test_acc"]
        for suffix in PICTURES:
            path = root / "plots" / f"{r.name}_{suffix}"
            assert path.is_file(), path
            if suffix.endswith(".png"):
                image = matplotlib.image.imread(path)
                assert image.std() > 0.01, f"{path} looks blank"


def _recorded(root, cfg, name) -> dict:
    return json.loads(comprehensive_results_path(Session(cfg.replace(output_dir=str(root))).paths,
                                                 cfg.model.student_arch, cfg.data.dataset).read_text())[name]


def test_analyze_in_an_empty_directory_reproduces_the_recorded_metrics(analysed, tmp_path, capsys):
    root, cfg, results = analysed
    source = results[0].checkpoint
    stored = _recorded(root, cfg, results[0].name)["metrics"]
    # the checkpoint and the teacher's test embeddings copied elsewhere, read-only
    copy = tmp_path / "elsewhere" / "pth_models" / source.name
    shutil.copytree(source.parent / "teacher_embeddings", copy.parent / "teacher_embeddings")
    shutil.copy(source, copy)
    copy.chmod(0o444)
    out_dir = tmp_path / "out"
    assert main(["analyze", str(copy), "--output-dir", str(out_dir), "--device", "cpu"]) == 0
    assert copy.read_bytes() == source.read_bytes()
    again = _recorded(out_dir, cfg, results[0].name)["metrics"]
    assert again["semantic_agreement_pearson"] is not None
    for key, value in stored.items():
        if isinstance(value, float):
            assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert again[key] == value, key
    assert "alignment_class" in capsys.readouterr().out
    assert (out_dir / "plots" / f"{results[0].name}_tsne.png").is_file()


def test_report_lists_every_run_on_disk(analysed, tmp_path):
    root, _, results = analysed
    text, path = report.write_report(root)
    assert path == root / "json_results" / "results.md" and path.read_text() == text
    for r in results:
        assert f"`{r.name}`" in text
    assert "### Main results" in text and "CE student" in text and "LW-SupCRD" in text
    # a checkpoint with no record yet (e.g. copied from another machine) is listed too
    lonely = tmp_path / "lonely"
    (lonely / "pth_models").mkdir(parents=True)
    shutil.copy(results[1].checkpoint, lonely / "pth_models")
    assert f"`{results[1].name}`" in report.build_report(lonely)


def _record(name, cfg, seed, acc, align, unif, teacher_source=HUB_TEACHER):
    return {"run": name, "kind": "student", "method": cfg.method.method, "seed": seed,
            "protocol": cfg.preset, "source": "trained",
            "teacher": {"source": teacher_source, "fingerprint": "0123456789abcdef"},
            "config": cfg.replace(optim={"seed": seed}).to_dict(),
            "accuracy": {"test_acc": acc, "train_acc": acc + 10, "train_test_gap": 10.0,
                         "best_test_acc": acc + 1, "best_epoch": 7},
            "metrics": {"alignment_class": align, "uniformity": unif,
                        "backbone": {"alignment_class": align / 2, "uniformity": unif * 2}}}


def _cells(text, label):
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _write_records(root, records):
    (root / "json_results").mkdir(parents=True, exist_ok=True)
    (root / "json_results" / "comprehensive_results_resnet18_cifar100.json").write_text(json.dumps(records))


def test_report_statistics_and_published_figures(tmp_path):
    paper = preset("paper")
    lw, ce = paper.replace(method={"method": "lw-supcrd"}), paper.replace(method={"method": "ce"})
    records = {f"lw{s}": _record(f"lw{s}", lw, s, acc, 1.0, -3.7) for s, acc in ((0, 73.0), (1, 75.0))}
    records.update({f"ce{s}": _record(f"ce{s}", ce, s, acc, 0.6, -1.7) for s, acc in ((0, 68.0), (1, 69.0))})
    _write_records(tmp_path, records)
    text = report.build_report(tmp_path, tables=["main"])
    cells = _cells(text, "LW-SupCRD")
    assert cells[1] == "2" and cells[2] == "74.00 ± 1.41"
    assert cells[3] == "75.00 ± 1.41"  # best epoch, separately
    assert cells[9] == "0.5000 ± 0.0000" and cells[10] == "-7.4000 ± 0.0000"  # backbone space
    assert cells[11] == "5.50 ± 0.50 (n=2)"  # paired vs the CE student: (5 + 6) / 2, se 0.5
    assert cells[12] == "73.35 / 1.199 / -3.7104"  # SPEC 9, main table
    assert cells[13] == "paper" and cells[14].startswith("published (hub) 01234567")
    assert "67.93 / 0.6631 / -1.7332" in " | ".join(_cells(text, "CE student"))


def test_published_figures_only_beside_the_same_protocol_and_teacher(tmp_path):
    paper, bank = preset("paper"), preset("paper-bank")
    lw = {"method": "lw-supcrd"}
    records = {"a": _record("a", paper.replace(method=lw), 42, 73.0, 1.0, -3.7),
               "b": _record("b", bank.replace(method=lw), 42, 74.0, 1.0, -3.7),
               "c": _record("c", paper.replace(method=lw, optim={"lr": 5e-4}), 42, 70.0, 1.0, -3.7)}
    _write_records(tmp_path, records)
    text = report.build_report(tmp_path)
    paper_part, bank_part = text.split("(paper-bank preset)")
    main_rows = [line for line in paper_part.split("### Main results")[1].split("###")[0].splitlines()
                 if line.startswith("| LW-SupCRD")]
    assert len(main_rows) == 2 and main_rows[0] != main_rows[1]
    by_protocol = {r.split("|")[14].strip(): r for r in main_rows}
    assert "73.35" in by_protocol["paper"] and "73.35" not in by_protocol["custom (paper)"]
    assert "74.76 (train 89.72) / 1.0835 / -3.7314" in bank_part  # the paper-bank arm's own figure
    assert "73.35" not in bank_part
    # a student of another teacher never gets the published figures
    _write_records(tmp_path, {"a": _record("a", paper.replace(method=lw), 42, 73.0, 1.0, -3.7,
                                           teacher_source="trained")})
    assert "73.35" not in report.build_report(tmp_path, tables=["main"])


def test_report_skips_foreign_files_with_one_line(tmp_path, caplog):
    (tmp_path / "pth_models").mkdir()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "pth_models" / "something_else.pth")
    (tmp_path / "pth_models" / "garbage.pth").write_bytes(b"not a checkpoint")
    with caplog.at_level("INFO", logger="desupcon"):
        text = report.build_report(tmp_path)
    assert "No runs found" in text
    skipped = [r.message for r in caplog.records if "skipping" in r.message]
    assert len(skipped) == 2 and all("not a desupcon checkpoint" in m for m in skipped)


def test_runtime_settings_never_split_a_configurations_seeds():
    from desupcon import report
    from desupcon.config import preset
    base = preset("quick")

    def record(cfg, seed):
        cfg = cfg.replace(optim={"seed": seed})
        return {"config": cfg.to_dict(), "kind": "student", "seed": seed, "method": cfg.method.method,
                "teacher": {"fingerprint": "abc"}, "source": "trained"}
    records = {"a_seed0": record(base.replace(save_every=1, precision="fp32"), 0),
               "a_seed1": record(base.replace(save_every=5, tensorboard=True, precision="bf16", device="cuda",
                                              output_dir="/elsewhere"), 1)}
    [one] = report.group_configurations(records)
    assert sorted(one.records) == [0, 1]
    records["b_seed2"] = record(base.replace(optim={"lr": 0.5}), 2)  # a setting that changes the result
    assert len(report.group_configurations(records)) == 2
    records["c_seed0"] = record(base.replace(method={"alpha": 2.0}), 0)  # a method setting too
    assert len(report.group_configurations(records)) == 3
