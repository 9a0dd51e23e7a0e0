"""Training pipeline: every method trains, checkpoints reload, the cache hits, lockstep = solo."""

import shutil
import json
from pathlib import Path

import pytest
import torch

from desupcon import data
from desupcon.store.paths import OutputPaths
from desupcon.engine.dataset import evaluate_accuracy
from desupcon.engine.loop import _train_lockstep
from desupcon.store.cache import load_student
from desupcon.engine.build import make_student_run
from desupcon.store.checkpoint import CheckpointError, load_checkpoint
from desupcon.cli import build_parser, config_from_args, run_flags
from desupcon.config import RunConfig, method_fields, preset, run_name, teacher_run_name
from desupcon.methods import METHODS, StepOutputs
from desupcon.session import Session

METHOD_VARIANTS = [("ce", 0), ("supcon", 0), ("crd", 0), ("crd", 64), ("lw-supcrd", 0),
                   ("lw-supcrd", 64), ("hybrid", 0), ("hybrid", 64)]


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory, tiny_config) -> Path:
    """A teacher trained once for this module; tests copy it and never write here."""
    root = tmp_path_factory.mktemp("teacher")
    Session(tiny_config(root)).teacher()
    return root


@pytest.fixture
def session(tmp_path, teacher_root, tiny_config) -> Session:
    """Every test its own output folder, holding a copy of the module's teacher, so that no test
    sees another's runs (each runs the same in any order, alone or with the others)."""
    (tmp_path / "pth_models").mkdir()
    for teacher_file in (teacher_root / "pth_models").glob("teacher_*.pth"):
        shutil.copy2(teacher_file, tmp_path / "pth_models" / teacher_file.name)
    return Session(tiny_config(tmp_path))


def _fixed_batch(session, cfg):
    ds = session.dataset
    gen = torch.Generator().manual_seed(0)
    aug = data.TwoViewAugment(ds.mean, ds.std)
    return next(data.epoch_batches(ds.train_images, ds.train_labels, cfg.optim.batch_size, aug, gen))


def _batch_loss(run, labels, view1, views, teacher_out) -> float:
    """The method's total loss on one batch (train-mode BatchNorm, no bank, no update)."""
    with torch.no_grad():
        two_views = run.method.needs.views == 2
        s = run.student(views if two_views else view1, detach_classifier=run.method.needs.online_classifier)
        out = StepOutputs(torch.cat([labels, labels]) if two_views else labels, s.projection, s.logits)
        if run.method.needs.teacher:
            out.teacher_projection = torch.nn.functional.normalize(run.teacher_head(teacher_out.features), dim=1)
            out.teacher_logits = teacher_out.logits
        return float(sum(run.method.losses(out).values()))


@pytest.mark.parametrize("method,bank", METHOD_VARIANTS)
def test_loss_falls_on_a_fixed_batch(session, method, bank):
    cfg = session.cfg.replace(method={"method": method, "bank_size": bank})
    teacher, _ = session.teacher()
    run = make_student_run(cfg, session.dataset, teacher, session.device)
    indices, view1, view2, labels = _fixed_batch(session, cfg)
    views = torch.cat([view1, view2])
    teacher_out = teacher(views)
    if run.bank is not None:  # fill the bank so that it takes part in every step
        everyone = torch.arange(len(session.dataset.train_labels))
        run.bank.update(everyone, torch.randn(len(everyone), run.bank.embeddings.shape[1]))
    run.start_epoch()
    before = _batch_loss(run, labels, view1, views, teacher_out)
    for _ in range(10):
        run.step(indices, view1, views, labels, teacher_out)
    after = _batch_loss(run, labels, view1, views, teacher_out)
    assert after < before, f"{method} (bank {bank}): loss {before:.4f} -> {after:.4f} did not fall"


@pytest.mark.parametrize("method,bank", METHOD_VARIANTS)
def test_every_method_trains_reloads_and_caches(session, method, bank):
    cfg = session.cfg.replace(method={"method": method, "bank_size": bank})
    result = session.run(cfg)
    assert not result.cached
    assert len(result.log) == cfg.optim.epochs
    assert result.checkpoint.name == run_name(cfg) + ".pth"
    log_file = session.paths.training_log(result.name)
    assert log_file.is_file()
    student, ckpt = load_student(result.checkpoint)
    ds = session.dataset
    acc = evaluate_accuracy(lambda x: student(x).logits, ds.test_images, ds.test_labels, ds,
                                  torch.device("cpu"))
    assert acc == pytest.approx(result.metrics["test_acc"], abs=1e-9)
    assert ckpt["config"] == cfg.to_dict()
    mtime = result.checkpoint.stat().st_mtime_ns
    again = session.run(cfg)
    assert again.cached and again.metrics == result.metrics
    assert result.checkpoint.stat().st_mtime_ns == mtime
    assert not session.paths.partial_checkpoint(result.name).exists()


def test_teacher_outputs_are_where_spec_says(teacher_root, tiny_config):
    cfg, paths = tiny_config(teacher_root), OutputPaths(teacher_root)  # where it was trained
    assert paths.checkpoint(teacher_run_name(cfg)).is_file()
    proj = paths.checkpoint(teacher_run_name(cfg, with_projection=True))
    assert proj.name.endswith("_with_projection.pth") and proj.is_file()
    assert load_checkpoint(proj, "teacher_projection")["head"]


def test_teacher_head_trains_and_backbone_does_not(session):
    cfg = session.cfg.replace(method={"method": "lw-supcrd"})
    teacher, _ = session.teacher()
    encoder_before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    run = make_student_run(cfg, session.dataset, teacher, session.device)
    head_before = {k: v.clone() for k, v in run.teacher_head.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    _train_lockstep([run], session.dataset, teacher, gen, OutputPaths(cfg.output_dir + "/scratch"))
    for k, v in teacher.encoder.state_dict().items():  # BN running stats included
        assert torch.equal(v, encoder_before[k]), f"teacher {k} changed"
    changed = [k for k, v in run.teacher_head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert changed == list(head_before), f"head params that did not change: {set(head_before) - set(changed)}"
    assert not any(p.requires_grad for p in teacher.encoder.parameters())


def test_lockstep_equals_training_alone(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path / "solo", epochs=1)
    variants = [{"method": "lw-supcrd", "bank_size": 64}, {"method": "crd"}, {"method": "ce"},
                {"method": "hybrid", "lam": 0.3}]
    solo_session = Session(cfg)
    solo = [solo_session.run(cfg.replace(method=v)) for v in variants]
    lock_cfg = cfg.replace(output_dir=str(tmp_path / "lock"))
    lock = Session(lock_cfg).run_many([lock_cfg.replace(method=v) for v in variants], lockstep=True)
    for a, b in zip(solo, lock):
        sa = load_checkpoint(a.checkpoint)["student"]
        sb = load_checkpoint(b.checkpoint)["student"]
        assert a.name == b.name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{a.name}: {k} differs between lockstep and solo"
        assert a.metrics["test_acc"] == b.metrics["test_acc"]


def _flag_value(flag, current):
    if isinstance(current, bool):
        return not current
    if flag == "--dataset":
        return "npz:/somewhere/else"
    if flag in ("--teacher-arch", "--student-arch"):
        return "resnet20"
    if flag == "--method":
        return "crd"
    if flag == "--teacher-weights":
        return "/weights/other.pth"
    if flag == "--data-root":
        return "/elsewhere"
    if flag in ("--schedule", "--teacher-schedule"):
        return "cosine" if current == "constant" else "constant"
    if flag == "--init":
        return "pytorch"
    if flag == "--hybrid-scaling":
        return "plain"
    if flag == "--bank-mode":
        return "negatives-only"
    if flag in ("--optimizer", "--teacher-optimizer"):
        return "sgd"
    if flag == "--logit-term":
        return "dkd"
    if flag == "--subset-sampling":
        return "random"
    if isinstance(current, list):
        return [*current, 7]
    if current is None:
        return 123
    return type(current)(current * 2 + 1)


def test_every_flag_changes_the_run():
    """Every setting changes the run name; student settings change the identity, teacher settings
    the teacher's identity (they reach a student's identity through the teacher's fingerprint)."""
    base = preset("paper")
    base_name, base_id = run_name(base), base.identity()
    for flag, (section, key, _, _) in run_flags().items():
        if flag == "--data-root":
            continue  # where the files live does not change the run
        ref = base.replace(model={"teacher_weights": None}) if section == "teacher" else base
        if flag == "--subset-sampling":  # the scheme matters only where a subset is drawn
            ref = base.replace(data={"train_subset": 5000})
        current = getattr(getattr(ref, section), key)
        changed = ref.replace(**{section: {key: _flag_value(flag, current)}})
        # Method-specific settings only matter to a method that reads them.
        if section == "method" and key not in ("method",):
            reader = next(m for m in ("hybrid", "sdd-lskd", "sd-kd", "crd-nce", *METHODS) if key in method_fields(m))
            changed = changed.replace(method={"method": reader, "bank_size": changed.method.bank_size})
            base_cmp = ref.replace(method={"method": reader})
        else:
            base_cmp = ref
        assert run_name(changed) != run_name(base_cmp), f"{flag} does not change the run name"
        if section == "teacher" or key in ("teacher_weights", "teacher_arch"):
            assert changed.teacher_identity() != base_cmp.teacher_identity(), f"{flag}: teacher identity"
        else:
            assert changed.identity() != base_cmp.identity(), f"{flag} does not change the identity"
    flipped = base.replace(method={"adaptive_beta": False})
    assert run_name(flipped) != base_name and flipped.identity() != base_id
    assert base.identity("aaaa") != base.identity("bbbb"), "the teacher's content is in the identity"


def test_cli_flags_override_the_preset():
    args = build_parser().parse_args(["train", "--preset", "quick", "--alpha", "5", "--epochs", "3",
                                      "--no-adaptive-beta", "--output-dir", "/tmp/x"])
    cfg = config_from_args(args)
    assert cfg.method.alpha == 5.0 and cfg.optim.epochs == 3 and cfg.method.adaptive_beta is False
    assert cfg.data.dataset == "digits" and cfg.output_dir == "/tmp/x"
    assert cfg.optim.batch_size == preset("quick").optim.batch_size


def test_same_name_other_configuration_is_never_reused(session):
    cfg = session.cfg.replace(method={"method": "supcon"})
    result = session.run(cfg)
    ckpt = load_checkpoint(result.checkpoint)
    ckpt["identity"]["optim"]["lr"] = 0.5  # as if an older run with another lr had this name
    torch.save(ckpt, result.checkpoint)
    with pytest.raises(CheckpointError, match="another configuration"):
        session.run(cfg)
    forced = session.run(cfg, force=True)
    assert not forced.cached


def test_config_round_trips_as_plain_data():
    cfg = preset("quick").replace(method={"alpha": 2.0})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()  # plain data only
    assert cfg.to_dict()["method"]["alpha"] == 2.0
    assert RunConfig.from_dict(cfg.to_dict()) != preset("quick")
