"""The dataset on the device policy's device, and test accuracy in large batches."""

from __future__ import annotations

import logging

import torch

from desupcon import data as data_mod
from desupcon.config import RunConfig
from desupcon.engine import distributed as dist
from desupcon.engine.devices import as_policy

log = logging.getLogger("desupcon")


EVAL_BATCH = 512  # the analysis' batch (features kept per layer); training's evaluation uses the policy's


def prepare_dataset(cfg: RunConfig, device: torch.device) -> data_mod.ImageDataset:
    dataset = data_mod.load_dataset(cfg.data.dataset, cfg.data.data_root, cfg.data.download,
                                     cfg.data.image_size)
    if cfg.data.train_subset or cfg.data.test_subset:
        dataset = data_mod.subsample(dataset, cfg.data.train_subset, cfg.data.test_subset,
                                     seed=0, sampling=cfg.data.subset_sampling)  # one subset for every seed
    return dataset.to(device, images=fits_on_device(dataset.nbytes(), device))


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether a dataset of `nbytes` can live on `device`, leaving most memory for training."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free // 4:
        log.info(f"dataset ({nbytes / 2**20:.0f} MB) kept in host memory: it would take more than a "
                 f"quarter of the GPU's free {free / 2**20:.0f} MB; batches are copied as needed")
        return False
    return True


@torch.no_grad()
def evaluate_accuracy(logits_fn, images: torch.Tensor, labels: torch.Tensor,
                      dataset: data_mod.ImageDataset, policy, shared: bool = False) -> float:
    """Top-1 accuracy in percent; `logits_fn(normalised_batch) -> logits`, in batches of the
    policy's `eval_batch`.

    `shared=True` (called by every process of a torchrun job at once): each process evaluates its
    own contiguous slice of the test images and the counts are summed, instead of every process
    evaluating them all; one process alone evaluates everything either way."""
    policy = as_policy(policy)
    n = labels.shape[0]
    part = slice(None)
    if shared and dist.world_size() > 1:
        r, w = dist.rank(), dist.world_size()
        part = slice(r * n // w, (r + 1) * n // w)
    correct = torch.zeros((), dtype=torch.long, device=policy.device)
    for x, y in data_mod.eval_batches(images[part], labels[part], policy.eval_batch, dataset.mean, dataset.std):
        with policy.autocast():
            logits = logits_fn(policy.inputs(x))
        correct += (logits.argmax(1) == y).sum()
    if shared:
        correct = dist.sum_over_ranks([correct])[0]
    return 100.0 * float(correct) / max(n, 1)
