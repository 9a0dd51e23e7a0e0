"""Several processes (SPEC 15), tested on the CPU with the gloo backend and 2 processes: the
gathered contrastive losses and their gradients equal the single-process computation on the same
global batch, sharded batches cover the global batch, and a torchrun run writes once and resumes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from desupcon import data
from desupcon.engine import distributed
from desupcon.config import MethodConfig
from desupcon.methods import StepOutputs, build_method

WORLD = 2
B, D, C, K = 6, 8, 3, 5  # global batch, embedding size, classes, bank rows
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=g)
    return {"s": torch.randn(2 * B, D, generator=g, dtype=torch.float64),
            "t": torch.randn(2 * B, D, generator=g, dtype=torch.float64),
            "logits": torch.randn(2 * B, C, generator=g, dtype=torch.float64),
            "labels": labels, "bank": torch.randn(K, D, generator=g, dtype=torch.float64),
            "bank_labels": torch.randint(0, C, (K,), generator=g)}


METHOD_CASES = {
    "supcon": MethodConfig(method="supcon"),
    "crd": MethodConfig(method="crd"),
    "lw-supcrd": MethodConfig(method="lw-supcrd"),
    "lw-supcrd+bank": MethodConfig(method="lw-supcrd", bank_size=K),
    "hybrid": MethodConfig(method="hybrid", hybrid_scaling="plain"),
}


def _outputs(batch, rows, bank: bool):
    """StepOutputs of `rows` (image positions) in the [view 1; view 2] layout."""
    v1, v2 = rows, [r + B for r in rows]
    pick = v1 + v2
    s = batch["s"][pick].clone().requires_grad_(True)
    t = batch["t"][pick].clone().requires_grad_(True)
    out = StepOutputs(torch.cat([batch["labels"][rows]] * 2), s, torch.zeros(2 * len(rows), C, dtype=torch.float64),
                      teacher_projection=t, teacher_logits=batch["logits"][pick],
                      indices=torch.tensor(rows), classifier_labels=batch["labels"][rows])
    if bank:
        out.bank_embeddings, out.bank_labels = batch["bank"], batch["bank_labels"]
    return out, s, t


def _representation_loss(method, out):
    return sum(method.representation_losses(out).values())


def _leave_group():
    """Both ranks done with every collective before the group goes (a rank destroying it while the
    other still talks aborted the process now and then)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _worker(rank, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    batch = _global_batch()
    rows = list(range(rank * B // WORLD, (rank + 1) * B // WORLD))
    results = {}
    for name, cfg in METHOD_CASES.items():
        method = build_method(cfg)
        out, s, t = _outputs(batch, rows, bank="bank" in name)
        out = distributed.gather_step_outputs(out, method.needs)
        loss = _representation_loss(method, out)
        loss.backward()
        # DDP averages over processes the gradients that the all-gather's backward summed
        grad_t = t.grad if t.grad is not None else torch.zeros_like(t)  # SupCon never sees the teacher
        results[name] = {"loss": loss.detach(), "grad_s": s.grad / WORLD, "grad_t": grad_t / WORLD,
                         "labels": out.labels, "indices": out.indices}
    torch.save(results, f"{result_path}.{rank}")
    _leave_group()


def test_gathered_losses_and_gradients_equal_the_single_process(tmp_path):
    result_path = tmp_path / "ranks"
    mp.spawn(_worker, args=(_free_port(), str(result_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(f"{result_path}.{r}") for r in range(WORLD)]
    batch = _global_batch()
    for name, cfg in METHOD_CASES.items():
        method = build_method(cfg)
        out, s, t = _outputs(batch, list(range(B)), bank="bank" in name)
        loss = _representation_loss(method, out)
        loss.backward()
        t_grad = t.grad if t.grad is not None else torch.zeros_like(t)
        half = B // WORLD
        for rank, res in enumerate(per_rank):
            r = res[name]
            assert torch.allclose(r["loss"], loss.detach(), rtol=1e-10, atol=1e-12), name
            assert torch.equal(r["labels"], out.labels) and torch.equal(r["indices"], torch.arange(B)), name
            mine = list(range(rank * half, (rank + 1) * half))
            rows = mine + [m + B for m in mine]
            assert torch.allclose(r["grad_s"], s.grad[rows], rtol=1e-9, atol=1e-12), f"{name}: student grads"
            assert torch.allclose(r["grad_t"], t_grad[rows], rtol=1e-9, atol=1e-12), f"{name}: teacher grads"


N_IMAGES, FEAT = 24, 6  # crd-nce's banks: a training set of 24 images, 6-d pooled features


def _crd_nce_steps(rows_of_step):
    """A crd-nce method after a few steps on the given rows of each global batch; its banks."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    labels = torch.arange(N_IMAGES) % 3
    method = build_method(MethodConfig(method="crd-nce", nce_dim=4, nce_negatives=5))
    method.setup(SimpleNamespace(train_labels=labels), SimpleNamespace(encoder=SimpleNamespace(feature_dim=FEAT)),
                 SimpleNamespace(encoder=SimpleNamespace(feature_dim=FEAT)))
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        indices = torch.randperm(N_IMAGES, generator=g)[:B]
        feats_s, feats_t = torch.randn(B, FEAT, generator=g), torch.randn(B, FEAT, generator=g)
        rows = rows_of_step
        out = StepOutputs(labels[indices][rows], torch.zeros(len(rows), 4), torch.randn(len(rows), 3),
                          indices=indices[rows], student_features=feats_s[rows], teacher_features=feats_t[rows])
        method.representation_losses(out)
        method.after_step(out)
    return {"student": method.memory.student_bank.clone(), "teacher": method.memory.teacher_bank.clone()}


def _bank_worker(rank, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows = list(range(rank * B // WORLD, (rank + 1) * B // WORLD))
    torch.save(_crd_nce_steps(rows), f"{result_path}.{rank}")
    _leave_group()


def test_crd_nce_banks_stay_identical_across_ranks(tmp_path):
    result_path = tmp_path / "banks"
    mp.spawn(_bank_worker, args=(_free_port(), str(result_path)), nprocs=WORLD, join=True)
    banks = [torch.load(f"{result_path}.{r}") for r in range(WORLD)]
    alone = _crd_nce_steps(list(range(B)))  # one process on the whole global batch
    for name in ("student", "teacher"):
        assert torch.equal(banks[0][name], banks[1][name]), f"{name} bank differs between ranks"
        assert torch.allclose(banks[0][name], alone[name], atol=1e-6), f"{name} bank differs from one process"


N_EVAL = 21  # test images: uneven slices over the 2 ranks


def _eval_setup():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (N_EVAL, 3, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (N_EVAL,), generator=g)
    dataset = data.ImageDataset("toy", images, labels, images, labels, ["a", "b", "c"])
    weight = torch.randn(48, 3, generator=g)
    return dataset, weight


def _eval_worker(rank, port, result_path):
    from desupcon.engine.dataset import evaluate_accuracy
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    dataset, weight = _eval_setup()
    seen = []

    def logits(x):
        seen.append(x.shape[0])
        return x.flatten(1) @ weight
    acc = evaluate_accuracy(logits, dataset.test_images, dataset.test_labels, dataset, "cpu", shared=True)
    torch.save({"acc": acc, "seen": sum(seen)}, f"{result_path}.{rank}")
    _leave_group()


def test_shared_evaluation_splits_the_test_set_over_ranks_and_equals_one_process(tmp_path):
    from desupcon.engine.dataset import evaluate_accuracy
    result_path = tmp_path / "ranks"
    mp.spawn(_eval_worker, args=(_free_port(), str(result_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(f"{result_path}.{r}") for r in range(WORLD)]
    dataset, weight = _eval_setup()
    alone = evaluate_accuracy(lambda x: x.flatten(1) @ weight, dataset.test_images, dataset.test_labels,
                              dataset, "cpu", shared=True)
    assert 0 < alone < 100
    assert [r["acc"] for r in per_rank] == [alone, alone]
    assert [r["seen"] for r in per_rank] == [10, 11]  # each rank its own slice, not the whole set


def test_sharded_batches_are_the_global_batch():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    aug = data.TwoViewAugment(torch.zeros(3), torch.ones(3), padding=1)
    whole = list(data.epoch_batches(images, labels, 8, aug, torch.Generator().manual_seed(3), drop_last=False))
    shards = [list(data.epoch_batches(images, labels, 8, aug, torch.Generator().manual_seed(3), drop_last=False,
                                      shard=(r, 2))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for full, a, b in zip(whole, *shards):
        for i in (0, 1, 2, 3):  # indices, view 1, view 2, labels
            assert torch.equal(torch.cat([a[i], b[i]]), full[i])


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_torchrun_two_processes_write_once_and_resume(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), str(REPO / "desupcon.py"), "train", "--preset", "quick", "--method", "lw-supcrd",
            "--device", "cpu", "--epochs", "2", "--train-subset", "128", "--test-subset", "32",
            "--teacher-arch", "resnet8", "--teacher-epochs", "1", "--probe-epochs", "1",
            "--output-dir", str(out)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    students = list((out / "pth_models").glob("student_*.pth"))
    logs = list((out / "json_results" / "training_logs").glob("student_*.json"))
    assert len(students) == 1 and len(logs) == 1
    assert not (out / "pth_models" / "in_progress").exists()
    # a second launch finds the finished run: nothing is trained again
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "loaded from cache" in again.stderr + again.stdout


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from desupcon import cli
from desupcon.store import checkpoint  # the loop's background writer writes the epoch checkpoints
real_save = checkpoint.atomic_torch_save


def save_then_die(path, obj, *args, **kwargs):
    real_save(path, obj, *args, **kwargs)
    if obj.get("kind") == "in_progress" and obj.get("epoch") == 1 and obj["name"].startswith("student"):
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0, right after the epoch-1 checkpoint


checkpoint.atomic_torch_save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_torchrun_run_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO)))

    def launch(script, out):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
             str(_free_port()), str(script), "train", "--preset", "quick", "--method", "lw-supcrd",
             "--device", "cpu", "--epochs", "3", "--train-subset", "128", "--test-subset", "32",
             "--teacher-arch", "resnet8", "--teacher-epochs", "1", "--probe-epochs", "1",
             "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=600)
    whole = launch(REPO / "desupcon.py", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = launch(killer, tmp_path / "resumed")
    assert killed.returncode != 0
    partial = list((tmp_path / "resumed" / "pth_models" / "in_progress").glob("student_*.pth"))
    assert len(partial) == 1
    resumed = launch(REPO / "desupcon.py", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    from desupcon.store.checkpoint import load_checkpoint
    a = load_checkpoint(next((tmp_path / "whole" / "pth_models").glob("student_*.pth")))["student"]
    b = load_checkpoint(next((tmp_path / "resumed" / "pth_models").glob("student_*.pth")))["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_torchrun_trains_a_zoo_pair_with_sdd_regions(tmp_path):
    """A zoo teacher and student (names in any case) under DDP with SDD's regions: MobileNetV2's
    final map is 1x1 at 16 px, the wide ResNet's 4x4; both pool to the same 4x4-first regions."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(_free_port()), str(REPO / "desupcon.py"), "train", "--preset", "quick", "--method", "sdd-lskd",
         "--device", "cpu", "--epochs", "1", "--train-subset", "64", "--test-subset", "32",
         "--teacher-arch", "WRN_16_1", "--student-arch", "mobilenetv2", "--teacher-epochs", "1",
         "--probe-epochs", "1", "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from desupcon.store.checkpoint import load_checkpoint
    [path] = (out / "pth_models").glob("student_sddlskd_*.pth")
    ckpt = load_checkpoint(path)
    assert ckpt["student_arch"] == "MobileNetV2" and ckpt["config"]["model"]["teacher_arch"] == "wrn_16_1"
    assert "_teacherwrn_16_1" in path.name and "MobileNetV2" in path.name


NODE_LOCAL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from desupcon import cli
from desupcon.store import checkpoint  # the loop's background writer writes the epoch checkpoints
# every rank its own output folder: node-local disks (only rank 0 writes, so rank 1's stays empty)
argv = sys.argv[1:]
argv[argv.index("--output-dir") + 1] += "/rank" + os.environ["RANK"]
if {kill}:
    real_save = checkpoint.atomic_torch_save

    def save_then_die(path, obj, *args, **kwargs):
        real_save(path, obj, *args, **kwargs)
        if obj.get("kind") == "in_progress" and obj.get("epoch") == 1 and obj["name"].startswith("student"):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.atomic_torch_save = save_then_die
sys.exit(cli.main(argv))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_node_local_disks_resume_from_rank_0s_checkpoint(tmp_path):
    """Rank 1's disk holds neither the teacher nor the epoch checkpoint: every decision (teacher
    cached, run cached, start epoch) is rank 0's, so the resumed run neither hangs nor differs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    scripts = {}
    for kill in (False, True):
        scripts[kill] = tmp_path / f"node_local_{kill}.py"
        scripts[kill].write_text(NODE_LOCAL.format(repo=str(REPO), kill=kill))

    def launch(script, out):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
             str(_free_port()), str(script), "train", "--preset", "quick", "--method", "ce",
             "--device", "cpu", "--epochs", "3", "--train-subset", "128", "--test-subset", "32",
             "--teacher-arch", "resnet8", "--teacher-epochs", "1", "--probe-epochs", "1",
             "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
    whole = launch(scripts[False], tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = launch(scripts[True], tmp_path / "resumed")
    assert killed.returncode != 0
    assert not (tmp_path / "resumed" / "rank1" / "pth_models").exists() or \
        not list((tmp_path / "resumed" / "rank1" / "pth_models").rglob("*.pth"))
    resumed = launch(scripts[False], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    from desupcon.store.checkpoint import load_checkpoint
    a = load_checkpoint(next((tmp_path / "whole" / "rank0" / "pth_models").glob("student_*.pth")))["student"]
    b = load_checkpoint(next((tmp_path / "resumed" / "rank0" / "pth_models").glob("student_*.pth")))["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a third launch finds the finished run on rank 0's disk: nothing trains, nothing hangs
    again = launch(scripts[False], tmp_path / "resumed")
    assert again.returncode == 0 and "loaded from cache" in again.stdout + again.stderr


WRITE_SPY = """
import os, sys
sys.path.insert(0, {repo!r})
if os.environ["RANK"] != "0":  # every atomic write ends in os.replace: note what rank 1 writes
    real_replace = os.replace

    def noting_replace(src, dst, *args, **kwargs):
        with open({log!r}, "a") as f:
            f.write(str(dst) + "\\n")
        return real_replace(src, dst, *args, **kwargs)
    os.replace = noting_replace
from desupcon import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_torchrun_sweep_writes_from_rank_0_only(tmp_path):
    out, log = tmp_path / "out", tmp_path / "rank1_writes.txt"
    script = tmp_path / "spy.py"
    script.write_text(WRITE_SPY.format(repo=str(REPO), log=str(log)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(_free_port()), str(script), "sweep", "baselines", "--preset", "quick", "--device", "cpu",
         "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--teacher-arch", "resnet8",
         "--teacher-epochs", "1", "--probe-epochs", "1", "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "pth_models").glob("student_*.pth"))) == 4
    assert (out / "json_results" / "results.md").is_file() and list((out / "plots").glob("*.png"))
    assert not log.exists(), f"rank 1 wrote: {log.read_text()}"
    assert done.stdout.count("# Results") == 1  # the report is printed once, by rank 0
