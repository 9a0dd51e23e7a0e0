"""Experiment tracking: per-epoch scalars and final analysis metrics of every run, to TensorBoard
(`--tensorboard`, event files under `<output-dir>/tensorboard/<run>/`) and/or Weights & Biases
(`--wandb`, offline mode when there is no network). Both are optional dependencies; asking for one
that is not installed is a clear error before anything trains."""

from __future__ import annotations

import os
from pathlib import Path

from desupcon.errors import DesupconError


class TrackingUnavailableError(DesupconError, ImportError):
    """A tracker was asked for but its package is not installed."""


def check_available(tensorboard: bool, wandb: bool) -> None:
    if tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise TrackingUnavailableError("--tensorboard needs the tensorboard package: "
                                           "pip install tensorboard") from exc
    if wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise TrackingUnavailableError("--wandb needs the wandb package: pip install wandb") from exc


def _flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def wandb_run_id(name: str, output_dir: str | Path) -> str:
    """A W&B run id fixed by the run's name and output folder (W&B ids: at most 64 characters)."""
    import hashlib
    return hashlib.sha1(f"{Path(output_dir).resolve()}|{name}".encode()).hexdigest()[:24]


class RunTracker:
    """The trackers of one run. `epoch(entry)` after every epoch; `final(metrics)` once analysed."""

    def __init__(self, name: str, output_dir: str | Path, tensorboard: bool, wandb: bool, config: dict):
        self.name = name
        self._writer = self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard" / name))
        if wandb:
            import wandb as wandb_module
            if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
                os.environ["WANDB_MODE"] = "offline"  # no account or network: write locally, sync later
            # one W&B run per training run: the analysis afterwards reopens the training's run
            self._wandb = wandb_module.init(project="desupcon", name=name, id=wandb_run_id(name, output_dir),
                                            resume="allow", config=config, reinit=True, dir=str(Path(output_dir)))

    @property
    def active(self) -> bool:
        return self._writer is not None or self._wandb is not None

    def epoch(self, entry: dict) -> None:
        scalars = {"loss/total": entry["loss"], "accuracy/train": entry["train_acc"],
                   "accuracy/test": entry["test_acc"], "lr": entry["lr"], "seconds": entry["seconds"],
                   **{f"loss/{k}": v for k, v in entry.get("losses", {}).items()}}
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, entry["epoch"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({**scalars, "epoch": entry["epoch"]}, step=entry["epoch"])

    def final(self, metrics: dict) -> None:
        flat = {f"analysis/{k}": v for k, v in _flatten(metrics).items()}
        if self._writer is not None:
            for key, value in flat.items():
                self._writer.add_scalar(key, value, 0)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.summary.update(flat)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
