"""Detectors: the methods the pipeline trains and scores, chosen by name (``method:`` in the config).

A detector is one module defining a :class:`pipelines.detectors.base.Detector` subclass and
``DETECTOR`` (its instance); registering it is one line in :data:`MODULES`. Modules are imported
when a detector is first asked for, so that reading a config imports no training code.

- ``prototype``: the paper's method (pre-training with epoch prototypes + MPE, fine-tuning with
  balanced batches + NPE, Mahalanobis scoring per section);
- ``ae``: the official DCASE 2022 autoencoder baseline;
- ``knn``: the nearest training clip: the floor baseline (cosine distance of log-Mel statistics) and
  the default spectral kNN (standardised Euclidean distance of spectrum shapes).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from asd.contracts import META_FILE

# name -> module defining DETECTOR (the registry; the order is the order of --help and docs)
MODULES = {
    "prototype": "pipelines.detectors.prototype",
    "ae": "pipelines.detectors.ae",
    "knn": "pipelines.detectors.knn",
}
NAMES = tuple(MODULES)
# model directories written before meta.json named its detector carry only their stage
_DETECTOR_OF_STAGE = {"pretrain": "prototype", "finetune": "prototype", "ae": "ae", "knn": "knn"}


def get(name: str):
    """The registered detector called ``name``."""
    if name not in MODULES:
        raise ValueError(f"no detector {name!r}; registered: {', '.join(NAMES)}")
    # by name, on first use: the detector modules import pipelines.config, which imports this registry
    return importlib.import_module(MODULES[name]).DETECTOR


def name_in_meta(meta: dict) -> str:
    """The detector that wrote a model directory's ``meta.json``."""
    name = meta.get("detector") or _DETECTOR_OF_STAGE.get(meta.get("stage"))
    if name not in MODULES:
        raise ValueError(f"meta.json names no registered detector (detector={meta.get('detector')!r}, "
                         f"stage={meta.get('stage')!r})")
    return name


def of_model_dir(model_dir: str | Path):
    """The detector that trained the model in ``model_dir`` (from its ``meta.json``)."""
    return get(name_in_meta(json.loads((Path(model_dir) / META_FILE).read_text())))
