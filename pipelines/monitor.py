"""Peak memory of a piece of work: this process and every process it started (on a local Ray,
the GCS, raylet and workers are descendants of the driver), sampled on a background thread.

Summed RSS counts pages shared between processes (Ray's object store, shared libraries) once
per process, so it is an upper bound on the physical memory the work needs."""

from __future__ import annotations

import threading

import psutil


def tree_rss() -> int:
    """Bytes: RSS of this process plus all its descendants (processes that vanish are skipped)."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mib``: the largest :func:`tree_rss` seen."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def mib(self) -> float:
        return self.peak / 2**20

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss())
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> "PeakMemory":
        self.peak = tree_rss()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())
