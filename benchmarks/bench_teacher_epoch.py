"""One teacher cross-entropy epoch through desupcon's training loop against a plain PyTorch loop.

Both use the same data (resnet20 on 5,000 CIFAR-10 images by default, batch 128), the same batched
augmentation and the same test-set evaluation, in the same process, alternating: the difference is
only what the one loop adds (the device policy, deferred finiteness checks, accumulators, logs and
the epoch checkpoint). Prints seconds per epoch (median of --repeats) and the ratio.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import common  # noqa: F401  (before torch: the OpenMP wait policy)
import torch
import torch.nn.functional as F

from desupcon import data as data_mod
from desupcon.config import preset
from desupcon.models import build_encoder
from desupcon.store.paths import OutputPaths
from desupcon.teacher import train_teacher_encoder


def plain_epoch(arch: str, dataset, batch_size: int, policy, seed: int) -> float:
    """The straightforward loop: augment, forward, CE, backward, Adam; then evaluate."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = policy.prepare(build_encoder(arch, dataset.num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    augment = data_mod.TwoViewAugment.for_size(dataset.mean, dataset.std, dataset.image_size)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _, x, _, y in data_mod.epoch_batches(dataset.train_images, dataset.train_labels, batch_size,
                                              augment, gen, views=1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in data_mod.eval_batches(dataset.test_images, dataset.test_labels, 512, dataset.mean,
                                          dataset.std):
            correct += int((model(x).argmax(1) == y).sum())
    return time.perf_counter() - started


def ours_epoch(arch: str, dataset, batch_size: int, policy, seed: int) -> float:
    cfg = preset("quick").replace(data={"dataset": dataset.name, "image_size": None},
                                  model={"teacher_arch": arch},
                                  teacher={"epochs": 1, "batch_size": batch_size, "lr": 1e-3, "seed": seed})
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train_teacher_encoder(cfg.replace(output_dir=out), dataset, policy, OutputPaths(out), resume=False)
        return time.perf_counter() - started


def main() -> None:
    p = common.parser(__doc__)
    p.set_defaults(train_images=5000, test_images=10000)
    p.add_argument("--arch", default="resnet20", help="the teacher architecture")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="epochs timed for each loop (alternating)")
    args = p.parse_args()
    policy = common.setup(args)
    dataset = common.load_data(args).to(policy.device)
    began = time.perf_counter()
    common.banner("one teacher epoch: desupcon's loop vs a plain loop", policy, dataset)
    ours, plain = [], []
    for i in range(args.repeats):
        plain.append(plain_epoch(args.arch, dataset, args.batch_size, policy, i))
        ours.append(ours_epoch(args.arch, dataset, args.batch_size, policy, i))
    o, q = statistics.median(ours), statistics.median(plain)
    print(common.table(["loop", "seconds per epoch (median)", "all"],
                       [["desupcon (train_teacher_encoder)", f"{o:.2f}", " ".join(f"{t:.2f}" for t in ours)],
                        ["plain PyTorch", f"{q:.2f}", " ".join(f"{t:.2f}" for t in plain)],
                        ["ratio ours / plain", f"{o / q:.3f}", ""]]))
    common.footer(began)


if __name__ == "__main__":
    main()
