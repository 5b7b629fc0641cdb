"""Peak memory of a process tree (pipelines.monitor), against memory a child really touches.

Measured in a fresh interpreter: the pytest process may hold a Ray session whose workers come
and go, which would move the baseline by more than the allocation under test."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, subprocess, sys
from pipelines.monitor import PeakMemory, tree_rss
before = tree_rss()
with PeakMemory(period_s=0.02) as peak:
    # 300 MiB of touched pages in a child, held for half a second, then gone
    subprocess.run([sys.executable, "-c", "import time; x = b'\x01' * (300 << 20); time.sleep(0.5)"],
                   check=True)
print(json.dumps({"before": before, "peak": peak.peak, "after": tree_rss()}))
"""


def test_peak_includes_a_child_process():
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["peak"] - m["before"] > 250 * 2**20
    assert m["after"] - m["before"] < 100 * 2**20  # the child is gone: the peak is a peak, not a level
