"""Names shared across the project, defined once: the DCASE layout, section keys, attribute
classes, and the files of a model directory and of a scoring directory.

Everything that writes or reads one of these names imports it from here (the synthetic data
generator, discovery, the feature store, training, scoring, serving, the plots), so that a
change of layout is one edit. Plain values and tiny pure functions only: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# ----------------------------------------------------------------------------- the DCASE layout
DEV_DATA = "dev_data"
EVAL_DATA = "eval_data"
GROUND_TRUTH_DATA = "ground_truth_data"  # <wav>,<0 normal | 1 anomaly> per eval test clip
GROUND_TRUTH_DOMAIN = "ground_truth_domain"  # <wav>,<0 source | 1 target>, same file names
DOMAINS = ("source", "target")
SPLITS = ("train", "test")
LABELS = ("normal", "anomaly")


def section_id(section: str | int) -> str:
    """``3`` -> ``"03"``; a string id is kept as written (``"00"``, ``"A1"``)."""
    return f"{section:02d}" if isinstance(section, (int, np.integer)) else str(section)


def labelled_clip_name(section: str, domain: str, split: str, label: str, index: int,
                       attribute: str = "") -> str:
    """``section_<id>_<domain>_<split>_<label>_<index>[_<attribute string>].wav`` (dev, eval train)."""
    return (f"section_{section}_{domain}_{split}_{label}_{index:04d}"
            + (f"_{attribute}" if attribute else "") + ".wav")


def unlabelled_clip_name(section: str, index: int) -> str:
    """``section_<id>_test_<index>.wav``: an eval test clip, its label in the ground truth."""
    return f"section_{section}_test_{index:04d}.wav"


def score_file_name(machine: str, section: str | int) -> str:
    """``anomaly_score_<machine>_section_<XX>_test.csv``: the evaluator's score file."""
    return f"anomaly_score_{machine}_section_{section_id(section)}_test.csv"


def decision_file_name(machine: str, section: str | int) -> str:
    """``decision_result_<machine>_section_<XX>_test.csv``: the evaluator's decision file."""
    return f"decision_result_{machine}_section_{section_id(section)}_test.csv"


def ground_truth_file_name(machine: str, section: str | int) -> str:
    """``ground_truth_<machine>_section_<XX>_test.csv`` (same name in ``ground_truth_domain/``)."""
    return f"ground_truth_{machine}_section_{section_id(section)}_test.csv"


# ----------------------------------------------------------------------------- keys and classes
def section_key(machine: str, section: str) -> str:
    """``<machine>/section_<id>``: the key of one (machine type, section) everywhere a model,
    a threshold or a plot is kept per section."""
    return f"{machine}/section_{section}"


def split_section_key(key: str) -> tuple[str, str]:
    """``(machine, section)`` of a :func:`section_key` (machine names may hold ``_`` and ``/``)."""
    machine, _, section = key.rpartition("/section_")
    return machine, section


def attribute_class(machine: str, section: str, domain: str | None, attribute: str | None) -> str | None:
    """``machine/section/domain/attribute string``: the class the method learns; ``None`` for an
    unlabelled clip (no domain)."""
    if domain is None:
        return None
    return "/".join((machine, section, domain, attribute or ""))


def class_ids(keys: Iterable) -> dict:
    """Dense ids 0..C-1 over the sorted distinct class keys (``None`` is not a class): the one
    numbering of attribute classes used by the store, training and scoring."""
    return {k: i for i, k in enumerate(sorted({k for k in keys if k is not None and k == k}))}  # NaN != NaN


# ----------------------------------------------------------------------------- model and scoring files
MODEL_FILE = "model.pt"  # an embedding network's state dict (torch.load weights_only=True)
META_FILE = "meta.json"  # what a model directory holds and how it was trained ("detector" names it)
HISTORY_CSV = "history.csv"  # per-epoch metrics beside a trained model
SECTIONS_FILE = "sections.pt"  # per-section scoring backends (prototypes, precision, threshold)
SETTINGS_FILE = "scoring.json"  # how the scoring job embedded clips (what predictions repeat)
SCORES_FILE = "scores.csv"  # one row per scored test clip
SCORING_MODEL_DIR = "model"  # the network copied into a scoring directory
