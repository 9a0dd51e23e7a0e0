"""What teacher and student runs share: output folders, the dataset, accuracy, RNG state,
finiteness guards, epoch checkpoints and the run cache."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from desupcon import data as data_mod
from desupcon.store.checkpoint import CheckpointError, atomic_write_json, check_writable, load_checkpoint
from desupcon.config import RunConfig
from desupcon.engine.devices import as_policy
from desupcon.errors import DesupconError, InputFileError

log = logging.getLogger("desupcon")

EVAL_BATCH = 512


class NonFiniteLossError(DesupconError, RuntimeError):
    """Training produced NaN/inf; the message names the run, epoch and step."""

    def __init__(self, message: str, name: str = "", epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.name, self.epoch, self.step = name, epoch, step


@dataclass
class OutputPaths:
    """SPEC section 8 layout under one root."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def models(self) -> Path:
        return self.root / "pth_models"

    @property
    def results(self) -> Path:
        return self.root / "json_results"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def checkpoint(self, name: str) -> Path:
        return self.models / f"{name}.pth"

    def partial_checkpoint(self, name: str) -> Path:
        """The epoch checkpoint of a run in progress; replaced by the final one."""
        return self.models / "in_progress" / f"{name}.pth"

    def run_lock(self, name: str) -> Path:
        """The lock a process holds while it trains the run (run_locks.py)."""
        return self.models / "in_progress" / f"{name}.lock"

    def training_log(self, name: str) -> Path:
        return self.results / "training_logs" / f"{name}.json"


def saved_run_path(run: str, output_dir) -> Path:
    """A checkpoint file given as a path or as a run name under `output_dir`/pth_models."""
    path = Path(run)
    if not path.is_file():
        path = OutputPaths(output_dir).checkpoint(run)
    if not path.is_file():
        raise InputFileError(f"{run}: neither a checkpoint file nor a run name with a checkpoint in "
                             f"{OutputPaths(output_dir).models}")
    return path


def check_output_dirs(paths: OutputPaths) -> None:
    """Fail before any training when the outputs could not be written."""
    for folder in (paths.models, paths.results):
        check_writable(folder)


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
                      dataset: data_mod.ImageDataset, policy) -> float:
    """Top-1 accuracy in percent; `logits_fn(normalised_batch) -> logits`."""
    policy = as_policy(policy)
    correct = torch.zeros((), dtype=torch.long, device=policy.device)
    for x, y in data_mod.eval_batches(images, labels, EVAL_BATCH, dataset.mean, dataset.std):
        with policy.autocast():
            logits = logits_fn(policy.inputs(x))
        correct += (logits.argmax(1) == y).sum()
    return 100.0 * correct.item() / max(labels.shape[0], 1)


def summary_line(name: str, entry: dict, epochs: int) -> str:
    test = f" test {entry['test_acc']:.2f}%" if entry.get("test_acc") is not None else ""
    return (f"[{name}] epoch {entry['epoch']}/{epochs} loss {entry['loss']:.4f} "
            f"train {entry['train_acc']:.2f}%{test} lr {entry['lr']:.2e} {entry['seconds']:.1f}s")


def save_log(paths: OutputPaths, name: str, entries: list[dict]) -> None:
    atomic_write_json(paths.training_log(name), entries)


def global_rng_state() -> dict:
    """torch, numpy and python global RNG states as plain data (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


LIKELY_CAUSES = ("Likely causes: learning rate too high (--lr), temperature too small "
                 "(--temperature), or a large alpha (--alpha).")


def non_finite_error(name: str, what: str, epoch: int, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(f"run {name}: non-finite {what} at epoch {epoch}, step {step}. "
                              f"{LIKELY_CAUSES}", name, epoch, step)


def check_finite(value: torch.Tensor, name: str, epoch: int, step: int, what: str = "loss") -> None:
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        shown = f" ({float(value)})" if value.numel() == 1 else ""
        raise non_finite_error(name, f"{what}{shown}", epoch, step)


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A device bool: every gradient of the optimiser's parameters is finite (no host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    # The max-norm is finite iff every element is (NaN propagates; no overflow as with the 2-norm).
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()


def params_finite(modules) -> bool:
    tensors = [t for m in modules if m is not None for t in m.state_dict().values()
               if t.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


def load_partial(path: Path, identity: dict, name: str) -> dict | None:
    """The epoch checkpoint of a run in progress, if there is one of this configuration."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, expected_kind="in_progress")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. It is the epoch checkpoint of run {name} in progress: delete "
                              "it, or rerun with --no-resume to start this run over") from exc
    if state.get("identity") != identity:
        log.warning(f"[{name}] ignoring an epoch checkpoint of another configuration ({path})")
        return None
    return state


def with_kept_state(exc: NonFiniteLossError, partial: Path, last_good_epoch: int) -> NonFiniteLossError:
    """The error, completed with where the last good state of the run is."""
    if last_good_epoch >= 1 and partial.is_file():
        kept = (f"The last good state (after epoch {last_good_epoch}) is kept in {partial}; nothing "
                "non-finite was saved.")
    else:
        kept = "No epoch of this run had finished, so nothing was saved for it."
    return NonFiniteLossError(f"{exc} {kept}", exc.name, exc.epoch, exc.step)


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return out


def remove_partial(paths: OutputPaths, name: str) -> None:
    """The final checkpoint replaces the epoch checkpoint of a run in progress."""
    paths.partial_checkpoint(name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only removed when no other run is in progress
        paths.partial_checkpoint(name).parent.rmdir()
