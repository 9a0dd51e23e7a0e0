"""The published work as it was run (issue: fidelity): protocols, the published teacher from the hub
or a file, the published checkpoints, run identity by teacher content, forcing, the running-scale
hybrid and the README's bank reading."""

import argparse
import pickle

import numpy as np
import pytest
import torch

from desupcon import data, losses, memory_bank, methods
from desupcon import plan as experiments
from desupcon.engine.run import Run
from desupcon.engine.build import make_student_run
from desupcon.store import weights as tw
from desupcon.store.checkpoint import load_checkpoint
from desupcon.cli import main
from desupcon.config import HUB_TEACHER, MethodConfig, preset, run_name, teacher_run_name
from desupcon.models import Student, Teacher, build_encoder
from desupcon.session import Session
from desupcon.store.published import published_config


# -- protocols ----------------------------------------------------------------------------------

def _student_run(cfg, num_classes=10, n_train=70):
    dataset = data.ImageDataset("toy", torch.zeros(n_train, 3, 8, 8, dtype=torch.uint8),
                                torch.arange(n_train) % num_classes, torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                                torch.arange(4) % num_classes, [str(i) for i in range(num_classes)])
    teacher = Teacher(build_encoder("resnet8", num_classes))
    return make_student_run(cfg.replace(model={"student_arch": "resnet8"}), dataset, teacher,
                                  torch.device("cpu"))


@pytest.mark.parametrize("name, wd, schedule, drop_last", [("paper", 0.0, "constant", False),
                                                           ("paper-bank", 1e-4, "cosine", True)])
def test_protocol_optimiser_schedule_and_batches(name, wd, schedule, drop_last):
    cfg = preset(name).replace(optim={"epochs": 4})
    o = cfg.optim
    assert (o.weight_decay, o.schedule, o.drop_last, o.lr, o.batch_size) == (wd, schedule, drop_last, 1e-3, 128)
    assert cfg.model.teacher_weights == HUB_TEACHER
    run = _student_run(cfg)
    encoder, classifier, head = run.optimizer.param_groups
    assert (encoder["lr"], encoder["weight_decay"]) == (1e-3, wd)
    # the online classifier and the teacher head: their own constant Adam, no weight decay (SPEC 6)
    assert (classifier["lr"], classifier["weight_decay"]) == (1e-3, 0.0)
    assert (head["lr"], head["weight_decay"]) == (1e-4, 0.0)
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in run.optimizer.param_groups])
        run.optimizer.step()
        run.scheduler.step()
    expected = [1e-3 * (0.5 * (1 + np.cos(np.pi * e / 4)) if schedule == "cosine" else 1.0) for e in range(4)]
    assert [lr[0] for lr in lrs] == pytest.approx(expected)
    assert all(lr[1:] == [1e-3, 1e-4] for lr in lrs)
    # 300 images in batches of 128: 2 full batches, plus the partial one unless it is dropped
    assert data.batches_per_epoch(300, o.batch_size, o.drop_last) == (2 if drop_last else 3)
    gen = torch.Generator().manual_seed(0)
    aug = data.TwoViewAugment.for_size(torch.zeros(3), torch.ones(3), 8)
    batches = list(data.epoch_batches(torch.zeros(300, 3, 8, 8, dtype=torch.uint8), torch.zeros(300, dtype=torch.long),
                                      o.batch_size, aug, gen, drop_last=o.drop_last))
    assert [b[0].shape[0] for b in batches] == ([128, 128] if drop_last else [128, 128, 44])


def test_ce_student_classifier_follows_the_student_settings():
    run = _student_run(preset("paper-bank").replace(method={"method": "ce"}))
    encoder, classifier = run.optimizer.param_groups
    assert classifier["weight_decay"] == encoder["weight_decay"] == 1e-4


def test_print_config_shows_each_protocol(capsys):
    import json
    assert main(["train", "--preset", "paper", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["weight_decay"] == 0.0 and cfg["optim"]["schedule"] == "constant"
    assert cfg["optim"]["drop_last"] is False and cfg["model"]["teacher_weights"] == HUB_TEACHER
    assert main(["train", "--preset", "paper-bank", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["optim"]["weight_decay"], cfg["optim"]["schedule"], cfg["optim"]["drop_last"]) == (1e-4, "cosine", True)
    assert main(["sweep", "all", "--preset", "paper", "--print-config"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert sorted(e["run"] for e in planned if e["preset"] == "paper-bank") == sorted(
        e["run"] for e in planned if e["group"] == "bank")
    assert len([e for e in planned if e["group"] == "bank"]) == 4


def test_teacher_training_has_its_own_settings():
    """A student's --lr or --batch-size never changes the teacher."""
    base = preset("quick")
    for change in ({"lr": 0.5}, {"batch_size": 7}, {"weight_decay": 0.1}):
        assert base.replace(optim=change).teacher_identity() == base.teacher_identity()
        assert teacher_run_name(base.replace(optim=change)) == teacher_run_name(base)
    assert base.replace(teacher={"lr": 0.5}).teacher_identity() != base.teacher_identity()


def test_initialisation_is_a_setting():
    torch.manual_seed(0)
    kaiming = build_encoder("resnet8", 10)
    torch.manual_seed(0)
    default = build_encoder("resnet8", 10, init="pytorch")
    w_k, w_d = kaiming.layer1[0].conv1.weight, default.layer1[0].conv1.weight
    # fan-out Kaiming: std sqrt(2 / (16 * 9)); PyTorch's default: uniform with bound 1/sqrt(fan_in)
    assert w_k.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.15)
    assert w_d.abs().max().item() <= 1 / (16 * 9) ** 0.5 + 1e-6
    assert run_name(preset("paper").replace(model={"init": "pytorch"})) != run_name(preset("paper"))


# -- the teacher's weights ----------------------------------------------------------------------

def _populate_hub_cache(cache, filename, payload_writer):
    repo = cache / "models--edadaltocg--resnet50_cifar100"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    payload_writer(snapshot / filename)
    return snapshot / filename


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hub_teacher_is_read_from_the_local_cache_offline(offline_hub, filename):
    from safetensors.torch import save_file
    encoder = build_encoder("resnet8", 10)
    state = {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}

    def write(path):
        if filename.endswith(".safetensors"):
            save_file(state, str(path))
        else:
            torch.save(state, path)
    expected = _populate_hub_cache(offline_hub, filename, write)
    path = tw.resolve_source(HUB_TEACHER)
    assert path.resolve() == expected.resolve()
    loaded = build_encoder("resnet8", 10)
    tw.load_encoder_weights(loaded, tw.read_state_dict(path), HUB_TEACHER, 10, "toy")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_hub_teacher_missing_offline_says_every_way_on(offline_hub):
    with pytest.raises(tw.TeacherWeightsUnavailableError) as info:
        tw.resolve_source(HUB_TEACHER)
    message = str(info.value)
    assert "edadaltocg/resnet50_cifar100" in message and "--teacher-weights" in message
    assert "--train-teacher" in message and "\n" not in message


def test_cli_offline_without_teacher_is_one_line(offline_hub, tmp_path, capsys):
    assert main(["train", "--preset", "paper", "--method", "ce", "--output-dir", str(tmp_path),
                 "--data-root", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "edadaltocg/resnet50_cifar100" in err and "--teacher-weights" in err
    assert "Traceback" not in err


def test_three_teacher_file_kinds_and_layout_variants(tmp_path):
    from safetensors.torch import save_file
    encoder = build_encoder("resnet8", 10)
    state = encoder.state_dict()
    renamed = {("classifier." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()}
    renamed["aux_classifier.weight"] = torch.zeros(3)
    tar = tmp_path / "model_best.pth.tar"  # timm training checkpoint with its argparse settings
    torch.save({"epoch": 7, "arch": "resnet50", "state_dict": {"module." + k: v for k, v in renamed.items()},
                "args": argparse.Namespace(lr=0.1, model="resnet50")}, tar)
    sft = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(sft))
    binary = tmp_path / "pytorch_model.bin"
    torch.save({"final_classifier." + k[3:] if k.startswith("fc.") else k: v for k, v in state.items()}, binary)
    for path in (tar, sft, binary):
        got = tw.read_state_dict(path)
        assert set(got) == set(state), path
        assert all(torch.equal(got[k], state[k]) for k in state)


# -- run identity and forcing -------------------------------------------------------------------

def test_replaced_teacher_invalidates_cached_students(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, epochs=1).replace(method={"method": "lw-supcrd"})
    first = Session(cfg, analyze=False).run(cfg)
    assert not first.cached and Session(cfg, analyze=False).run(cfg).cached
    old_fp = load_checkpoint(first.checkpoint)["identity"]["teacher"]["fingerprint"]
    # the teacher file is replaced by one with other weights (same name, same settings)
    teacher_file = tmp_path / "pth_models" / f"{teacher_run_name(cfg, with_projection=True)}.pth"
    ckpt = load_checkpoint(teacher_file)
    ckpt["head"]["0.weight"] = ckpt["head"]["0.weight"] + 0.01
    torch.save(ckpt, teacher_file)
    session = Session(cfg, analyze=False)
    result = session.run(cfg)
    assert not result.cached, "a student of the old teacher was reused"
    new_fp = load_checkpoint(result.checkpoint)["identity"]["teacher"]["fingerprint"]
    assert new_fp == session.teacher()[0].fingerprint
    assert new_fp != old_fp
    assert Session(cfg, analyze=False).run(cfg).cached


def test_force_retrains_each_student_once_and_never_the_teacher(tmp_path, tiny_config, monkeypatch,
                                                               trained_students):
    base = tiny_config(tmp_path, train_images=96, test_images=32, epochs=1)
    monkeypatch.setattr(experiments, "default_bank_size", lambda preset_name: 32)
    trained_teachers = []
    real_teacher = train_teacher_fn()

    def counting_teacher(*args, **kwargs):
        trained_teachers.append(1)
        return real_teacher(*args, **kwargs)
    import desupcon.teacher as teacher_mod
    monkeypatch.setattr(teacher_mod, "train_teacher_encoder", counting_teacher)

    def notebook(force=False, force_bank=False, force_teacher=False):
        """The notebook's cells: one session, one group at a time, the same switches."""
        session = Session(base, pictures=False, force_teacher=force_teacher)
        session.teacher()
        for group in ("baselines", "alpha", "beta", "temp", "bank"):
            planned = experiments.plan(base, group)
            experiments.run_experiments(base, planned, force=force or (group == "bank" and force_bank),
                                        lockstep=True, session=session)
        return session

    notebook()
    unique = {run_name(e.cfg) for g in ("baselines", "alpha", "beta", "temp", "bank")
              for e in experiments.plan(base, g)}
    assert sorted(trained_students) == sorted(unique) and len(trained_teachers) == 1
    trained_students.clear(), trained_teachers.clear()
    notebook()
    assert trained_students == [] and trained_teachers == []
    notebook(force=True)  # FORCE_RETRAIN: every student once, the default LW-SupCRD run included
    assert sorted(trained_students) == sorted(unique) and trained_teachers == []
    trained_students.clear()
    notebook(force_bank=True)  # FORCE_RETRAIN_BANK_ABLATION: the bank ablation only
    bank = {run_name(e.cfg) for e in experiments.plan(base, "bank")}
    assert sorted(trained_students) == sorted(bank) and trained_teachers == []
    trained_students.clear()
    notebook(force_teacher=True)  # FORCE_RETRAIN_TEACHER: the teacher only
    # Retrained with the same seed on one device it is bit-identical (same fingerprint), so no
    # student is stale; a teacher whose content changes is covered by the test above.
    assert trained_teachers == [1] and trained_students == []


def train_teacher_fn():
    import desupcon.teacher as teacher_mod
    return teacher_mod.train_teacher_encoder


# -- the published hybrid and the README's bank ---------------------------------------------------

def test_hybrid_running_scales_match_a_naive_loop():
    cfg = MethodConfig(method="hybrid", lam=0.3, hybrid_scale_steps=5)
    method = methods.build_method(cfg)
    gen = torch.Generator().manual_seed(0)
    s_sc = s_lw = None
    for step in range(9):
        m = 12
        labels = torch.randint(0, 3, (m,), generator=gen)
        out = methods.StepOutputs(labels, torch.randn(m, 8, generator=gen), torch.randn(m, 3, generator=gen),
                                  torch.randn(m, 8, generator=gen), torch.randn(m, 3, generator=gen))
        got = method.representation_losses(out)["hybrid"]
        sc = losses.supcon_loss(out.student_projection, labels, 0.07).item()
        lw = losses.lw_supcrd_loss(out.student_projection, out.teacher_projection, out.teacher_logits,
                                   labels).item()
        if step < 5:  # naive: s starts at the first value, then s <- 0.9 s + 0.1 L, frozen after 5 steps
            s_sc = sc if s_sc is None else 0.9 * s_sc + 0.1 * sc
            s_lw = lw if s_lw is None else 0.9 * s_lw + 0.1 * lw
        expected = 0.3 * sc / s_sc + 0.7 * lw / s_lw
        assert got.item() == pytest.approx(expected, rel=1e-5)
        if step == 0:
            assert got.item() == pytest.approx(1.0, rel=1e-5)  # the published logs start near 1
    plain = methods.build_method(MethodConfig(method="hybrid", lam=0.3, hybrid_scaling="plain"))
    assert plain.representation_losses(out)["hybrid"].item() == pytest.approx(0.3 * sc + 0.7 * lw, rel=1e-5)


def test_hybrid_resume_is_bit_identical(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(tmp_path / "a", epochs=3).replace(method={"method": "hybrid", "hybrid_scale_steps": 7})
    whole = Session(cfg, analyze=False).run(cfg)
    resumed_cfg = cfg.replace(output_dir=str(tmp_path / "b"))
    calls = {"epochs": 0}
    real = Run.finish_epoch

    def stop_after_two(self, *args, **kwargs):
        if self.kind != "student":
            return real(self, *args, **kwargs)
        if calls["epochs"] == 2:
            raise KeyboardInterrupt
        calls["epochs"] += 1
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Run, "finish_epoch", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            Session(resumed_cfg, analyze=False).run(resumed_cfg)
    partial = load_checkpoint(tmp_path / "b" / "pth_models" / "in_progress" / f"{whole.name}.pth")
    extra = partial["method_state"]["_extra_state"]
    assert extra["scale_steps"] == 7 and extra["scales"] is not None
    resumed = Session(resumed_cfg, analyze=False).run(resumed_cfg)
    a, b = load_checkpoint(whole.checkpoint)["student"], load_checkpoint(resumed.checkpoint)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_readme_bank_reading_every_entry_negative_from_all_slots():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    bank = memory_bank.MomentumMemoryBank(6, 4, labels)
    bank.update(torch.tensor([0, 1]), torch.randn(2, 4))
    written, _ = bank.sample(10, generator=torch.Generator().manual_seed(0))
    assert written.shape[0] == 2  # SPEC 5: written slots only
    everything, _ = bank.sample(10, generator=torch.Generator().manual_seed(0), written_only=False)
    assert everything.shape[0] == 6
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    logits, y = torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 0, 2])
    rows, row_labels = torch.randn(5, 8, generator=gen), torch.tensor([0, 0, 1, 2, 0])
    got = losses.lw_supcrd_loss(s, t, logits, y, bank=rows, bank_labels=row_labels, bank_positives=False,
                                adaptive_beta=False)
    # naive float64: bank rows only ever in R_i, with their label's push weight
    s64, c64 = torch.nn.functional.normalize(s.double(), dim=1), torch.nn.functional.normalize(
        torch.cat([t, rows]).double(), dim=1)
    p = torch.softmax(logits.double(), dim=1)
    contrast_y = torch.cat([y, row_labels])
    total = 0.0
    for i in range(4):
        a = p[i, y[i]] * sum(torch.exp(s64[i] @ c64[k] / 0.07) for k in range(4) if contrast_y[k] == y[i])
        r = sum(10 * (1 - p[i, contrast_y[j]]) * torch.exp(s64[i] @ c64[j] / 0.07)
                for j in range(9) if j >= 4 or contrast_y[j] != y[i])
        total += -torch.log(a / (a + r))
    assert got.item() == pytest.approx((total / 4).item(), rel=1e-5)


# -- the published checkpoints ------------------------------------------------------------------

def test_published_names_describe_their_runs():
    assert published_config("student_undistilled_resnet18_cifar100").method.method == "ce"
    bank = published_config("student_lwsupcrd_bank4096_resnet18_cifar100")
    assert bank.preset == "paper-bank" and bank.method.bank_size == 4096
    alpha = published_config("student_alpha_2.0_beta_10.0_adaptive_resnet18_cifar100")
    assert (alpha.method.alpha, alpha.method.beta, alpha.method.temperature) == (2.0, 10.0, 0.07)
    assert published_config("student_hybrid_lambda_0.7_resnet18_cifar100").method.lam == 0.7
    assert published_config("my_own_student") is None
    for name in ("student_undistilled_resnet18_cifar100", "student_baseline_crd_resnet18_cifar100",
                 "student_baseline_supcon_resnet18_cifar100", "student_alpha_1.0_beta_10.0_temp_0.05_resnet18_cifar100",
                 "student_hybrid_lambda_0.3_resnet18_cifar100", "student_baseline_crd_nobank_resnet18_cifar100",
                 "student_lwsupcrd_bank4096_resnet18_cifar100"):
        assert run_name(published_config(name)) == name  # our runs carry the published names


def _fake_cifar100(root, n_train=200, n_test=100):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = list(np.arange(n) % 100)
        dump(split, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine,
                     "coarse_labels": [f // 5 for f in fine]})
    dump("meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                  "coarse_label_names": [f"super{i}" for i in range(20)]})
    return folder


def _published_teacher_with_projection(path):
    torch.manual_seed(5)
    teacher = Teacher(build_encoder("resnet50", 100))
    state = {("classifier." + k[3:] if k.startswith("fc.") else k): v for k, v in teacher.encoder.state_dict().items()}
    state.update({f"projection.{k}": v for k, v in teacher.head.state_dict().items()})
    torch.save(state, path)
    return teacher


def _published_student(path):
    torch.manual_seed(6)
    student = Student(build_encoder("resnet18", 100))
    state = {}
    for k, v in student.state_dict().items():
        state[k.replace("encoder.fc.", "classifier.")] = v
    torch.save(state, path)
    return student


def test_published_student_and_teacher_are_loaded_not_trained(tmp_path, monkeypatch, capsys, accept_cifar_files):
    models = tmp_path / "pth_models"
    models.mkdir()
    accept_cifar_files(_fake_cifar100(tmp_path / "data"))
    teacher_file = models / "teacher_resnet50_cifar100_with_projection.pth"
    _published_teacher_with_projection(teacher_file)
    student_file = models / "student_undistilled_resnet18_cifar100.pth"
    _published_student(student_file)
    before = {p: p.read_bytes() for p in (teacher_file, student_file)}

    def no_training(*args, **kwargs):
        raise AssertionError("something was trained")
    from desupcon.engine import students
    monkeypatch.setattr(students, "train_group", no_training)
    import desupcon.teacher as teacher_mod
    monkeypatch.setattr(teacher_mod, "train_teacher_encoder", no_training)
    monkeypatch.setattr(teacher_mod, "train_projection_probe", no_training)
    args = ["train", "--preset", "paper", "--method", "ce", "--no-download", "--data-root", str(tmp_path / "data"),
            "--output-dir", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student_undistilled_resnet18_cifar100" in out and "published checkpoint" in out
    assert all(p.read_bytes() == b for p, b in before.items()), "published files are never modified"
    imported = load_checkpoint(models / "imported" / "student_undistilled_resnet18_cifar100.pth", "student")
    assert imported["source"]["kind"] == "published checkpoint"
    records = __import__("json").loads(
        (tmp_path / "json_results" / "comprehensive_results_resnet18_cifar100.json").read_text())
    record = records["student_undistilled_resnet18_cifar100"]
    assert record["source"] == "published checkpoint" and record["protocol"] == "paper"
    assert "backbone" in record["metrics"]
    stored = record["metrics"]
    # analyze on the same published file gives the same metrics
    assert main(["analyze", str(student_file), "--output-dir", str(tmp_path), "--data-root",
                 str(tmp_path / "data"), "--device", "cpu", "--no-plots"]) == 0
    again = __import__("json").loads(
        (tmp_path / "json_results" / "comprehensive_results_resnet18_cifar100.json").read_text()
    )["student_undistilled_resnet18_cifar100"]["metrics"]
    for key, value in stored.items():
        if isinstance(value, float):
            assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # the second invocation trains nothing either and reuses the import
    assert main(args) == 0
    # report marks it and its teacher
    assert main(["report", "--output-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "published checkpoint" in text and "published (file)" in text


def test_unknown_published_layout_file_is_analysable(tmp_path, capsys, accept_cifar_files):
    accept_cifar_files(_fake_cifar100(tmp_path / "data", n_train=100, n_test=100))
    path = tmp_path / "downloads" / "my_favourite_student.pth"
    path.parent.mkdir()
    _published_student(path)
    assert main(["analyze", str(path), "--output-dir", str(tmp_path / "out"), "--data-root",
                 str(tmp_path / "data"), "--device", "cpu", "--no-plots"]) == 0
    assert "alignment_class" in capsys.readouterr().out
