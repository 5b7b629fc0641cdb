"""One typed configuration for the whole pipeline: YAML files in configs/ plus CLI overrides.

A config is a tree of dataclasses. ``load_config("configs/demo.yaml", ["pretrain.epochs=3"])``
reads the YAML (which may ``extends:`` another file), applies ``section.key=value`` overrides
(values parsed as YAML), and validates every field with pydantic: types (strict: ``"3"`` is not
an int), ranges, enumerated options and the rules between fields. Unknown keys are errors, not
ignored. Every problem is reported as one :class:`ConfigError` line naming the dotted key, e.g.
``pretrain.lr: must be > 0 (got -0.1)``, before Ray or MLflow start.

The sections are pydantic dataclasses (plain dataclasses to the rest of the code:
``dataclasses.asdict``/``replace`` work, and construction validates). ``features`` and ``model``
are the dataclasses of asd/, which stays free of pydantic: their rules live here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, GetPydanticSchema, PlainValidator,
                      Strict, TypeAdapter, ValidationError, model_validator)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError, core_schema

from asd.backend import COVARIANCE_MODES
from asd.features import FEATURE_KINDS, FeatureConfig
from asd.model import STEMS, ModelConfig
from pipelines import detectors
from pipelines.errors import UserError
from pipelines.store import FEATURE_DTYPES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConfigError(UserError, ValueError):
    """A config file, override or value that cannot be used: one line naming the key."""


# ----------------------------------------------------------------------------- field types
def _exponent_float(value):
    """PyYAML (YAML 1.1) reads ``1e-4`` (no dot) as a string: take it as the float it means."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


# strict scalars, as YAML types them: "3" is not an int, 3.0 is not an int, true is not 1
# (an int is a valid float, and so is 1e-4)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), BeforeValidator(_exponent_float)]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict(), Field(min_length=1)]
PositiveInt = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
UnitFraction = Annotated[Float, Field(ge=0, le=1)]  # [0, 1]
PositiveFraction = Annotated[Float, Field(gt=0, le=1)]  # (0, 1]
Momentum = Annotated[Float, Field(ge=0, lt=1)]  # [0, 1)
# 0 epochs: the stage's initial network is its model (pipelines/detectors/prototype.py, the untrained reference)
Epochs = NonNegativeInt


def _increasing(values: list[int]) -> list[int]:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("must be strictly increasing")
    return values


def _ordered_pair(values: list[float]) -> list[float]:
    if values[0] > values[1]:
        raise ValueError("must be [lo, hi] with lo <= hi")
    return values


def _shrinkage(value):
    """A fixed ratio in [0, 1] or the data-driven ``"ledoit-wolf"`` (asd.backend.shrink_covariance)."""
    value = _exponent_float(value)
    if value == "ledoit-wolf":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ValueError("must be a number in [0, 1] or 'ledoit-wolf'")


Milestones = Annotated[list[PositiveInt], AfterValidator(_increasing)]
NpeLambda = Annotated[list[UnitFraction], Field(min_length=2, max_length=2), AfterValidator(_ordered_pair)]
Shrinkage = Annotated[float | str, PlainValidator(_shrinkage)]


def _rule(key: str, message: str) -> PydanticCustomError:
    """A rule between fields, reported at ``key`` (dotted, below the dataclass that checks it)."""
    return PydanticCustomError("config_rule", message, {"key": key})


def _asd_section(cls: type, rules: dict[str, object]):
    """``cls`` (a dataclass of asd/) validated with ``rules`` (field -> annotated type) and
    unknown keys rejected; fields without a rule keep their own annotation."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    checked = dataclass(config=SECTION)(dataclasses.make_dataclass(cls.__name__, [
        (f.name, rules.get(f.name, hints[f.name]), field(default=f.default, default_factory=f.default_factory))
        for f in fields]))

    def values(obj) -> dict:
        return {f.name: getattr(obj, f.name) for f in fields}

    def schema(_source, handler):  # an instance of cls (dataclasses.replace) is checked as its values
        return core_schema.no_info_before_validator_function(
            lambda v: values(v) if isinstance(v, cls) else v,
            core_schema.no_info_after_validator_function(lambda v: cls(**values(v)), handler(checked)))

    return Annotated[cls, GetPydanticSchema(schema)]


FEATURE_RULES = {
    "kind": Literal[FEATURE_KINDS], "sample_rate": PositiveInt, "n_fft": PositiveInt,
    "hop_length": PositiveInt, "n_mels": PositiveInt, "log_floor": PositiveFloat,
    "resample": Literal["resample", "reject"], "channels": Literal["downmix", "reject"],  # asd.audio
    "min_frames": PositiveInt,
}
MODEL_RULES = {
    "width": PositiveInt, "embedding_dim": PositiveInt, "stem": Literal[STEMS],
    "blocks": Annotated[tuple[PositiveInt, ...], Field(min_length=1)], "attention_dim": PositiveInt,
    "n_mels": PositiveInt,
}
Features = _asd_section(FeatureConfig, FEATURE_RULES)
Model = _asd_section(ModelConfig, MODEL_RULES)


# ----------------------------------------------------------------------------- sections
@dataclass(config=SECTION)
class DataConfig:
    """Where the DCASE-layout data lives and whether to synthesise it first."""

    root: Text = "data"  # folder holding dev_data/ (and eval_data/)
    synth_preset: Text | None = None  # generate this synthetic preset when root has no dev_data/
    synth_seed: NonNegativeInt = 0
    synth_eval: Bool = False  # also generate eval_data/ + ground truth

    @model_validator(mode="after")
    def _known_preset(self):
        # deferred: the generator (0.5 s) only when a preset is named; every Ray worker reads configs
        from pipelines.synth.generate import PRESETS

        if self.synth_preset is not None and self.synth_preset not in PRESETS:
            raise _rule("synth_preset", f"must be one of {', '.join(PRESETS)} or null (got {self.synth_preset!r})")
        return self


@dataclass(config=SECTION)
class RayConfig:
    address: Text | None = None  # None: start a local Ray; "auto" or ray://... to join a cluster
    num_cpus: PositiveInt | None = None  # local Ray only; None = all cores


@dataclass(config=SECTION)
class ExtractConfig:
    store: Text = "features"  # Parquet feature store (relative paths are under run_dir)
    dtype: Literal[FEATURE_DTYPES] = "float16"  # feature matrix element type in Parquet
    batch_size: PositiveInt = 64  # clips per Ray Data batch
    concurrency: PositiveInt | None = None  # parallel extraction workers; None = Ray's CPU count
    # Ray Data actor pool (each actor keeps a second shard queued) from this many pending clips;
    # fewer go to Ray Data tasks, which start faster. None: always tasks (docs/feature-store.md)
    actor_pool_min_clips: NonNegativeInt | None = 4000


@dataclass(config=SECTION)
class TrainConfig:
    """Settings shared by both training stages."""

    num_workers: PositiveInt = 1
    cpus_per_worker: PositiveFloat = 1.0
    use_gpu: Bool = False
    bf16: Bool = True  # autocast to bfloat16 when on GPU
    channels_last: Bool = False
    crop_frames: PositiveInt = 64
    threads_per_worker: PositiveInt | None = None  # torch intra-op threads per worker
    max_failures: Annotated[Int, Field(ge=-1)] = 1  # Ray Train FailureConfig: -1 = retry forever
    # "store": each worker reads Parquet; "object_store": driver reads once
    data_loading: Literal["store", "object_store"] = "store"
    seed: NonNegativeInt = 0
    # batch-norm statistics of the global batch over all workers (asd.model.SyncedBatchNorm2d), so
    # that a config trains the same network on any number of workers; false: per-worker statistics
    sync_batchnorm: Bool = True


def _schedule_fits(stage):
    """An lr milestone at or past the last epoch never applies: the schedule was meant for more
    epochs (a 0-epoch stage trains nothing, so has no schedule)."""
    if stage.epochs and stage.lr_milestones and stage.lr_milestones[-1] >= stage.epochs:
        raise _rule("lr_milestones", f"must all be < epochs ({stage.epochs}): lower them or raise "
                                     f"epochs (got {stage.lr_milestones})")
    return stage


@dataclass(config=SECTION)
class PretrainConfig:
    """Unified prototype framework with MPE (Sec. 2, 3.1.1). Paper: 120 epochs, lr 0.1/0.01/0.001."""

    enabled: Bool = True
    epochs: Epochs = 120
    lr: PositiveFloat = 0.1
    lr_milestones: Milestones = field(default_factory=lambda: [50, 90])
    lr_gamma: PositiveFraction = 0.1
    batch_size: PositiveInt = 32  # the global batch, split over the workers
    min_steps: PositiveInt | None = None  # at least this many optimizer steps in the stage (small data)
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 5e-5
    tau: PositiveFloat = 0.07
    mpe_ratio: PositiveFraction | None = 0.25  # None = without MPE
    mpe_per_class: PositiveInt = 1  # sub-prototypes per class, redrawn every epoch
    # clip embeddings behind the epoch prototypes: the mean of crop-sized "windows" (hop half a
    # crop), as at test time, or one pass over the "whole" clip (measured: docs/method.md)
    prototype_embedding: Literal["windows", "whole"] = "windows"

    _schedule = model_validator(mode="after")(_schedule_fits)


@dataclass(config=SECTION)
class FinetuneConfig:
    """Balanced sampling + NPE (Sec. 3.1.2, 3.2). Paper: 50 epochs, lr 0.01 then 0.001 after 30."""

    enabled: Bool = True
    from_scratch: Bool = False  # the paper's "Fine-tune (w/o pre-train)" row
    epochs: Epochs = 50
    lr: PositiveFloat = 0.01
    lr_milestones: Milestones = field(default_factory=lambda: [30])
    lr_gamma: PositiveFraction = 0.1
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 5e-5
    tau: PositiveFloat = 0.07
    n_classes: PositiveInt = 10  # N attribute classes per batch
    k: PositiveInt = 10  # K clips per class (the global N x K batch is split over the workers)
    # None = ceil(n_clips / (N*K)); either is raised to reach min_steps
    batches_per_epoch: PositiveInt | None = None
    min_steps: PositiveInt | None = None  # at least this many optimizer steps in the stage (small data)
    npe_lambda: NpeLambda | None = field(default_factory=lambda: [0.25, 0.5])  # None = w/o NPE

    _schedule = model_validator(mode="after")(_schedule_fits)


@dataclass(config=SECTION)
class ScoreConfig:
    # mean over "windows" of crop_frames, or the "whole" clip (docs/method.md)
    embedding: Literal["windows", "whole"] = "windows"
    window_hop: PositiveInt = 32
    covariance: Literal[COVARIANCE_MODES] = "pooled"
    shrinkage: Shrinkage = "ledoit-wolf"  # or a fixed ratio in [0, 1] (see asd.backend)
    threshold_quantile: Annotated[Float, Field(gt=0, lt=1)] = 0.9
    batch_size: PositiveInt = 32


@dataclass(config=SECTION)
class AEBaselineConfig:
    """The official DCASE 2022 autoencoder baseline (one model per machine type, input
    ``features.kind=librosa_logmel``); the defaults are the official recipe (docs/method.md)."""

    frames: PositiveInt = 5
    hidden: PositiveInt = 128
    bottleneck: PositiveInt = 8
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 512  # global: split over the Ray Train workers
    lr: PositiveFloat = 1e-3
    vectors_per_clip: PositiveInt | None = None  # subsample training vectors per clip; None = all (official)
    # Keras': the last 10 % of the file-ordered vectors, never trained on
    validation_split: Annotated[Float, Field(ge=0, lt=1)] = 0.1


@dataclass(config=SECTION)
class KnnConfig:
    """The nearest-training-clip detector (``method: knn``, asd/knn.py). The defaults are the floor
    baseline; ``representation: spectrum_shape`` on ``features.kind: spectrum`` with
    ``normalisation: local`` is the spectral kNN (docs/method.md, "Real sound")."""

    representation: Literal["statistics", "spectrum_shape"] = "statistics"
    # distances to training clips divided by a scale ** power: "none" the plain nearest distance,
    # "local" each training clip's distance to its nearest other clip, "domain" the mean of those
    # within the clip's domain
    normalisation: Literal["none", "local", "domain"] = "none"
    power: UnitFraction = 1.0
    # "cosine", or "standardised_euclidean": each dimension in units of its spread over the
    # section's training clips (benchmarks/spectral_variants.py)
    distance: Literal["cosine", "standardised_euclidean"] = "cosine"


@dataclass(config=SECTION)
class MLflowConfig:
    tracking_uri: Text | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in run_dir
    experiment: Text = "asd-prototypes"
    registered_model: Text = "asd-prototype"


@dataclass(config=SECTION)
class RetrainConfig:
    tolerance: NonNegativeFloat = 0.0  # promote if challenger >= champion - tolerance (official score)
    from_scratch: Bool = False  # else fine-tune from the champion's weights


METHODS = detectors.NAMES  # the registered detectors (pipelines/detectors)
# what the AE baseline accepts; librosa_logmel is the official recipe's front end (pipelines/detectors/ae.py)
AE_FEATURE_KINDS = ("librosa_logmel", "logmel")


@dataclass(config=SECTION)
class PipelineConfig:
    name: Text = "demo"
    run_dir: Text = "runs/demo"
    # a registered detector: "prototype" (the paper), "ae" (DCASE baseline) or "knn" (floor baseline)
    method: Literal[METHODS] = "prototype"
    data: DataConfig = field(default_factory=DataConfig)
    features: Features = field(default_factory=FeatureConfig)
    model: Model = field(default_factory=ModelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ae: AEBaselineConfig = field(default_factory=AEBaselineConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _consistent(self):
        """Rules between sections that the stages would otherwise hit late, after Ray and MLflow
        started (or never, training a different network than asked for)."""
        f, t = self.features, self.train
        if self.method == "ae" and f.kind not in AE_FEATURE_KINDS:
            raise _rule("features.kind", f"method=ae needs plain log-Mel features: set features.kind="
                                         f"librosa_logmel (the official baseline's) or logmel (got {f.kind!r})")
        if self.method != "prototype":
            return self
        if not (self.pretrain.enabled or self.finetune.enabled):
            raise _rule("finetune.enabled", "method=prototype with pretrain.enabled and finetune.enabled "
                                            "both false trains nothing: enable one")
        if self.model.n_mels != f.n_bins:
            rows = "n_fft // 2 + 1" if f.kind == "spectrum" else "features.n_mels"
            raise _rule("model.n_mels", f"must equal {rows} ({f.n_bins}), the height of the network's "
                                        f"input (got {self.model.n_mels})")
        if t.crop_frames > f.min_frames:
            raise _rule("train.crop_frames", f"must be <= features.min_frames ({f.min_frames}), the "
                                             f"shortest clip the feature store keeps (got {t.crop_frames})")
        pre, fine = self.pretrain, self.finetune
        if pre.enabled and pre.batch_size < t.num_workers:
            raise _rule("pretrain.batch_size", f"must be >= train.num_workers ({t.num_workers}): the "
                                               f"global batch is split over the workers (got {pre.batch_size})")
        if fine.enabled and fine.n_classes * fine.k < t.num_workers:
            raise _rule("finetune.k", f"finetune.n_classes x finetune.k must be >= train.num_workers "
                                      f"({t.num_workers}): the N x K batch is split over the workers "
                                      f"(got {fine.n_classes} x {fine.k})")
        return self

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


# ----------------------------------------------------------------------------- loading
def to_dict(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj)))  # tuples -> lists, plain JSON types


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls, data: dict):
    """``cls`` (a config dataclass) from plain data, validated; problems as one ConfigError line."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e, cls) for e in err.errors())) from err


# pydantic error type -> our wording (ctx values fill the fields)
_WORDING = {
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}", "int_type": "must be an integer",
    "float_type": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "string_too_short": "must not be empty",
    "list_type": "must be a list", "tuple_type": "must be a list", "finite_number": "must be finite",
    "too_short": "must have at least {min_length} item(s)", "too_long": "must have at most {max_length} item(s)",
    "dataclass_type": "must be a mapping of keys", "dataclass_args_type": "must be a mapping of keys",
}


def _describe(error: dict, cls: type) -> str:
    """One pydantic error as ``dotted.key: what is wrong (got value)``."""
    loc, ctx = list(error["loc"]), error.get("ctx") or {}
    kind = error["type"]
    if kind == "config_rule":
        return ".".join(map(str, loc + ctx["key"].split("."))) + f": {error['msg']}"
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:] or "config"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{key}: unknown key; known: {', '.join(_known_keys(cls, loc[:-1]))}"
    if kind == "value_error":
        message = str(ctx["error"])
    else:
        values = {k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()}
        message = _WORDING[kind].format(**values) if kind in _WORDING else error["msg"]
    return f"{key}: {message} (got {error['input']!r})"


def _known_keys(cls: type, loc: list) -> list[str]:
    for part in loc:
        cls = typing.get_type_hints(cls)[part]
    return [f.name for f in dataclasses.fields(cls)]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{where}: not valid YAML ({problem})") from err


def _read_yaml(path: Path, extended_by: tuple[Path, ...] = ()) -> dict:
    """The config file at ``path`` merged over the files it ``extends:``; ``extended_by`` are the
    files that led here, so that a cycle (a file extending itself, a -> b -> a) is one line
    naming it instead of a RecursionError."""
    real = path.resolve()
    if real in extended_by:
        chain = " -> ".join(str(p) for p in (*extended_by[extended_by.index(real):], real))
        raise ConfigError(f"{path}: 'extends:' forms a cycle ({chain}): remove one of them")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from err
    data = _parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (got {type(data).__name__})")
    parent = data.pop("extends", None)
    if parent:
        data = _merge(_read_yaml((path.parent / parent).resolve(), (*extended_by, real)), data)
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
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a section")
        node[leaf] = _parse_yaml(raw, f"override {item!r}")
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
