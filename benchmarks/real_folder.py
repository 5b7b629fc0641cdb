"""Where the real DCASE 2023 ToyCar folder is read from (in place, never copied): ``ASD_REAL_TOYCAR_DIR``,
else ``../shared/data/realtoycar`` beside the repository. Scripts that use it skip it when absent."""

from __future__ import annotations

import os
from pathlib import Path

REAL_TOYCAR = Path(os.environ.get("ASD_REAL_TOYCAR_DIR")
                   or Path(__file__).resolve().parents[2] / "shared" / "data" / "realtoycar")
