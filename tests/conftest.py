"""Shared fixtures; `--run-slow` enables the tests marked slow."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="run tests marked slow (minutes on a 2-core CPU)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny_run_config(output_dir, train_images: int = 160, test_images: int = 64, epochs: int = 2):
    """The quick preset shrunk to seconds: 16x16 digits subset, resnet8 teacher and student."""
    from desupcon.config import preset
    return preset("quick").replace(
        data={"train_subset": train_images, "test_subset": test_images},
        model={"teacher_arch": "resnet8", "student_arch": "resnet8"},
        optim={"epochs": epochs, "batch_size": 32},
        teacher={"epochs": 1, "probe_epochs": 1},
        device="cpu", output_dir=str(output_dir))


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: `tiny_config(output_dir, train_images=..., epochs=...)` -> RunConfig."""
    return tiny_run_config
