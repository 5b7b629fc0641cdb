"""On-disk form of a trained embedding network: ``model.pt`` (a state dict, loadable with
``torch.load(weights_only=True)``) and ``meta.json`` (model and feature settings, the
attribute classes it was trained on, and how it was trained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from asd.contracts import META_FILE, MODEL_FILE
from asd.features import FeatureConfig
from asd.model import EmbeddingNet, ModelConfig



def save_model(directory: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write the unwrapped model's state dict and ``meta`` (must hold 'model' and 'features')."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    core = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_model(directory: str | Path, map_location: str = "cpu") -> tuple[EmbeddingNet, dict]:
    """Rebuild the network from ``meta.json`` and load its weights (weights_only=True)."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no {MODEL_FILE}: not a trained model directory")
    meta = load_meta(directory)
    model = EmbeddingNet(ModelConfig(**meta["model"]))
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location=map_location,
                                     weights_only=True))
    model.eval()
    return model, meta


def feature_config(meta: dict) -> FeatureConfig:
    return FeatureConfig(**meta["features"])


def copy_model(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, META_FILE):
        shutil.copy2(Path(src) / name, dst / name)
    return dst
