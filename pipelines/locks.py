"""Exclusive, non-blocking file locks: one writer per store, one writing command per run directory.

``flock`` locks belong to the open file, so the kernel releases them when the holder dies,
even on ``kill -9``: a crashed command never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from pipelines.errors import UserError


class LockBusy(UserError):
    """Another live process holds the lock (a user error: one line, exit 2)."""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str):
    """Hold ``path`` locked for the block; raise ``LockBusy`` naming ``what`` and the holder's
    pid when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            fh.seek(0)
            holder = fh.read().split(" ")[0].strip() or "?"
            raise LockBusy(f"{what} is in use by another command (pid {holder}, lock {path}); "
                           "wait for it to finish") from err
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {time.time()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


RUN_LOCK = "run.lock"  # in a run directory: held by the one command that writes it


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """One command that writes a run directory at a time (``asd run``, ``train``, ``score`` and
    ``retrain`` train into and score from the same folders); a second one gets ``LockBusy``."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(exclusive_lock(Path(run_dir) / RUN_LOCK, f"run directory {run_dir}"))
    except OSError as err:  # read-only, or a file where the folder should be: one line, not a traceback
        raise UserError(f"run directory {run_dir}: cannot create its lock ({err.strerror}); "
                        "set run_dir to a folder you can write") from err
    with held:
        yield
