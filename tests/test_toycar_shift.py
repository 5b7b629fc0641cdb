"""benchmarks/toycar_shift.py: the real folder's layout of section 00 reaches the generated clips'
names (the real folder's attribute values, each in its own domain), a car run within the clip
reaches its sound, and the generator's own layout and run are back after the block, even when the
block fails."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

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
    with toycar_shift.toy_car(toycar_shift.REAL_LAYOUT, None):
        generate(preset, tmp_path, seed=0, workers=1)
    assert MACHINES["ToyCar"].specs == kept
    assert _values(tmp_path, "source", "car") == {"B1", "C1", "D1"} and _values(tmp_path, "source", "mic") == {"1"}
    assert _values(tmp_path, "source", "spd") == {"31V", "34V", "40V"}
    assert _values(tmp_path, "target", "car") == {"A1", "E1"} and _values(tmp_path, "target", "mic") == {"2"}
    assert _values(tmp_path, "target", "spd") == {"28V", "37V"}
    with pytest.raises(RuntimeError), toycar_shift.toy_car(toycar_shift.REAL_CARS, toycar_shift.REAL_RUN):
        assert MACHINES["ToyCar"].specs[0] is toycar_shift.REAL_CARS
        assert MACHINES["ToyCar"].run == toycar_shift.REAL_RUN
        raise RuntimeError
    assert MACHINES["ToyCar"].specs == kept and MACHINES["ToyCar"].run is None


def _level_db(wave: np.ndarray, lo: float, hi: float) -> float:
    part = wave[int(lo * len(wave)):int(hi * len(wave))]
    return 10 * np.log10(np.mean(part.astype(np.float64) ** 2))


def test_a_car_run_within_the_clip_is_quiet_before_it_starts_and_after_it_stops(tmp_path):
    """The first 6 % of a clip (before the earliest start, 7.5 %) and its last 12 % (after the
    latest stop plus the fall, 87.6 %) hold only the background: 13 dB under the running car here
    (20 dB machine-to-background before the microphone path, no background events). The car
    running through the clip has no such dip (within 0.4 dB)."""
    preset = replace(PRESETS["demo"], machines=("ToyCar",), dev_sections=("00",), source_train=4, target_train=1,
                     test_per_group=1, seconds=2.0, snr_db=(20.0, 20.0),
                     difficulty=replace(PRESETS["demo"].difficulty, events_per_s=0.0))
    with toycar_shift.toy_car(None, toycar_shift.REAL_RUN):
        generate(preset, tmp_path / "run", seed=0, workers=1)
    generate(preset, tmp_path / "through", seed=0, workers=1)
    for kind, dip in (("run", True), ("through", False)):
        paths = sorted((tmp_path / kind).glob("dev_data/ToyCar/train/*.wav"))
        assert len(paths) == 5, paths  # 4 source and 1 target training clips
        for path in paths:
            wave, _ = sf.read(path, dtype="float32")
            middle = _level_db(wave, 0.45, 0.6)
            quiet = max(_level_db(wave, 0.0, 0.06), _level_db(wave, 0.88, 1.0))
            assert (middle - quiet > 10.0) == dip, (kind, path.name, middle, quiet)
