"""Where a run's artefacts live under an output folder (SPEC 8)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from desupcon.errors import InputFileError
from desupcon.store.checkpoint import check_writable


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
