"""What the benchmark scripts share: where the real folder is read from, and which commit a result
was measured at."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the real DCASE 2023 ToyCar folder, read in place (never copied): ASD_REAL_TOYCAR_DIR, else
# ../shared/data/realtoycar beside the repository; scripts skip it when absent
REAL_TOYCAR = Path(os.environ.get("ASD_REAL_TOYCAR_DIR") or REPO.parent / "shared" / "data" / "realtoycar")


def commit_id() -> str:
    """The short commit, ``-dirty`` when code differs from it; result files a running benchmark
    rewrites (``benchmarks/results``) do not count, so a long run's later rows keep a clean id."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)benchmarks/results"], capture_output=True, text=True).stdout.strip()
    return f"{head}-dirty" if changed else head


def generate_recorded(preset, root: Path, seed: int) -> Path:
    """The synthetic tree of ``preset`` under ``root``, generated once. A benchmark measures what the
    generator makes now: a tree of other settings, or one made before trees recorded their settings
    (``synth.json``; the generator would keep its clips as they are), stops the run with one line."""
    from pipelines.synth.generate import GENERATION_RECORD, generate
    if (root / "dev_data").is_dir() and not (root / GENERATION_RECORD).is_file():
        raise SystemExit(f"{root} holds clips but no {GENERATION_RECORD} (an earlier generator made them); "
                         "remove the folder to generate it again")
    try:
        generate(preset, root, seed=seed)
    except ValueError as err:  # a tree of another seed or generator version
        raise SystemExit(str(err)) from None
    return root


def write_rows(path: Path, rows: dict) -> None:
    """A benchmark's rows as JSON, with the machine they were measured on (each row has its commit)."""
    path.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))


def read_rows(path: Path) -> dict:
    """The rows ``write_rows`` saved at ``path``; none when it is absent."""
    return json.loads(path.read_text())["rows"] if path.is_file() else {}


def publish(path: Path, text: str) -> None:
    """A benchmark's markdown report: written beside its rows and printed."""
    path.write_text(text)
    print(text)
