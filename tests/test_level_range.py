"""benchmarks/level_range.py: the within-clip level range against a per-frame loop and a signal of
known levels, on a flat folder of clips and on a DCASE tree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import level_range  # noqa: E402  (benchmarks/ is not a package)

SR = 16000


def test_frame_levels_match_a_loop_and_a_step_spans_its_gain():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SR + 37).astype(np.float32)  # a partial last frame is dropped
    loop = [10 * np.log10(np.mean(x[i * 160:(i + 1) * 160].astype(np.float64) ** 2)) for i in range(len(x) // 160)]
    assert np.allclose(level_range.frame_levels_db(x, 160), loop)
    # a 1 kHz tone (whole cycles per frame: every frame the same level), half the clip 20 dB down
    t = np.arange(2 * SR) / SR
    tone = np.sin(2 * np.pi * 1000 * t) * np.where(t < 1.0, 1.0, 0.1)
    assert level_range.level_range_db(tone, SR) == pytest.approx(20.0, abs=1e-6)
    assert level_range.level_range_db(np.sin(2 * np.pi * 1000 * t), SR) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no 160-sample frame"):
        level_range.frame_levels_db(x[:100], 160)


def test_groups_of_a_flat_folder_and_of_a_tree(tmp_path):
    t = np.arange(SR) / SR
    flat = tmp_path / "clips"
    flat.mkdir()
    for i, gain in enumerate((1.0, 0.01)):  # the second clip: 40 dB between its halves
        sf.write(flat / f"c{i}.wav", np.sin(2 * np.pi * 500 * t) * np.where(t < 0.5, 1.0, gain) * 0.5, SR)
    rows = level_range.measure(flat)
    assert list(rows) == ["clips"] and rows["clips"]["clips"] == 2
    assert rows["clips"]["min dB"] == pytest.approx(0.0, abs=0.01)
    assert rows["clips"]["max dB"] == pytest.approx(40.0, abs=0.01)  # 16-bit rounding of the quiet half
    tree = tmp_path / "tree" / "dev_data"
    for machine, split in (("pump", "test"), ("pump", "train"), ("drill", "test")):
        (tree / machine / split).mkdir(parents=True)
        name = f"section_00_source_{split}_normal_0000_a_1.wav"
        sf.write(tree / machine / split / name, np.sin(2 * np.pi * 500 * t) * 0.5, SR)
    rows = level_range.measure(tmp_path / "tree")  # the tree's parent, as DCASE archives unpack
    assert sorted(rows) == ["drill", "pump"] and rows["pump"]["clips"] == 1
    assert level_range.measure(tmp_path / "tree", "all")["pump"]["clips"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no clips found"):
        level_range.measure(empty)
