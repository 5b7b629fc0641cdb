"""Synthetic machine sounds laid out exactly like the DCASE 2022 Task 2 dataset.

``machines`` holds the sound models (pure numpy/scipy), ``generate`` the presets, the clip plan,
parallel generation and data drops, ``cli`` the ``asd synth`` command, and ``render`` the example
spectrogram figure. See docs/synthetic-data.md.
"""
