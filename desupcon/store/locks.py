"""One process trains a run: an advisory lock per run name beside its epoch checkpoint.

Two processes given the same output folder (two `sweep` commands, a sweep and a `train`) each
claim a run before training it; a run claimed elsewhere is waited for and then loaded from its
finished checkpoint (or, if the other process died, trained from its epoch checkpoint). Locks are
`fcntl` locks: released by the kernel when their process dies, so a kill never leaves a run
claimed. Where there is no `fcntl` (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunLock:
    """The claim on one run, held while it trains."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    def acquire(self, wait: bool) -> bool:
        """Claim the run; without `wait`, False at once when another process holds it."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self, finished: bool = False) -> None:
        """Give the claim up; a `finished` run's lock file is removed first (whoever takes the
        lock afterwards finds the finished checkpoint, so the file is no longer needed)."""
        if self._handle is None:
            return
        if finished:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):  # the folder goes when nothing else is in progress
                self.path.parent.rmdir()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
