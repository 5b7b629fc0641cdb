"""benchmarks/spectral_variants.py: 2 s segment scoring of a section with one training clip against
sklearn's cosine distances."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics.pairwise import cosine_distances

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import spectral_variants  # noqa: E402  (benchmarks/ is not a package)


def test_segments_of_a_section_with_one_training_clip_score_their_plain_nearest_cosine_distance():
    frames = 3 * spectral_variants.SEGMENT_FRAMES
    rng = np.random.default_rng(2)
    train = [{"x": torch.from_numpy(rng.normal(size=(16, frames)))}]
    test = [{"x": torch.from_numpy(rng.normal(size=(16, frames)))} for _ in range(4)]

    def f(s):
        return s.mean(dim=1)
    got = spectral_variants.segment_scores(train, test, "x", f)
    ref = np.stack([f(s).numpy() for s in spectral_variants.segments(train[0]["x"])])
    want = [cosine_distances(np.stack([f(s).numpy() for s in spectral_variants.segments(c["x"])]), ref).min(axis=1).mean()
            for c in test]
    assert np.all(np.isfinite(got)) and np.allclose(got, want)
