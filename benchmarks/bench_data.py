"""Data + two-view augmentation throughput: desupcon's batched tensors against PIL in a DataLoader.

Prints images/s of `epoch_batches` + `TwoViewAugment` (the whole batch augmented at once on the
data's device) and of the straightforward pipeline of `baseline_pipeline.py` (torchvision PIL
transforms applied per image in a `DataLoader`) for each DataLoader worker count given, and the
ratio. Images/s counts source images; each gives two augmented views.

    python benchmarks/bench_data.py [--batch-size 32] [--loader-workers 0 2] [--data digits]
"""

from __future__ import annotations

import time

import common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
import torch

import baseline_pipeline as base
from common import banner, footer, header, load_data, setup, sync, table
from desupcon import data as data_mod


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (two views each)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per pipeline")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader worker counts of the baseline")
    args = p.parse_args()
    policy = setup(args)
    device, bs, n = policy.device, args.batch_size, args.batches
    began = time.perf_counter()
    dataset = load_data(args)
    banner("desupcon data benchmark", policy, dataset)
    header(f"Data + augmentation, batch {bs}, two views per image, {n} timed batches")

    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    gen = torch.Generator().manual_seed(0)

    def ours_batches():
        while True:
            yield from data_mod.epoch_batches(images, labels, bs, augment, gen)

    it = ours_batches()
    next(it)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    sync(device)
    ours = n * bs / (time.perf_counter() - start)
    rows = [["ours: epoch_batches + TwoViewAugment (batched tensors)", f"{ours:,.0f}", "1.00x"]]
    pil = base.TwoViewPILDataset(dataset.train_images, dataset.train_labels,
                                 base.baseline_transform(dataset.mean, dataset.std, dataset.image_size,
                                                         max(1, dataset.image_size // 8)))
    for workers in args.loader_workers:
        loader = base.make_loader(pil, bs, workers)

        def loader_batches():
            while True:
                yield from loader

        it = loader_batches()
        next(it)  # worker start-up and the first batch are not timed
        start = time.perf_counter()
        for _ in range(n):
            next(it)
        rate = n * bs / (time.perf_counter() - start)
        del it, loader
        rows.append([f"baseline: PIL transforms in DataLoader, num_workers={workers}", f"{rate:,.0f}",
                     f"{ours / rate:.2f}x"])
    print(table(["pipeline", "images/s", "ours vs this"], rows))
    footer(began)


if __name__ == "__main__":
    main()
