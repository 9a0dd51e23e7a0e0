"""Fused lockstep (`--fused-lockstep`, engine/fused.py): students of one architecture computed as
one vmapped model give each run the gradients, BatchNorm statistics and weights of its solo step,
and leave every parameter in storage of its own."""

import pytest
import torch

from desupcon import data
from desupcon.engine import fused as fused_mod
from desupcon.engine.build import make_student_run
from desupcon.engine.fused import FusedStudents, fusable_groups
from desupcon.engine.step import train_step
from desupcon.models import Teacher, build_encoder
from desupcon.session import Session
from desupcon.store.checkpoint import load_checkpoint

VARIANTS = [{"method": "lw-supcrd", "alpha": 0.5, "bank_size": 32}, {"method": "lw-supcrd", "alpha": 2.0},
            {"method": "crd"}, {"method": "hybrid", "lam": 0.5}]


@pytest.fixture(scope="module")
def setup(tiny_config, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("fused"))
    session = Session(cfg, analyze=False)
    torch.manual_seed(0)
    teacher = Teacher(build_encoder("resnet8", session.dataset.num_classes)).eval()
    ds = session.dataset
    batch = next(data.epoch_batches(ds.train_images, ds.train_labels, 32, data.TwoViewAugment(ds.mean, ds.std),
                                    torch.Generator().manual_seed(0)))
    return cfg, ds, teacher, batch


def _runs(cfg, ds, teacher, optimizer="adam"):
    runs = [make_student_run(cfg.with_method(v["method"]).replace(
        method={k: x for k, x in v.items() if k != "method"}, optim={"optimizer": optimizer, "lr": 0.05}),
        ds, teacher, "cpu") for v in VARIANTS]
    for run in runs:
        if run.bank is not None:  # a filled bank, so that it takes part
            everyone = torch.arange(len(ds.train_labels))
            run.bank.update(everyone, torch.randn(len(everyone), run.bank.embeddings.shape[1],
                                                  generator=torch.Generator().manual_seed(1)))
        run.start_epoch()
    return runs


def _close(a, b, what, rtol=1e-4, atol=1e-6):
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: largest difference {(a - b).abs().max():.3g}"


def test_fused_step_gives_each_run_its_solo_gradients_statistics_and_weights(setup):
    cfg, ds, teacher, batch = setup
    solo, together = _runs(cfg, ds, teacher, "sgd"), _runs(cfg, ds, teacher, "sgd")
    [group] = fusable_groups(together)
    assert [r.name for r in group] == [r.name for r in together]  # one architecture: all fuse
    fused = FusedStudents(group)
    train_step(together, batch, teacher, fused.runs[0].policy, fused=[fused])
    train_step(solo, batch, teacher, solo[0].policy)
    for a, b in zip(solo, together):
        grads_a = dict((k, p.grad) for k, p in a.model.named_parameters())
        for k, p in b.model.named_parameters():
            _close(p.grad, grads_a[k], f"{a.name} gradient of {k}")
        for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            _close(y.float(), x.float(), f"{a.name} {k} after the step")
        for (k, x), (_, y) in zip(a.teacher_head.state_dict().items(), b.teacher_head.state_dict().items()):
            _close(y, x, f"{a.name} teacher head {k}")
        assert torch.allclose(a._total, b._total, rtol=1e-5)  # the epoch's loss sums too
    # while fused, the parameters are views of the stacked tensors; released, each has its own
    weight = together[1].model.encoder.conv1.weight
    assert weight.untyped_storage().nbytes() == len(together) * weight.numel() * weight.element_size()
    fused.release()
    for run in together:
        for t in (*run.model.parameters(), *run.model.buffers()):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_unfusable_runs_stay_solo(setup):
    cfg, ds, teacher, _ = setup
    runs = _runs(cfg, ds, teacher)
    runs.append(make_student_run(cfg.with_method("ce"), ds, teacher, "cpu"))  # one view: its own signature
    runs.append(make_student_run(cfg.replace(model={"student_arch": "resnet14"}), ds, teacher, "cpu"))
    groups = fusable_groups(runs)
    assert [len(g) for g in groups] == [4]
    compiled = runs[0].cfg.replace(compile=True)
    runs[0].cfg = compiled
    assert [len(g) for g in fusable_groups(runs)] == [3]


def test_fused_lockstep_session_equals_solo_training(tmp_path, tiny_config, monkeypatch):
    made = []
    real = fused_mod.FusedStudents.__init__

    def counting(self, runs):
        made.append(len(runs))
        real(self, runs)
    monkeypatch.setattr(fused_mod.FusedStudents, "__init__", counting)
    weights, sizes = {}, {}
    for fused in (False, True):
        base = tiny_config(tmp_path / str(fused), epochs=2).replace(
            fused_lockstep=fused, optim={"optimizer": "sgd", "lr": 0.02})
        cfgs = [base.with_method("lw-supcrd").replace(method={"alpha": a}) for a in (0.5, 1.0)] + \
            [base.with_method("crd")]
        results = Session(base, analyze=False).run_many(cfgs)
        weights[fused] = {r.name: load_checkpoint(r.checkpoint)["student"] for r in results}
        sizes[fused] = {r.name: r.checkpoint.stat().st_size for r in results}
    assert made == [3, 3]  # one fused group of three, each of the two epochs
    assert weights[True].keys() == weights[False].keys()
    for name, solo in weights[False].items():
        for key, value in solo.items():
            _close(weights[True][name][key].float(), value.float(), f"{name} {key}", rtol=1e-3, atol=1e-3)
    # checkpoints hold each run's own weights only (no stacked storage saved)
    for name, size in sizes[False].items():
        assert abs(sizes[True][name] - size) < 2048, name


class Crash(KeyboardInterrupt):
    pass


def test_a_fused_group_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, tiny_config, monkeypatch,
                                                                             caplog):
    from desupcon.engine.run import Run

    def configs(root):
        base = tiny_config(root, epochs=3).replace(fused_lockstep=True)
        return [base.with_method("lw-supcrd").replace(method={"alpha": a, "bank_size": 32}) for a in (0.5, 2.0)]

    full = Session(configs(tmp_path / "a")[0], analyze=False).run_many(configs(tmp_path / "a"))
    real = Run.losses_of

    def crashing(self, *args, **kwargs):
        if self.epoch + 1 == 2 and self._steps + 1 == 3 and self.cfg.method.alpha == 2.0:
            raise Crash()  # in the middle of the fused step: the first run's losses are computed
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Run, "losses_of", crashing)
        with pytest.raises(Crash):
            Session(configs(tmp_path / "b")[0], analyze=False).run_many(configs(tmp_path / "b"))
    partial = sorted((tmp_path / "b" / "pth_models" / "in_progress").glob("student_*.pth"))
    assert len(partial) == 2 and all(load_checkpoint(p, "in_progress")["epoch"] == 1 for p in partial)
    caplog.clear()
    with caplog.at_level("INFO", logger="desupcon"):
        resumed = Session(configs(tmp_path / "b")[0], analyze=False).run_many(configs(tmp_path / "b"))
    assert sum("resuming after epoch 1" in r.getMessage() for r in caplog.records) == 2
    assert any("fused lockstep: groups of 2 students" in r.getMessage() for r in caplog.records)
    for a, b in zip(full, resumed):
        ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
        for part in ("student", "teacher_head"):
            assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), f"{a.name} {part}"
        assert [e["loss"] for e in ca["log"]] == [e["loss"] for e in cb["log"]]
