"""The graphed step (`--cuda-graphs`, engine/graphs.py), checked on the CPU by its emulation: the
same schedule of eager steps, capture and replays gives the eager step's weights bitwise (memory
banks included, their host work staged before each step), counts steps and reports a bad step like
the eager loop, and refuses a step a graph could not replay."""

import pytest
import torch

from desupcon import data
from desupcon.engine import loop
from desupcon.engine.build import make_student_run
from desupcon.engine.devices import DevicePolicy
from desupcon.engine.finite import NonFiniteLossError
from desupcon.engine.fused import FusedStudents, fusable_groups
from desupcon.engine.graphs import capture_blocker, GraphCaptureError, StepGraph
from desupcon.engine.step import train_step
from desupcon.models import Teacher, build_encoder
from desupcon.session import Session
from desupcon.store.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def setup(tiny_config, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("graph"), train_images=72)
    session = Session(cfg, analyze=False)
    torch.manual_seed(0)
    teacher = Teacher(build_encoder("resnet8", session.dataset.num_classes)).eval()
    return cfg, session.dataset, teacher


def _batches(ds, seed=0, batch=16):  # 72 images: 4 full batches of 16 and a partial one of 8
    return list(data.epoch_batches(ds.train_images, ds.train_labels, batch, data.TwoViewAugment(ds.mean, ds.std),
                                   torch.Generator().manual_seed(seed), drop_last=False))


def _runs(cfg, ds, teacher, methods=("lw-supcrd", "ce"), optimizer="sgd"):
    runs = [make_student_run(cfg.with_method(m).replace(optim={"optimizer": optimizer, "lr": 0.05}), ds, teacher,
                             "cpu") for m in methods]
    for run in runs:
        run.start_epoch()
    return runs


def _state(run):
    return {**{f"model.{k}": v for k, v in run.model.state_dict().items()},
            **{f"head.{k}": v for k, v in run.teacher_head.state_dict().items()}} if run.teacher_head is not None \
        else dict(run.model.state_dict())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_graphed_epoch_equals_the_eager_epoch_bitwise(setup, optimizer):
    cfg, ds, teacher = setup
    batches = _batches(ds)
    assert [b[3].shape[0] for b in batches] == [16, 16, 16, 16, 8]
    eager, graphed = _runs(cfg, ds, teacher, optimizer=optimizer), _runs(cfg, ds, teacher, optimizer=optimizer)
    policy = eager[0].policy
    for batch in batches:
        train_step(eager, batch, teacher, policy)
    step = StepGraph(graphed, teacher, policy, teacher_views=2, warmup=2)
    for batch in batches:
        step(batch)
    # 2 eager warm-up steps, the capture's step and one replay; the partial batch eagerly
    assert (step.eager_steps, step.replays) == (2, 2)
    step.release()
    for a, b in zip(eager, graphed):
        assert b._steps == a._steps == 5 and int(b._step_number) == 5
        for (k, x), (_, y) in zip(_state(a).items(), _state(b).items()):
            assert torch.equal(x, y), f"{a.name} {k}"
        for key in ("_total", "_correct", "_seen"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert a._loss_sums.keys() == b._loss_sums.keys()
        for key in a._loss_sums:
            assert torch.equal(a._loss_sums[key], b._loss_sums[key]), key


def test_graphed_epochs_with_memory_banks_equal_eager_epochs_bitwise(setup):
    """A bank's draws and update staged before each step give the eager step's draws (the same
    generator states), bank and weights; steps drawing fewer slots than the bank's size (epoch 1,
    few slots written) step eagerly."""
    cfg, ds, teacher = setup
    variants = [{"bank_size": 24}, {"bank_size": 24, "bank_mode": "negatives-only"}, {"bank_size": 0}]

    def runs():
        made = [make_student_run(cfg.with_method(m).replace(method=v, optim={"optimizer": "sgd", "lr": 0.05}),
                                 ds, teacher, "cpu") for m in ("lw-supcrd", "crd") for v in variants]
        assert sum(r.bank is not None for r in made) == 4
        return made
    eager, graphed = runs(), runs()
    policy = eager[0].policy
    replays = []
    for epoch in range(2):
        batches = _batches(ds, seed=epoch)
        for run in (*eager, *graphed):
            run.start_epoch()
        for batch in batches:
            train_step(eager, batch, teacher, policy)
        step = StepGraph(graphed, teacher, policy, teacher_views=2, warmup=1)
        for batch in batches:
            step(batch)
        step.release()
        replays.append(step.replays)
    # epoch 1: the class-aware banks draw 0, 16, 32, 48 slots: steps 3 and 4 full, 3 the warm-up;
    # epoch 2: every slot written, the capture at step 2
    assert replays == [1, 3]
    for a, b in zip(eager, graphed):
        for (k, x), (_, y) in zip(_state(a).items(), _state(b).items()):
            assert torch.equal(x, y), f"{a.name} {k}"
        if a.bank is not None:
            assert torch.equal(a.bank.embeddings, b.bank.embeddings) and torch.equal(a.bank.written, b.bank.written)
            assert torch.equal(a.bank_generator.get_state(), b.bank_generator.get_state())
            assert b.bank_step is None  # released with the graph


def test_graphed_fused_students_equal_the_eager_fused_students_bitwise(setup):
    cfg, ds, teacher = setup
    batches = _batches(ds)
    results = []
    for graphed in (False, True):
        runs = _runs(cfg, ds, teacher, methods=("lw-supcrd", "supcon", "crd"))
        [group] = fusable_groups(runs)
        fused = [FusedStudents(group)]
        if graphed:
            step = StepGraph(runs, teacher, runs[0].policy, teacher_views=2, fused=fused, warmup=1)
        for batch in batches:
            step(batch) if graphed else train_step(runs, batch, teacher, runs[0].policy, fused=fused)
        fused[0].release()
        results.append([_state(r) for r in runs])
    assert step.replays == 3
    for eager, graphed in zip(*results):
        for k, v in eager.items():
            assert torch.equal(graphed[k], v), k


def test_a_step_that_changes_python_state_is_refused(setup, monkeypatch):
    """What a replay would silently skip: a Python counter, or state rebound to a new tensor."""
    cfg, ds, teacher = setup
    batches = _batches(ds)
    runs = _runs(cfg, ds, teacher, methods=("lw-supcrd",))
    method = runs[0].method
    method.seen = 0

    def counting_after_step(out):
        method.seen += 1
    monkeypatch.setattr(method, "after_step", counting_after_step)
    step = StepGraph(runs, teacher, runs[0].policy, teacher_views=2, warmup=1)
    step(batches[0])
    with pytest.raises(GraphCaptureError, match="seen"):
        step(batches[1])

    runs = _runs(cfg, ds, teacher, methods=("lw-supcrd",))
    real = runs[0].finish_step

    def rebinding(*args):
        real(*args)
        runs[0]._total = runs[0]._total + 0  # a new tensor: a graph would keep adding to the old one
    monkeypatch.setattr(runs[0], "finish_step", rebinding)
    step = StepGraph(runs, teacher, runs[0].policy, teacher_views=2, warmup=1)
    step(batches[0])
    with pytest.raises(GraphCaptureError, match="_total"):
        step(batches[1])


def test_steps_that_cannot_be_captured_are_named(setup):
    cfg, ds, teacher = setup
    cuda = DevicePolicy(torch.device("cuda"), "bf16")
    ok = _runs(cfg, ds, teacher, methods=("lw-supcrd", "kd", "sdd-lskd"))
    assert capture_blocker(ok, cuda) is None
    assert "CUDA device" in capture_blocker(ok, DevicePolicy(torch.device("cpu")))
    assert "fp16" in capture_blocker(ok, DevicePolicy(torch.device("cuda"), "fp16"))
    bank = make_student_run(cfg.with_method("lw-supcrd").replace(method={"bank_size": 8}), ds, teacher, "cpu")
    assert capture_blocker(ok + [bank], cuda) is None  # its host work is staged before each step
    for method in ("crd-nce", "hybrid"):
        run = make_student_run(cfg.with_method(method), ds, teacher, "cpu")
        assert f"method {method}" in capture_blocker([run], cuda)
    with pytest.raises(ValueError, match="warmup"):
        StepGraph(ok, teacher, ok[0].policy, teacher_views=2, warmup=0)


def _graphs_on_the_cpu(monkeypatch):
    """The loop takes the graphed path on the CPU (emulated)."""
    monkeypatch.setattr(loop, "capture_blocker", lambda runs, policy: None)


def test_graphed_session_equals_the_eager_session(tmp_path, tiny_config, monkeypatch, caplog, made_step_graphs):
    caplog.set_level("INFO", logger="desupcon")
    weights = {}
    for graphed in (False, True):
        if graphed:
            _graphs_on_the_cpu(monkeypatch)
        base = tiny_config(tmp_path / str(graphed), epochs=2, train_images=72).replace(
            cuda_graphs=graphed, optim={"batch_size": 16})
        cfgs = [base.with_method("lw-supcrd"), base.with_method("dkd").replace(method={"warmup": 2}),
                base.with_method("crd").replace(method={"bank_size": 24})]
        results = Session(base, analyze=False).run_many(cfgs)
        weights[graphed] = {r.name: (load_checkpoint(r.checkpoint)["student"], r.log) for r in results}
    students = [s for s in made_step_graphs if s.runs[0].kind == "student"]  # the teacher's training is graphed too
    # one graph per epoch of the group; in epoch 1 the bank draws too few slots until step 3, so
    # its 2 eager warm-up steps are steps 3 and 4; in epoch 2 the capture is step 3, then a replay
    assert [s.replays for s in students] == [0, 2]
    assert "--cuda-graphs: 0 of 4 steps of epoch 1 replayed" in caplog.text
    for name, (solo, log) in weights[False].items():
        other, other_log = weights[True][name]
        for key, value in solo.items():
            assert torch.equal(other[key], value), f"{name} {key}"
        assert [e["loss"] for e in other_log] == [e["loss"] for e in log]
        assert [e["test_acc"] for e in other_log] == [e["test_acc"] for e in log]


def test_a_bad_batch_in_a_replay_is_reported_with_its_step(tmp_path, tiny_config, monkeypatch, nan_batch_at):
    """A NaN batch at step 4 (a replay: 2 warm-up steps, the capture at step 3) is reported at
    step 4 by the graphed loop, as by the eager one: the first bad step comes from the device
    counter (a replay sees the capture's host count, 2, so one read from it would say step 3)."""
    _graphs_on_the_cpu(monkeypatch)
    nan_batch_at(4)
    cfg = tiny_config(tmp_path, epochs=1, train_images=72).replace(cuda_graphs=True, optim={"batch_size": 16})
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 4"):
        Session(cfg.with_method("lw-supcrd"), analyze=False).run_many([cfg.with_method("lw-supcrd")])
