"""The engine against the reference loop (`benchmarks/reference_loop.py`, the documented protocol
written plainly): from the same weights and the same batches, the same losses and the same weights
after two epochs (the schedules' step between them included), for every method that trains a
student of the published comparison. A change to what the engine computes (the teacher head's
learning rate, the classifier's inputs, the views the teacher sees, a group's weight decay or
schedule, the bank's draws) makes this fail."""

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from desupcon import data
from desupcon.config import preset
from desupcon.engine.build import make_student_run
from desupcon.engine.devices import DevicePolicy
from desupcon.engine.step import train_step
from desupcon.models import Teacher, build_encoder
from desupcon.session import Session
from desupcon.teacher import _finish

ROOT = Path(__file__).resolve().parents[1]


def _reference():
    spec = importlib.util.spec_from_file_location("reference_loop", ROOT / "benchmarks" / "reference_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _reference()

CASES = {  # name: (method, method settings)
    "ce": ("ce", {}),
    "supcon": ("supcon", {}),
    "crd": ("crd", {}),
    "lw-supcrd": ("lw-supcrd", {}),
    "lw-supcrd+bank": ("lw-supcrd", {"bank_size": 24}),
    "crd+bank": ("crd", {"bank_size": 24}),
    "hybrid": ("hybrid", {"lam": 0.3}),
}


@pytest.fixture(scope="module")
def setup(tiny_config, tmp_path_factory):
    # `paper-bank`'s optimiser (Adam 1e-3, weight decay 1e-4, cosine; classifier 1e-3 and head 1e-4
    # constant) on 72 digits, 2 epochs of 16-image batches (the last partial batch dropped)
    bank = preset("paper-bank").optim
    cfg = tiny_config(tmp_path_factory.mktemp("reference"), train_images=72).replace(
        optim={"optimizer": "adam", "lr": bank.lr, "weight_decay": bank.weight_decay, "schedule": bank.schedule,
               "classifier_lr": bank.classifier_lr, "head_lr": bank.head_lr, "epochs": 2, "batch_size": 16,
               "drop_last": True})
    ds = Session(cfg, analyze=False).dataset
    torch.manual_seed(3)
    teacher = Teacher(build_encoder("resnet8", ds.num_classes))
    # a teacher whose BatchNorm statistics are not the identity, as a trained one's are
    for module in teacher.encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    # unfolded, so that the engine's teacher computes exactly what the reference's does (the folded
    # copy a run uses by default agrees to rounding: tests/test_folding.py)
    teacher, _ = _finish(teacher, {}, dataclasses.replace(DevicePolicy.choose("cpu"), fold_teacher_batchnorm=False))
    return cfg, ds, teacher


def _epoch(ds, epoch: int):
    g = torch.Generator().manual_seed(100 + epoch)
    # (contiguous, as the engine hands them to the model: the augmentation's output is laid out
    # channels-last, for which the CPU convolutions round differently)
    return [(i, v1.contiguous(), v2.contiguous(), y) for i, v1, v2, y in data.epoch_batches(
        ds.train_images, ds.train_labels, 16, data.TwoViewAugment(ds.mean, ds.std), g, drop_last=True)]


def _train_both(cfg, ds, teacher, method, settings):
    run = make_student_run(cfg.with_method(method).replace(method=settings), ds, teacher, "cpu")
    ref = reference.ReferenceStudent(
        method, cfg.model.student_arch, ds.num_classes, cfg.optim.seed, teacher.encoder, teacher.head,
        epochs=cfg.optim.epochs, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        schedule=cfg.optim.schedule, classifier_lr=cfg.optim.classifier_lr, head_lr=cfg.optim.head_lr,
        lam=settings.get("lam", 0.5), bank=settings.get("bank_size", 0), bank_labels=ds.train_labels)
    ref.model.load_state_dict(run.model.state_dict())
    start = {"model": copy.deepcopy(run.model.state_dict()),
             "head": copy.deepcopy(teacher.head.state_dict())}
    ref_losses, engine_losses = [], []
    for epoch in range(cfg.optim.epochs):
        ref.set_epoch_lr()
        run.start_epoch()
        sums: dict[str, float] = {}
        seen = 0
        for batch in _epoch(ds, epoch):
            train_step([run], batch, teacher, run.policy)
            for key, value in ref.step(*batch).items():
                sums[key] = sums.get(key, 0.0) + value * batch[3].shape[0]
            seen += batch[3].shape[0]
        ref_losses.append({k: v / seen for k, v in sums.items()})
        engine_losses.append(run.finish_epoch(ds)["losses"])
        ref.epoch += 1
        ref.set_epoch_lr()
    return run, ref, engine_losses, ref_losses, start


def _change_difference(engine: dict, ref: dict, start: dict) -> tuple[float, str]:
    """The largest relative difference, over the tensors of a state dict, between what training
    changed in the engine and in the reference: ||d_engine - d_ref|| / ||d_ref||. (Adam turns a
    rounding-level difference of a near-zero gradient element into a step of up to its learning
    rate, so elementwise tolerances do not hold; a changed protocol moves whole tensors.)"""
    worst = (0.0, "")
    for key, value in ref.items():
        if not value.is_floating_point():
            assert torch.equal(engine[key], value), key
            continue
        d_ref = (value - start[key]).double()
        d_engine = (engine[key] - start[key]).double()
        worst = max(worst, ((d_engine - d_ref).norm().item() / max(d_ref.norm().item(), 1e-12), key))
    return worst


TOLERANCE = 1e-6  # of the relative change difference (measured: 0, the two agree bit for bit here)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_the_reference_loop(setup, case):
    cfg, ds, teacher = setup
    method, settings = CASES[case]
    run, ref, engine_losses, ref_losses, start = _train_both(cfg, ds, teacher, method, settings)
    for epoch, (e, r) in enumerate(zip(engine_losses, ref_losses), start=1):
        assert e.keys() == r.keys(), f"epoch {epoch}: the engine's losses {sorted(e)}, the reference's {sorted(r)}"
        for key in e:
            assert e[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), f"epoch {epoch} loss {key}"
    diff, where = _change_difference(run.model.state_dict(), ref.model.state_dict(), start["model"])
    assert diff < TOLERANCE, f"the student's training differs from the reference's by {diff:.2e} at {where}"
    if ref.head is not None:
        diff, where = _change_difference(run.teacher_head.state_dict(), ref.head.state_dict(), start["head"])
        assert diff < TOLERANCE, f"the teacher head copy's training differs by {diff:.2e} at {where}"
    else:
        assert run.teacher_head is None
    if ref.bank is not None:
        assert torch.equal(run.bank.written, ref.bank.written)
        assert torch.allclose(run.bank.embeddings, ref.bank.slots, atol=1e-3)
    lrs = [g["lr"] for g in run.optimizer.param_groups]
    assert lrs == pytest.approx([g["lr"] for g in ref.opt.param_groups])


@pytest.mark.parametrize("change", ["head learning rate x 3", "classifier not detached"])
def test_a_changed_protocol_is_caught(setup, change, monkeypatch):
    """The comparison sees a protocol change of the kinds that matter (here made in the engine)."""
    cfg, ds, teacher = setup
    if change.startswith("head"):
        cfg = cfg.replace(optim={"head_lr": cfg.optim.head_lr * 3})
    else:
        from dataclasses import replace

        from desupcon.methods.crd import CRDMethod
        monkeypatch.setattr(CRDMethod, "needs", replace(CRDMethod.needs, online_classifier=False))
    run, ref, _, _, start = _train_both(cfg, ds, teacher, "crd", {})
    default = _train_both(setup[0], ds, teacher, "crd", {})[1]
    model = _change_difference(run.model.state_dict(), default.model.state_dict(), start["model"])[0]
    head = _change_difference(run.teacher_head.state_dict(), default.head.state_dict(), start["head"])[0]
    assert max(model, head) > 10 * TOLERANCE


@pytest.fixture
def recorded_batches(monkeypatch):
    """The batches the training loop draws from now on, per epoch, as the model receives them."""
    epochs: list[list] = []
    real = data.epoch_batches

    def recording(*args, **kwargs):
        epochs.append([])
        for i, v1, v2, y in real(*args, **kwargs):
            epochs[-1].append((i, v1.contiguous(), None if v2 is None else v2.contiguous(), y))
            yield i, v1, v2, y
    monkeypatch.setattr(data, "epoch_batches", recording)
    return epochs


def test_teacher_training_and_probe_equal_the_reference(setup, recorded_batches, tmp_path):
    """The teacher's cross-entropy training and its head's cosine probe, fed the batches the engine
    drew, give the reference's weights bit for bit."""
    from desupcon.store.paths import OutputPaths
    from desupcon.teacher import train_projection_probe, train_teacher_encoder
    cfg, ds, _ = setup
    cfg = cfg.replace(teacher={"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4,
                               "schedule": "cosine", "seed": 5, "probe_epochs": 2},
                      output_dir=str(tmp_path))
    policy = dataclasses.replace(DevicePolicy.choose("cpu"), fold_teacher_batchnorm=False)
    paths = OutputPaths(cfg.output_dir)
    encoder, _ = train_teacher_encoder(cfg, ds, policy, paths)
    ref_encoder = reference.train_teacher({}, cfg.model.teacher_arch, 2, cfg.teacher.seed, ds.num_classes,
                                          batches=lambda epoch: recorded_batches[epoch])
    diff, where = _change_difference(encoder.state_dict(), ref_encoder.state_dict(),
                                     {k: torch.zeros_like(v) for k, v in encoder.state_dict().items()})
    assert diff < TOLERANCE, f"the teacher's training differs by {diff:.2e} at {where}"
    recorded_batches.clear()
    torch.manual_seed(cfg.teacher.seed)
    teacher = Teacher(encoder)
    head = copy.deepcopy(teacher.head)
    train_projection_probe(teacher, cfg, ds, policy, paths)
    reference.probe_head(ref_encoder, head, {}, 2, cfg.teacher.seed, ds.num_classes,
                         batches=lambda epoch: recorded_batches[epoch])
    diff, where = _change_difference(teacher.head.state_dict(), head.state_dict(),
                                     {k: torch.zeros_like(v) for k, v in head.state_dict().items()})
    assert diff < TOLERANCE, f"the probed heads differ by {diff:.2e} at {where}"


def test_augmentation_equals_the_reference(setup):
    """The engine's batched augmentation computes, image by image, what the reference's does with the
    same crop offsets, flips and colour factors."""
    _, ds, _ = setup
    images = ds.train_images[:12]
    augment = data.TwoViewAugment(ds.mean, ds.std, padding=2)
    params = augment.sample_params(12, torch.Generator().manual_seed(1))
    engine = augment.apply(images, params)
    for i in range(12):
        top, left = params.offsets[i].tolist()
        one = reference.augment_one(images[i].float() / 255, top, left, bool(params.flip[i]),
                                    tuple(params.jitter[i].tolist()), padding=2)
        expected = (one - ds.mean.view(3, 1, 1)) / ds.std.view(3, 1, 1)
        assert torch.allclose(engine[i], expected, atol=1e-5), f"image {i}"
    assert params.flip.any() and not params.flip.all()
