"""Shared test settings and the tiny run configuration."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_run_config(output_dir, train_images: int = 160, test_images: int = 64, epochs: int = 2):
    """The quick preset shrunk to seconds: 16x16 digits subset, resnet8 teacher and student."""
    from desupcon.config import preset
    return preset("quick").replace(
        data={"train_subset": train_images, "test_subset": test_images},
        model={"teacher_arch": "resnet8", "student_arch": "resnet8"},
        optim={"epochs": epochs, "batch_size": 32},
        teacher={"epochs": 1, "probe_epochs": 1, "batch_size": 32},
        device="cpu", output_dir=str(output_dir))


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: `tiny_config(output_dir, train_images=..., epochs=...)` -> RunConfig."""
    return tiny_run_config


@pytest.fixture
def made_step_graphs(monkeypatch):
    """The `engine.graphs.StepGraph`s made from now on (one per graphed epoch of a group), in order."""
    from desupcon.engine import graphs
    made = []
    real = graphs.StepGraph.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(graphs.StepGraph, "__init__", recording)
    return made


@pytest.fixture
def nan_batch_at(monkeypatch):
    """`nan_batch_at(step)`: from now on, the training loop's two-view batches (the students') are
    NaN at 1-based `step` of every epoch."""
    from desupcon import data
    real = data.epoch_batches

    def poison(step: int):
        def batches(*args, **kwargs):
            for k, (indices, view1, view2, labels) in enumerate(real(*args, **kwargs), start=1):
                if view2 is not None and k == step:
                    view1, view2 = view1 * float("nan"), view2 * float("nan")
                yield indices, view1, view2, labels
        monkeypatch.setattr(data, "epoch_batches", batches)
    return poison


@pytest.fixture
def trained_students(monkeypatch):
    """The names of the student runs the training loop trains from now on, in order (cached runs
    and teachers are not counted)."""
    from desupcon.engine import loop
    names: list[str] = []
    real = loop._train_lockstep

    def counting(runs, *args, **kwargs):
        names.extend(r.name for r in runs if r.kind == "student")
        return real(runs, *args, **kwargs)
    monkeypatch.setattr(loop, "_train_lockstep", counting)
    return names


@pytest.fixture
def accept_cifar_files(monkeypatch):
    """`accept(folder)`: the CIFAR loader takes the (hand-made) pickles in `folder` as the official
    files: their MD5s replace torchvision's list for this test. The unpickler stays restricted."""
    import hashlib
    from pathlib import Path

    from desupcon import data

    def accept(folder):
        sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()}
        monkeypatch.setattr(data, "cifar_checksums", lambda name: sums)
    return accept
