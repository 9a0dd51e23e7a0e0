"""Forward + backward images/s of every zoo student on this machine, through desupcon's Student
wrapper against a plain eager call of the same encoder module.

Plain: `encoder(x)` -> cross-entropy -> backward. Wrapper: `Student(encoder)(x, needs=StageNeeds(final_map=True))`
(the final map, pooled features, the projector and the classifier, as the training step calls it)
-> the same cross-entropy plus 0 x the projection (so both backward passes reach the same
parameters) -> backward. Same weights, same batch, the two alternated within every repeat; median
of --repeats timed steps after --warmup steps. Random 32x32 inputs, 100 classes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401  (before torch: the OpenMP wait policy)
import torch
import torch.nn.functional as F

from desupcon.models import Student, StageNeeds, build_encoder
from desupcon.models.zoo import ZOO


def plain_step(encoder, x, y) -> None:
    loss = F.cross_entropy(encoder(x), y)
    encoder.zero_grad(set_to_none=True)
    loss.backward()


def wrapper_step(student, x, y) -> None:
    out = student(x, needs=StageNeeds(final_map=True))
    loss = F.cross_entropy(out.logits, y) + 0.0 * out.projection.sum()
    student.zero_grad(set_to_none=True)
    loss.backward()


def measure(arch: str, batch: int, warmup: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    student = Student(build_encoder(arch, 100)).train()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 100, (batch,))
    for _ in range(warmup):
        plain_step(student.encoder, x, y)
        wrapper_step(student, x, y)
    plain, wrapped = [], []
    for _ in range(repeats):
        for step, model, times in ((plain_step, student.encoder, plain), (wrapper_step, student, wrapped)):
            started = time.perf_counter()
            step(model, x, y)
            times.append(time.perf_counter() - started)
    return batch / statistics.median(plain), batch / statistics.median(wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ZOO), help="zoo architectures to measure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"forward + backward on the CPU ({torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"32x32, 100 classes; median of {args.repeats}")
    print(f"{'architecture':<13} {'parameters':>11} {'plain img/s':>12} {'Student img/s':>14} {'ratio':>7}")
    for arch in args.archs:
        plain, wrapped = measure(arch, args.batch_size, args.warmup, args.repeats)
        n = sum(p.numel() for p in build_encoder(arch, 100).parameters())
        print(f"{arch:<13} {n:>11,} {plain:>12.1f} {wrapped:>14.1f} {wrapped / plain:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
