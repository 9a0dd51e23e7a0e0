"""Every training log under an output folder as one table: epochs, last-epoch test accuracy (the
headline), the best epoch beside it, and seconds per epoch (the first epoch, which pays for cuDNN's
autotuning and any compilation, shown apart from the median of the others).

    python scripts/summarise_logs.py OUTPUT_DIR [--train-images N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarise(log: list[dict]) -> dict:
    last = log[-1]
    best = max(log, key=lambda e: e["test_acc"] if e.get("test_acc") is not None else float("-inf"))
    seconds = [e.get("group_seconds", e["seconds"]) for e in log]
    return {"epochs": last["epoch"], "test": last.get("test_acc"), "best": best.get("test_acc"),
            "best_epoch": best["epoch"], "first_s": seconds[0],
            "median_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "total_s": sum(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--train-images", type=int, default=None, help="images per epoch, to print images/s")
    args = p.parse_args()
    logs = sorted((Path(args.output_dir) / "json_results" / "training_logs").glob("*.json"))
    if not logs:
        sys.exit(f"summarise_logs: no training logs under {args.output_dir}/json_results/training_logs")
    rows = [(path.stem, summarise(json.loads(path.read_text()))) for path in logs]
    width = max(len(name) for name, _ in rows)
    rate = " images/s" if args.train_images else ""
    print(f"{'run':<{width}}  epochs  test (last)  best (epoch)  s/epoch first  s/epoch median  total s{rate}")

    def pct(v):
        return f"{v:.2f}%" if v is not None else "-"

    for name, s in rows:
        images = f" {args.train_images / s['median_s']:9.0f}" if args.train_images else ""
        print(f"{name:<{width}}  {s['epochs']:>6}  {pct(s['test']):>11}  {pct(s['best']):>7} ({s['best_epoch']:>3})"
              f"  {s['first_s']:>13.2f}  {s['median_s']:>14.2f}  {s['total_s']:>7.1f}{images}")


if __name__ == "__main__":
    main()
