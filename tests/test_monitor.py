"""Peak memory of a process tree (pipelines.monitor), against memory a child really touches."""

from __future__ import annotations

import subprocess
import sys

from pipelines.monitor import PeakMemory, tree_rss


def test_peak_includes_a_child_process():
    before = tree_rss()
    with PeakMemory(period_s=0.02) as peak:
        # 300 MiB of touched pages in a child, held for half a second, then gone
        subprocess.run([sys.executable, "-c", "import time; x = b'\\x01' * (300 << 20); time.sleep(0.5)"],
                       check=True)
    assert peak.peak - before > 250 * 2**20
    assert tree_rss() - before < 100 * 2**20  # the child is gone: the peak is a peak, not a level
