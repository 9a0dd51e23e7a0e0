"""The epoch's randomness drawn up front (`data.epoch_batches`): the same batches, the same
augmentation and the same generator state afterwards as drawing batch by batch, for one and two
views, kept or dropped last batches and every shard; the parameters reach the device once."""

import pytest
import torch

from desupcon import data
from desupcon.data import TwoViewAugment, epoch_batches


def batch_by_batch(images, labels, batch_size, augment, generator, drop_last, views, shard):
    """The reference: every batch draws its own order slice and parameters, then augments."""
    n = labels.shape[0]
    rank, world = shard
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        params = [augment.sample_params(idx.shape[0], generator) for _ in range(views)]
        if world > 1:
            per_rank = idx.shape[0] // world
            if per_rank == 0:
                continue
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            idx, params = idx[part], [p.slice(part) for p in params]
        batch = images[idx]
        yield (idx, augment.apply(batch, params[0]), augment.apply(batch, params[1]) if views == 2 else None,
               labels[idx])


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shard", [(0, 1), (0, 2), (1, 2), (2, 3)])
@pytest.mark.parametrize("n", [37, 5])  # 5: smaller than one batch
def test_upfront_draws_give_the_batch_by_batch_epoch(views, drop_last, shard, n):
    g = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    augment = TwoViewAugment(torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]), padding=2)
    ours_gen, ref_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = list(epoch_batches(images, labels, 8, augment, ours_gen, drop_last=drop_last, views=views, shard=shard))
    ref = list(batch_by_batch(images, labels, 8, augment, ref_gen, drop_last, views, shard))
    assert len(ours) == len(ref) and len(ours) > 0
    for a, b in zip(ours, ref):
        assert torch.equal(a[0], b[0]) and a[0].device.type == "cpu"
        assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
        assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])
    # the next epoch starts from the same generator state (resume stays exact)
    assert torch.equal(ours_gen.get_state(), ref_gen.get_state())


def test_the_epochs_parameters_are_copied_once_not_per_batch(monkeypatch):
    """Per epoch: indices, labels and 3 parameter kinds x 2 views copied to the device; per batch
    only its images. (The augmentation's own `to_device` calls then receive slices of the epoch's
    copies, which stay where they are.)"""
    calls = []
    real = data.to_device

    def recording(t, device):
        out = real(t, device)
        calls.append((tuple(t.shape), t.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()))
        return out
    monkeypatch.setattr(data, "to_device", recording)
    images = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    augment = TwoViewAugment(torch.zeros(3), torch.ones(3), padding=2)
    batches = list(epoch_batches(images, labels, 8, augment, torch.Generator().manual_seed(0)))
    assert len(batches) == 8
    epoch_copies = [c for c in calls if c[0][0] == 64]
    assert len(epoch_copies) == 1 + 1 + 3 * 2, calls
    image_copies = [c for c in calls if c[0] == (8, 3, 8, 8)]
    assert len(image_copies) == 8
    epoch_storages = {c[2] for c in epoch_copies}
    rest = [c for c in calls if c not in epoch_copies and c not in image_copies]
    assert rest and all(c[1] in epoch_storages for c in rest)  # slices of the epoch's copies
