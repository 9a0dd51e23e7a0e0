"""The records a run writes beside its checkpoint: its training log."""

from __future__ import annotations

from desupcon.store.checkpoint import atomic_write_json
from desupcon.store.paths import OutputPaths


def save_log(paths: OutputPaths, name: str, entries: list[dict]) -> None:
    atomic_write_json(paths.training_log(name), entries)
