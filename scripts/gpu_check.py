"""Short `paper`-shaped runs on a GPU (ResNet-50 -> ResNet-18, 32x32, 100 classes, synthetic data):
eager, with --cuda-graphs, with --compile and with --compile-mode reduce-overhead, and one lockstep
group (the Python loop, then --fused-lockstep, then both with --cuda-graphs); prints images/s,
seconds per epoch, peak GPU memory and the last epoch's test accuracy as a table. Run through
scripts/gpu_check.sh on a machine with CUDA."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from desupcon.config import preset  # noqa: E402
from desupcon.session import Session  # noqa: E402


def synthetic_cifar100(folder: Path, n_train: int, n_test: int) -> str:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=(np.arange(n) % 100).astype(np.int64))
    return f"npz:{folder}"


def measure(label: str, session: Session, cfgs, images_per_epoch: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    results = session.run_many(cfgs, force=True)
    torch.cuda.synchronize()
    total = time.perf_counter() - started
    trained = [r for r in results if not r.cached]
    if len(trained) != len(cfgs):  # a cached run would inflate images/s: every run must train here
        raise RuntimeError(f"{label}: {len(cfgs) - len(trained)} of {len(cfgs)} runs came from the cache")
    last_epoch = max(r.log[-1].get("group_seconds", r.log[-1]["seconds"]) for r in trained)
    return {"run": label, "students": len(trained), "seconds (all epochs)": total,
            "seconds/epoch (last)": last_epoch,
            "images/s (last epoch, all students)": images_per_epoch / last_epoch * len(trained),
            "peak GPU MB": torch.cuda.max_memory_allocated() / 2**20,
            # the same seeds in every row: graphed and fused rows should land where the eager ones do
            "last-epoch test acc (mean)": sum(r.log[-1]["test_acc"] for r in trained) / len(trained)}


def measured(label: str, session: Session, cfgs, images_per_epoch: int) -> dict:
    """`measure`, or a row saying why it failed (the other rows of a short GPU session still count)."""
    try:
        return measure(label, session, cfgs, images_per_epoch)
    except Exception as exc:  # noqa: BLE001  (any failure is the row's finding)
        traceback.print_exc()
        return {"run": label, "students": len(cfgs), "seconds (all epochs)": f"FAILED: {type(exc).__name__}: {exc}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the two --compile runs (a minute each)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = synthetic_cifar100(Path(tmp), args.train_images, 2000)
        base = preset("paper").replace(
            data={"dataset": dataset}, model={"teacher_weights": None},
            teacher={"epochs": 1, "probe_epochs": 1}, optim={"epochs": args.epochs},
            output_dir=str(Path(tmp) / "out"), device="cuda")
        session = Session(base, analyze=False)
        print(f"GPU: {torch.cuda.get_device_name()}  policy: {session.policy.describe()}")
        session.teacher()
        lw = base.replace(method={"method": "lw-supcrd"})
        rows.append(measured("LW-SupCRD eager", session, [lw], args.train_images))
        graphed = Session(lw.replace(cuda_graphs=True), analyze=False)
        graphed._dataset, graphed._teacher = session._dataset, session._teacher
        rows.append(measured("LW-SupCRD --cuda-graphs", graphed, [lw.replace(cuda_graphs=True)], args.train_images))
        if not args.no_compile:
            compiled = Session(lw.replace(compile=True), analyze=False)
            compiled._dataset, compiled._teacher = session._dataset, session._teacher
            rows.append(measured("LW-SupCRD --compile", compiled, [lw.replace(compile=True)], args.train_images))
            # torch.compile's own CUDA graphs (the student only), against --cuda-graphs (the whole step)
            overhead = lw.replace(compile=True, compile_mode="reduce-overhead")
            reduced = Session(overhead, analyze=False)
            reduced._dataset, reduced._teacher = session._dataset, session._teacher
            rows.append(measured("LW-SupCRD --compile-mode reduce-overhead", reduced, [overhead], args.train_images))
        # alpha 1.0 is the eager run above, which `force` retrains only once per session
        group = [lw.replace(method={"alpha": a}) for a in (0.5, 2.0, 5.0, 10.0)]
        rows.append(measured("alpha sweep, 4 in lockstep", session, group, args.train_images))
        fused = Session(lw.replace(fused_lockstep=True), analyze=False)
        fused._dataset, fused._teacher = session._dataset, session._teacher
        rows.append(measured("alpha sweep, 4 in fused lockstep", fused,
                            [c.replace(fused_lockstep=True) for c in group], args.train_images))
        both = Session(lw.replace(fused_lockstep=True, cuda_graphs=True), analyze=False)
        both._dataset, both._teacher = session._dataset, session._teacher
        rows.append(measured("alpha sweep, 4 fused, --cuda-graphs", both,
                            [c.replace(fused_lockstep=True, cuda_graphs=True) for c in group], args.train_images))
    keys = max((list(r) for r in rows), key=len)
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.1f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                for k in keys) + " |")
    if any(isinstance(r["seconds (all epochs)"], str) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
