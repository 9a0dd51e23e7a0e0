"""What the benchmark scripts share: their common options, the data, a random teacher, timing,
peak memory and tables. Not a benchmark itself.

Data: real CIFAR-10 from `../shared/data/cifar10` beside the repository (an npz folder) when it is
there, else scikit-learn's digits resized to 32x32; `--data` names any other (`digits`, `cifar10`,
`npz:<folder>` or a folder holding train.npz/test.npz).

Import this module before torch: it applies `--omp-wait-policy` (default passive) to the OpenMP
runtime, which reads OMP_WAIT_POLICY only when torch loads. On a 2-core machine shared with other
busy processes, spinning OpenMP threads stall torch's 2-thread parallel regions and small ops slow
down 10-100x; `--omp-wait-policy default` leaves the runtime's own (spinning) behaviour.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None

os.environ.setdefault("TQDM_DISABLE", "1")  # the training loop's progress bars would clutter the tables


def _omp_wait_policy_from_argv() -> str:
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--omp-wait-policy="):
            return arg.split("=", 1)[1]
        if arg == "--omp-wait-policy" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "passive"


if _omp_wait_policy_from_argv() in ("passive", "active"):
    os.environ.setdefault("OMP_WAIT_POLICY", _omp_wait_policy_from_argv().upper())

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from desupcon import data as data_mod  # noqa: E402
from desupcon.engine import devices  # noqa: E402
from desupcon.config import preset  # noqa: E402
from desupcon.models import Teacher, build_encoder  # noqa: E402

SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

def parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes (data, device, threads, OpenMP policy)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help=f"digits, cifar10, npz:<folder> or a folder with train.npz/test.npz (default: "
                        f"{SHARED_CIFAR10} when present, else digits)")
    p.add_argument("--image-size", type=int, default=None, help="resize every image (digits default to 32)")
    p.add_argument("--train-images", type=int, default=2048, help="training images used (a seeded subset)")
    p.add_argument("--test-images", type=int, default=256, help="test images used (a seeded subset)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "default"), default="passive",
                   help="OMP_WAIT_POLICY for this process unless already set in the environment")
    return p


def add_run_options(p: argparse.ArgumentParser, batch_size: int = 32) -> None:
    """The run being timed: preset, method and architectures, batch size."""
    p.add_argument("--preset", choices=("quick", "paper"), default="paper",
                   help="architectures and optimiser settings come from this preset")
    p.add_argument("--method", default="lw-supcrd", choices=("ce", "supcon", "crd", "lw-supcrd", "hybrid"),
                   help="the training method timed")
    p.add_argument("--bank-size", type=int, default=0, help="memory-bank rows per step (0: none)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (two views each)")
    p.add_argument("--teacher-arch", help="default: the preset's")
    p.add_argument("--student-arch", help="default: the preset's")


def setup(args) -> devices.DevicePolicy:
    """Threads and the device policy the training loop would choose for this device."""
    torch.set_num_threads(args.threads)
    return devices.DevicePolicy.choose(devices.select_device(args.device))


# ----------------------------------------------------------------------------------------------
# Data, configuration, teacher
# ----------------------------------------------------------------------------------------------

def dataset_name(data: str | None) -> str:
    if data is None:
        return f"npz:{SHARED_CIFAR10}" if (SHARED_CIFAR10 / "train.npz").is_file() else "digits"
    if Path(data).is_dir():
        return f"npz:{Path(data).resolve()}"
    return data


def load_data(args) -> data_mod.ImageDataset:
    dataset = data_mod.load_dataset(dataset_name(args.data), image_size=args.image_size)
    return data_mod.subsample(dataset, args.train_images, args.test_images, seed=0)


def make_cfg(args, dataset):
    cfg = preset(args.preset).replace(data={"dataset": dataset.name, "image_size": None})
    model = {"teacher_arch": args.teacher_arch or cfg.model.teacher_arch,
             "student_arch": args.student_arch or cfg.model.student_arch}
    return cfg.replace(model=model, method={"method": args.method, "bank_size": args.bank_size},
                       optim={"batch_size": args.batch_size}, device=args.device)


def make_teacher(arch: str, num_classes: int, policy: devices.DevicePolicy, seed: int = 0) -> Teacher:
    """A randomly initialised teacher: timing does not depend on its weights."""
    torch.manual_seed(seed)
    return policy.prepare(Teacher(build_encoder(arch, num_classes))).eval()


# ----------------------------------------------------------------------------------------------
# Timing, memory, output
# ----------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def banner(title: str, policy: devices.DevicePolicy, dataset=None) -> None:
    """What runs where: the first lines of every benchmark's output."""
    print(f"{title}: device {policy.describe()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"1-min load at start {load_average():.2f}")
    if dataset is not None:
        print(f"data: {dataset.name}, {len(dataset.train_labels):,} training images "
              f"{dataset.image_size}x{dataset.image_size} (subset), {dataset.num_classes} classes")


def footer(began: float) -> None:
    print(f"\ntotal benchmark time {time.perf_counter() - began:.0f} s; 1-min load at end {load_average():.2f}")


class PeakRSS:
    """Peak resident memory of a code region in this process.

    Linux: the kernel's peak RSS (VmHWM), reset through /proc/self/clear_refs on entry, minus the
    RSS on entry. Elsewhere: the rise of getrusage ru_maxrss, which only shows a region that
    beats the process's earlier peak.
    """

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM (reset on entry) minus RSS on entry"
            self.start = self._status_kb("VmRSS") * 1024
        except (OSError, TypeError):
            self.how = "getrusage ru_maxrss delta"
            self.start = self._max_rss()
        return self

    @staticmethod
    def _max_rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if resource else float("nan")

    def __exit__(self, *exc):
        hwm = self._status_kb("VmHWM") if self.how.startswith("VmHWM") else None
        peak = hwm * 1024 if hwm is not None else self._max_rss()
        self.extra_mb = (peak - self.start) / 2**20


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def header(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 96 - len(title)))
