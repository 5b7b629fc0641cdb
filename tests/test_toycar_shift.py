"""benchmarks/toycar_shift.py: the real folder's layout of section 00 reaches the generated clips'
names (the real folder's attribute values, each in its own domain) and the generator's own layout
is back after the block, even when the block fails."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import toycar_shift  # noqa: E402  (benchmarks/ is not a package)
from pipelines.synth.generate import PRESETS, generate  # noqa: E402
from pipelines.synth.machines import MACHINES  # noqa: E402


def _values(root: Path, domain: str, key: str) -> set[str]:
    names = [p.stem for p in root.glob(f"dev_data/ToyCar/*/section_00_{domain}_*.wav")]
    return {n.split(f"_{key}_")[1].split("_")[0] for n in names}


def test_real_layout_reaches_the_clip_names_and_is_undone(tmp_path):
    kept = MACHINES["ToyCar"].specs
    preset = replace(PRESETS["demo"], machines=("ToyCar",), dev_sections=("00",), source_train=9, target_train=4,
                     test_per_group=4, seconds=0.2)
    with toycar_shift.toy_car_section_00(toycar_shift.REAL_LAYOUT):
        generate(preset, tmp_path, seed=0, workers=1)
    assert MACHINES["ToyCar"].specs == kept
    assert _values(tmp_path, "source", "car") == {"B1", "C1", "D1"} and _values(tmp_path, "source", "mic") == {"1"}
    assert _values(tmp_path, "source", "spd") == {"31V", "34V", "40V"}
    assert _values(tmp_path, "target", "car") == {"A1", "E1"} and _values(tmp_path, "target", "mic") == {"2"}
    assert _values(tmp_path, "target", "spd") == {"28V", "37V"}
    with pytest.raises(RuntimeError), toycar_shift.toy_car_section_00(toycar_shift.REAL_CARS):
        assert MACHINES["ToyCar"].specs[0] is toycar_shift.REAL_CARS
        raise RuntimeError
    assert MACHINES["ToyCar"].specs == kept
