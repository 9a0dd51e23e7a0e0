"""Benchmark of desupcon.analysis.metrics: exact uniformity + class alignment on 10,000 x 64 embeddings.

Prints the time of `uniformity` + `alignment_class` (best of a few repeats, torch limited to 2
threads), the peak extra memory of one call, and the speed-up over a naive pure-Python pair loop.
The naive loop is too slow for 10,000 points (50 million pairs), so it is timed on a subset and
scaled by the pair-count ratio, which is exact for an O(N^2) loop with constant work per pair.

    python benchmarks/bench_analysis.py [--n 10000] [--dim 64] [--classes 100]
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from desupcon.analysis.metrics import DEFAULT_CHUNK_SIZE, alignment_class, uniformity  # noqa: E402


def naive_uniformity_and_alignment(z: list[list[float]], labels: list[int], t: float = 2.0):
    """One pass over all pairs i<j in plain Python floats, computing both metrics.

    A single loop shared by the two metrics is the faster (kinder) baseline.
    """
    exp_sum, pairs, same_sum, same_pairs = 0.0, 0, 0.0, 0
    for i, j in itertools.combinations(range(len(z)), 2):
        d = sum((a - b) ** 2 for a, b in zip(z[i], z[j]))
        exp_sum += math.exp(-t * d)
        pairs += 1
        if labels[i] == labels[j]:
            same_sum += d
            same_pairs += 1
    return math.log(exp_sum / pairs), same_sum / same_pairs if same_pairs else 0.0


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pair_count(n: int) -> int:
    return n * (n - 1) // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--naive-n", type=int, default=300, help="subset size for the naive loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    print(f"embeddings: {args.n} x {args.dim} float32, {args.classes} classes, torch threads "
          f"{torch.get_num_threads()}, chunk size {DEFAULT_CHUNK_SIZE} rows")

    # peak memory: ru_maxrss (kernel-tracked peak RSS; tracemalloc cannot see torch's
    # allocations), as the rise of the process peak during the first full-size call, after a tiny
    # warm-up call so torch's one-time start-up allocations are not counted
    uniformity(z[:100], chunk_size=16), alignment_class(z[:100], labels[:100])
    before = max_rss_mb()
    u, a = uniformity(z), alignment_class(z, labels)
    extra = max_rss_mb() - before
    print(f"uniformity {u:.6f}  alignment_class {a:.6f}")
    print(f"peak extra memory (getrusage ru_maxrss delta): {extra:.0f} MB "
          f"(process peak {max_rss_mb():.0f} MB)")

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        uniformity(z)
        mid = time.perf_counter()
        alignment_class(z, labels)
        times.append((mid - start, time.perf_counter() - mid))
    fast_u, fast_a = min(times, key=sum)
    fast = fast_u + fast_a
    print(f"vectorised: uniformity {fast_u:.3f} s + alignment_class {fast_a:.3f} s = {fast:.3f} s "
          f"(best of {args.repeats}; target < 2 s)")

    m = args.naive_n
    zs = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in z[:m].double().tolist()]
    ls = labels[:m].tolist()
    start = time.perf_counter()
    naive_u, naive_a = naive_uniformity_and_alignment(zs, ls)
    naive_small = time.perf_counter() - start
    ratio = pair_count(args.n) / pair_count(m)
    naive_full = naive_small * ratio
    diff_u = abs(naive_u - uniformity(z[:m]))
    diff_a = abs(naive_a - alignment_class(z[:m], labels[:m]))
    print(f"naive Python pair loop on {m} points ({pair_count(m):,} pairs): {naive_small:.3f} s; "
          f"same {m} points vectorised differ by {diff_u:.1e} (uniformity), {diff_a:.1e} (alignment)")
    print(f"naive scaled to {args.n} points by the pair-count ratio {ratio:,.1f} "
          f"({pair_count(args.n):,} pairs): {naive_full:.1f} s (estimated, not run)")
    print(f"speed-up: {naive_full / fast:,.0f}x (target >= 200x)")


if __name__ == "__main__":
    main()
