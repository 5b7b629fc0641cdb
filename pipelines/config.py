"""One typed configuration for the whole pipeline: YAML files in configs/ plus CLI overrides.

A config is a tree of dataclasses. ``load_config("configs/demo.yaml", ["pretrain.epochs=3"])``
reads the YAML (which may ``extends:`` another file), applies ``section.key=value`` overrides
(values parsed as YAML), and type-checks every field; unknown keys are errors, not ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from asd.features import FeatureConfig
from asd.model import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    """Where the DCASE-layout data lives and whether to synthesise it first."""

    root: str = "data"  # folder holding dev_data/ (and eval_data/)
    synth_preset: str | None = None  # generate this synthetic preset when root has no dev_data/
    synth_seed: int = 0
    synth_eval: bool = False  # also generate eval_data/ + ground truth


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" or ray://... to join a cluster
    num_cpus: int | None = None  # local Ray only; None = all cores


@dataclass
class ExtractConfig:
    store: str = "features"  # Parquet feature store (relative paths are under run_dir)
    dtype: str = "float16"  # feature matrix element type in Parquet
    batch_size: int = 64  # clips per Ray Data batch
    concurrency: int | None = None  # parallel extraction workers; None = Ray's CPU count
    # Ray Data actor pool (each actor keeps a second shard queued) from this many pending clips;
    # fewer go to Ray Data tasks, which start faster. None: always tasks (docs/feature-store.md)
    actor_pool_min_clips: int | None = 4000


@dataclass
class TrainConfig:
    """Settings shared by both training stages."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    bf16: bool = True  # autocast to bfloat16 when on GPU
    channels_last: bool = False
    crop_frames: int = 64
    class_scope: str = "global"  # "global": one label space over all machines; "machine": per type
    threads_per_worker: int | None = None  # torch intra-op threads per worker
    max_failures: int = 1
    data_loading: str = "store"  # "store": each worker reads Parquet; "object_store": driver reads once
    seed: int = 0
    # batch-norm statistics of the global batch over all workers (asd.model.SyncedBatchNorm2d), so
    # that a config trains the same network on any number of workers; false: per-worker statistics
    sync_batchnorm: bool = True


@dataclass
class PretrainConfig:
    """Unified prototype framework with MPE (Sec. 2, 3.1.1). Paper: 120 epochs, lr 0.1/0.01/0.001."""

    enabled: bool = True
    epochs: int = 120
    lr: float = 0.1
    lr_milestones: list[int] = field(default_factory=lambda: [50, 90])
    lr_gamma: float = 0.1
    batch_size: int = 32  # the global batch, split over the workers
    min_steps: int | None = None  # at least this many optimizer steps in the stage (small data)
    momentum: float = 0.9
    weight_decay: float = 5e-5
    tau: float = 0.07
    mpe_ratio: float | None = 0.25  # None = without MPE
    mpe_per_class: int = 1  # sub-prototypes per class, redrawn every epoch
    # clip embeddings behind the epoch prototypes: the mean of crop-sized "windows" (hop half a
    # crop), as at test time, or one pass over the "whole" clip (measured: docs/method.md)
    prototype_embedding: str = "windows"

    def __post_init__(self) -> None:
        if self.prototype_embedding not in ("whole", "windows"):
            raise ValueError(f"pretrain.prototype_embedding must be 'whole' or 'windows', "
                             f"got {self.prototype_embedding!r}")


@dataclass
class FinetuneConfig:
    """Balanced sampling + NPE (Sec. 3.1.2, 3.2). Paper: 50 epochs, lr 0.01 then 0.001 after 30."""

    enabled: bool = True
    from_scratch: bool = False  # the paper's "Fine-tune (w/o pre-train)" row
    epochs: int = 50
    lr: float = 0.01
    lr_milestones: list[int] = field(default_factory=lambda: [30])
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    tau: float = 0.07
    n_classes: int = 10  # N attribute classes per batch
    k: int = 10  # K clips per class (the global N x K batch is split over the workers)
    batches_per_epoch: int | None = None  # None = ceil(n_clips / (N*K)); either is raised to reach min_steps
    min_steps: int | None = None  # at least this many optimizer steps in the stage (small data)
    npe_lambda: list[float] | None = field(default_factory=lambda: [0.25, 0.5])  # None = w/o NPE


@dataclass
class ScoreConfig:
    embedding: str = "windows"  # mean over "windows" of crop_frames, or the "whole" clip (docs/method.md)
    window_hop: int = 32
    covariance: str = "pooled"
    shrinkage: float | str = "ledoit-wolf"  # or a fixed ratio in [0, 1] (see asd.backend)
    threshold_quantile: float = 0.9
    batch_size: int = 32


@dataclass
class AEBaselineConfig:
    """The official DCASE 2022 autoencoder baseline (one model per machine type, input
    ``features.kind=librosa_logmel``); the defaults are the official recipe (docs/method.md)."""

    frames: int = 5
    hidden: int = 128
    bottleneck: int = 8
    epochs: int = 100
    batch_size: int = 512  # global: split over the Ray Train workers
    lr: float = 1e-3
    vectors_per_clip: int | None = None  # subsample training vectors per clip; None = all (official)
    validation_split: float = 0.1  # Keras': the last 10 % of the file-ordered vectors, never trained on


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in run_dir
    experiment: str = "asd-prototypes"
    registered_model: str = "asd-prototype"


@dataclass
class RetrainConfig:
    tolerance: float = 0.0  # promote if challenger >= champion - tolerance (official score)
    from_scratch: bool = False  # else fine-tune from the champion's weights
    lock_timeout_s: float = 0.0


METHODS = ("prototype", "ae", "knn")


@dataclass
class PipelineConfig:
    name: str = "demo"
    run_dir: str = "runs/demo"
    method: str = "prototype"  # "prototype" (the paper), "ae" (DCASE baseline) or "knn" (floor baseline)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ae: AEBaselineConfig = field(default_factory=AEBaselineConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")

    def path(self, p: str) -> Path:
        """A path from the config: absolute as is, relative ones under ``run_dir``."""
        return Path(p) if os.path.isabs(p) else Path(self.run_dir) / p

    def to_dict(self) -> dict:
        return to_dict(self)

    def digest(self, *sections: str) -> str:
        """Hash of the named sections (all when none): tells whether a stage's inputs changed."""
        d = self.to_dict()
        picked = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    pass


def to_dict(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj)))  # tuples -> lists, plain JSON types


def _coerce(tp, value, where: str):
    """Check/convert ``value`` to the annotated type ``tp`` (dataclass, Optional, list, tuple, scalars)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not
                                              (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("extends", None)
    if parent:
        data = _merge(_read_yaml((path.parent / parent).resolve()), data)
    return data


def resolve_config_path(name_or_path: str) -> Path:
    """``demo`` -> configs/demo.yaml; an existing path is used as is."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"no config file {name_or_path!r} (looked in {CONFIG_DIR})")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (value parsed as YAML) into a nested dict."""
    data = json.loads(json.dumps(data))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    data = _read_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    return from_dict(PipelineConfig, apply_overrides(data, overrides or []))


def add_config_arguments(parser) -> None:
    """The ``--config`` / ``--set`` pair every subcommand accepts."""
    parser.add_argument("--config", "-c", default="demo",
                        help="config name in configs/ or a YAML path (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set pretrain.epochs=3 (repeatable)")
