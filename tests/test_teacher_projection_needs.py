"""A run pays for the teacher's projection head only when its method reads it: a KD run in an empty
folder probes no head and forwards the teacher once per training step; a later LW-SupCRD run probes
it once, and the KD run keeps its identity (loaded, not retrained)."""

import pytest
import torch

from desupcon import teacher as teacher_mod
from desupcon.config import run_name
from desupcon.models import Teacher
from desupcon.session import Session
from desupcon.store.checkpoint import load_checkpoint
from desupcon.store.paths import OutputPaths
from desupcon.store.records import read_record


@pytest.fixture
def counted(monkeypatch):
    counts = {"probes": 0, "teacher_forwards": 0}
    real_probe, real_forward = teacher_mod.train_projection_probe, Teacher.forward

    def probe(*args, **kwargs):
        counts["probes"] += 1
        return real_probe(*args, **kwargs)

    def forward(self, *args, **kwargs):
        counts["teacher_forwards"] += 1
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(teacher_mod, "train_projection_probe", probe)
    monkeypatch.setattr(Teacher, "forward", forward)
    return counts


def test_kd_probes_no_head_and_lw_supcrd_probes_it_once(tiny_config, tmp_path, counted, trained_students):
    cfg = tiny_config(tmp_path, train_images=96, epochs=2)  # 3 batches of 32 a epoch
    kd = cfg.with_method("kd")
    session = Session(kd, analyze=True, pictures=False)
    result = session.run(kd)
    assert counted["probes"] == 0
    assert counted["teacher_forwards"] == 2 * 3  # one per training step: no probe, no embedding pass
    models = OutputPaths(cfg.output_dir).models
    assert not list(models.glob("*with_projection*")), "a KD run wrote a probed teacher"
    assert load_checkpoint(result.checkpoint, "student")["metrics"]["teacher_projection_used"] is False
    record = read_record(kd, run_name(kd), cfg.output_dir)
    assert record["teacher_projection_used"] is False
    assert "semantic_agreement" not in str(sorted(record["metrics"]))  # (an unprobed head is never read)

    lw = cfg.with_method("lw-supcrd")
    lw_result = session.run(lw)
    assert counted["probes"] == 1
    assert list(models.glob("*with_projection*"))
    assert load_checkpoint(lw_result.checkpoint, "student")["metrics"]["teacher_projection_used"] is True
    assert "semantic_agreement_pearson" in read_record(lw, run_name(lw), cfg.output_dir)["metrics"]

    # the KD run's identity does not depend on whether the head was probed since
    trained_students.clear()
    again = Session(kd, analyze=False).run(kd)
    assert trained_students == [] and again.cached
    assert counted["probes"] == 1


def test_a_method_reading_the_projection_refuses_an_unprobed_head(tiny_config, tmp_path):
    from desupcon.engine.build import make_student_run
    from desupcon.models import build_encoder
    cfg = tiny_config(tmp_path, train_images=64)
    session = Session(cfg, analyze=False)
    teacher = Teacher(build_encoder("resnet8", session.dataset.num_classes))
    teacher.head_probed = False
    with pytest.raises(ValueError, match="never probe-trained"):
        make_student_run(cfg.with_method("crd"), session.dataset, teacher, "cpu")
    torch.manual_seed(0)
    assert make_student_run(cfg.with_method("kd"), session.dataset, teacher, "cpu").teacher_head is None


def test_the_teachers_test_embeddings_are_computed_once_per_sweep(tiny_config, tmp_path, monkeypatch):
    from desupcon.analysis import evaluate
    calls = []
    real = evaluate.teacher_embeddings
    monkeypatch.setattr(evaluate, "teacher_embeddings", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(tmp_path, train_images=64, epochs=1)
    session = Session(cfg, analyze=True, pictures=False)
    results = session.run_many([cfg.with_method(m) for m in ("lw-supcrd", "crd", "supcon")])
    assert len(calls) == 1
    for result in results:  # every student got the semantic agreement from the one computation
        assert "semantic_agreement_pearson" in result.analysis
    Session(cfg, analyze=True, pictures=False).analyze(results[0], force=True)  # a later analysis too
    assert len(calls) == 1
