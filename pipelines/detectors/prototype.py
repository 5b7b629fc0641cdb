"""The paper's method as a detector: pre-training and fine-tuning on Ray Train (TorchTrainer,
PyTorch DDP), then Mahalanobis scoring per (machine, section).

Pre-training (Sec. 2 + 3.1.1): before every epoch each worker embeds its share of all
training clips, and the per-class (and MPE subset) embedding sums and counts are all-reduced,
so every worker holds the same global prototypes; then the epoch trains on random 64-frame
crops with the multi-prototype loss (Eq. 3).
Fine-tuning (Sec. 3.1.2 + 3.2): N x K balanced batches, in-batch prototypes (Eq. 4), NPE
pseudo-anomalies (Eqs. 5-6).
Both stages split one global batch over the workers and gather the embeddings before the loss,
with batch-norm statistics of the global batch, so a config trains the same network on 1, 2 or
16 workers (asd.training.train_epoch).
Scoring (Sec. 4.2): the training clips of each (machine, section), both domains, give the
attribute prototypes and the covariance of one :class:`asd.backend.SectionModel`; a test clip's
score is its minimum Mahalanobis distance to them.

A checkpoint is reported every epoch; a restarted run (same storage path and name) resumes
from the latest one, and FailureConfig(max_failures) restarts a failed worker group
(:mod:`pipelines.distributed`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import ray
import ray.train
import ray.train.torch
import torch

from asd.backend import SectionModel, calibrate_threshold, fit_section
from asd.contracts import HISTORY_CSV, MODEL_FILE, class_ids, section_key
from asd.model import EmbeddingNet, sync_batchnorm
from asd.sampler import BalancedBatchSampler, epoch_seed
from asd.training import (
    Workers, embed_clips, epoch_prototypes, finetune_loss, input_stats, pretrain_loss, prototype_drift,
    random_sampling_batches, steps_per_epoch, train_epoch,
)
from pipelines import distributed
from pipelines.checkpoints import copy_model, load_model, save_model
from pipelines.compute_process import prepare_compute_process
from pipelines.config import PipelineConfig, from_dict, to_dict
from pipelines.detectors.base import Detector, TrainingStage, score_clips
from pipelines.distributed import broadcast_buffers
from pipelines import ray_runtime
from pipelines.store import ClipTable, load_split

log = logging.getLogger(__name__)
STAGES = ("pretrain", "finetune")
STATE_FILE = "train_state.pt"
# the fine-tuning sampler's seed, derived from train.seed (a prime apart from the epoch streams)
SAMPLER_SEED_STRIDE = 7919
# Above this many clips, embeddings are computed on Ray Data actors instead of in-process.
RAY_EMBED_MIN_CLIPS = 4000


# ----------------------------------------------------------------------------- training
class StageTrainer:
    """One training stage of one worker: the network, its optimizer and schedule, and the epoch.

    Used by the Ray Train loop (with the workers' collectives) and, in one process, by the
    benchmarks that score checkpoints during training. ``epoch(e)`` runs epoch ``e`` and returns
    its metrics; every worker must run the same epochs.
    """

    def __init__(self, cfg: PipelineConfig, stage: str, features, labels: torch.Tensor, num_classes: int,
                 *, workers: Workers = Workers(), device: torch.device | str = "cpu",
                 init_state: dict | None = None) -> None:
        tc = cfg.train
        self.cfg, self.stage, self.workers, self.device = cfg, stage, workers, device
        self.sc = sc = cfg.pretrain if stage == "pretrain" else cfg.finetune
        self.features, self.labels, self.num_classes = features, labels, num_classes
        # same initial weights on every rank and every run (DDP would broadcast rank 0's anyway)
        torch.manual_seed(tc.seed)
        model = EmbeddingNet(cfg.model)
        if init_state is not None:
            model.load_state_dict(init_state)
        else:
            model.set_input_stats(*input_stats(features))
        if tc.sync_batchnorm and workers.world > 1:  # one worker's statistics are the global ones
            if tc.use_gpu:  # nccl: torch's fused kernels
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                sync_batchnorm(model, workers.sum_over_workers)
        model = model.to(device)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.core = self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=sc.lr, momentum=sc.momentum,
                                         weight_decay=sc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, sc.lr_milestones, sc.lr_gamma)
        global_batch = (min(sc.n_classes, int(labels.unique().numel())) * sc.k if stage == "finetune"
                        else sc.batch_size)
        if global_batch < workers.world:
            raise ValueError(f"{stage}: a global batch of {global_batch} clips cannot be split over "
                             f"{workers.world} workers")
        if stage == "finetune":
            n_classes = min(sc.n_classes, int(labels.unique().numel()))
            natural = sc.batches_per_epoch or math.ceil(len(labels) / (n_classes * sc.k))
            self.steps = steps_per_epoch(natural, sc.epochs, sc.min_steps)
            # the same global batches on every worker: each embeds its share of them
            self.sampler = BalancedBatchSampler(labels, sc.n_classes, sc.k, self.steps,
                                                seed=tc.seed * SAMPLER_SEED_STRIDE + 1)
        else:
            self.steps = steps_per_epoch(len(labels) // sc.batch_size, sc.epochs, sc.min_steps)
        self.previous_prototypes = None

    def wrap(self, wrap_model) -> None:
        """Wrap the network for data-parallel training (DDP); the core stays reachable."""
        self.model = wrap_model(self.core)

    def epoch(self, epoch: int) -> dict[str, float]:
        cfg, sc, tc, workers = self.cfg, self.sc, self.cfg.train, self.workers
        g_shared = torch.Generator().manual_seed(epoch_seed(tc.seed, epoch))
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.stage == "pretrain":
            broadcast_buffers(self.core)
            # windows of the training crop, hop crop/2 (the scoring default)
            windows = ({"window": tc.crop_frames, "hop": max(1, tc.crop_frames // 2)}
                       if sc.prototype_embedding == "windows" else {})
            protos = epoch_prototypes(
                self.core, self.features, self.labels, range(workers.rank, len(self.labels), workers.world),
                self.num_classes, mpe_ratio=sc.mpe_ratio, mpe_per_class=sc.mpe_per_class,
                generator=g_shared, all_reduce=workers.all_reduce, batch_size=cfg.score.batch_size,
                device=self.device, **windows)
            metrics["prototype_drift"] = prototype_drift(self.previous_prototypes, protos.class_prototypes)
            self.previous_prototypes = protos.class_prototypes
            protos.prototypes = protos.prototypes.to(self.device)
            protos.prototype_class = protos.prototype_class.to(self.device)
            metrics["prototype_seconds"] = time.perf_counter() - t0
            batches = random_sampling_batches(len(self.labels), sc.batch_size, self.steps, g_shared)

            def loss_fn(z, y):
                return pretrain_loss(z, y, protos, sc.tau)
        else:
            batches = self.sampler.epoch(epoch)

            def loss_fn(z, y):
                return finetune_loss(z, y, sc.tau, sc.npe_lambda, g_shared)
        t1 = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=tc.use_gpu and tc.bf16)
        losses, clips = train_epoch(
            self.model, self.features, self.labels, batches, loss_fn, self.optimizer,
            crop_frames=tc.crop_frames, generator=g_shared, workers=workers, device=self.device,
            autocast=autocast, channels_last=tc.channels_last)
        train_seconds = time.perf_counter() - t1
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step_losses = losses
        metrics.update(epoch=epoch, loss=sum(losses) / max(1, len(losses)), lr=lr, steps=len(losses),
                       samples_per_s=clips / train_seconds, epoch_seconds=time.perf_counter() - t0)
        return metrics


def class_labels(meta: pd.DataFrame, class_keys: list[str]) -> torch.Tensor:
    """Each clip's attribute-class id in ``class_keys`` (the ids of :func:`asd.contracts.class_ids`)."""
    index = class_ids(class_keys)
    return torch.tensor([index[k] for k in meta["attribute_class"]], dtype=torch.long)


def training_classes(store: str | Path, feature_version: str) -> list[str]:
    """Sorted attribute-class keys of every training clip in the store."""
    meta = load_split(store, "train", feature_version=feature_version, with_features=False).meta
    keys = list(class_ids(meta["attribute_class"]))
    if not keys:
        raise ValueError(f"the feature store {store} holds no labelled training clips")
    return keys


def model_meta(cfg: PipelineConfig, stage: str, class_keys: list[str], epochs: int) -> dict:
    return {"detector": "prototype", "model": asdict(cfg.model), "features": asdict(cfg.features),
            "stage": stage, "class_keys": class_keys, "epochs": epochs, "train_config": to_dict(cfg)}


# --- the Ray Train worker: set up, resume, train epoch after epoch
def _load_training_data(loop_cfg: dict) -> ClipTable:
    if loop_cfg.get("data_ref") is not None:
        return ray.get(loop_cfg["data_ref"])
    return load_split(loop_cfg["store"], "train", feature_version=loop_cfg["feature_version"])


def _build_trainer(loop_cfg: dict, cfg: PipelineConfig, workers: Workers) -> StageTrainer:
    tc = cfg.train
    prepare_compute_process(tc.threads_per_worker or tc.cpus_per_worker)
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    data = _load_training_data(loop_cfg)
    class_keys = loop_cfg["class_keys"]
    init_state = None
    if loop_cfg.get("init_model"):
        init_state = torch.load(Path(loop_cfg["init_model"]) / MODEL_FILE, map_location="cpu", weights_only=True)
    return StageTrainer(cfg, loop_cfg["stage"], data.features, class_labels(data.meta, class_keys),
                        len(class_keys), workers=workers, device=device, init_state=init_state)


def _resume(trainer: StageTrainer) -> tuple[int, list[dict]]:
    """Load the latest checkpoint into ``trainer``; return the next epoch and the history so far."""
    with distributed.latest_checkpoint() as d:
        if d is None:
            return 0, []
        trainer.core.load_state_dict(torch.load(d / MODEL_FILE, map_location=trainer.device, weights_only=True))
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
        history = distributed.read_history(d)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1, history


def _checkpoint_writer(trainer: StageTrainer, cfg: PipelineConfig, stage: str, class_keys: list[str], epoch: int):
    def write(d: Path) -> None:
        save_model(d, trainer.model, model_meta(cfg, stage, class_keys, epoch + 1))
        torch.save({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                    "epoch": epoch, "torch_rng": torch.get_rng_state()}, d / STATE_FILE)
    return write


def train_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg: PipelineConfig = from_dict(PipelineConfig, loop_cfg["config"])
    stage, workers = loop_cfg["stage"], distributed.worker_group()
    trainer = _build_trainer(loop_cfg, cfg, workers)
    start_epoch, history = _resume(trainer)
    resumed_from = start_epoch if history else -1
    if workers.world > 1:
        trainer.wrap(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    reporter = distributed.EpochReporter(loop_cfg, stage, workers.rank)
    for epoch in range(start_epoch, trainer.sc.epochs):
        reporter.start(epoch)
        metrics = trainer.epoch(epoch)
        metrics["samples_per_s"] = workers.mean(metrics["samples_per_s"])
        metrics["resumed_from_epoch"] = resumed_from
        history.append(metrics)
        reporter.report(history, _checkpoint_writer(trainer, cfg, stage, loop_cfg["class_keys"], epoch))


# --- the driver
def run_training(cfg: PipelineConfig, stage: str, *, store: str | Path, out_dir: str | Path,
                 init_model: str | Path | None = None, mlflow_run_id: str | None = None,
                 tracking_uri: str | None = None, run_name: str | None = None,
                 callbacks: Sequence = ()) -> Path:
    """Train one stage on Ray Train and copy the final model to ``out_dir``; return it.

    Re-running with the same ``run_name`` and run_dir resumes from the latest checkpoint.
    ``callbacks``: ``(epoch, rank)`` callables run on every worker before each epoch (tests).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}")
    tc = cfg.train
    class_keys = training_classes(store, cfg.features.version)
    epochs = (cfg.pretrain if stage == "pretrain" else cfg.finetune).epochs
    if epochs == 0:
        return _untrained_model(cfg, stage, store, out_dir, class_keys, init_model)
    loop_cfg = {
        "config": to_dict(cfg), "stage": stage, "store": str(Path(store).resolve()),
        "feature_version": cfg.features.version, "class_keys": class_keys,
        "init_model": str(Path(init_model).resolve()) if init_model else None,
        "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "callbacks": list(callbacks),
        "data_ref": None,
    }
    if tc.data_loading == "object_store":
        ray_runtime.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        loop_cfg["data_ref"] = ray.put(load_split(store, "train", feature_version=cfg.features.version))
    log.info("%s: %d epochs on %d worker(s), %d attribute classes", stage, epochs, tc.num_workers, len(class_keys))
    t0 = time.perf_counter()
    result = distributed.fit(cfg, train_loop, loop_cfg, stage=stage, epochs=epochs,
                             run_name=run_name or f"{stage}-{cfg.digest()}", use_gpu=tc.use_gpu)
    with result.checkpoint.as_directory() as d:
        out = copy_model(d, out_dir)
        history = distributed.read_history(d)
    write_history(history, out)
    log.info("%s: %d epochs in %.0f s, final loss %.3f; model in %s", stage, len(history),
             time.perf_counter() - t0, history[-1]["loss"], out)
    return out


def _untrained_model(cfg: PipelineConfig, stage: str, store, out_dir, class_keys, init_model) -> Path:
    """A stage of 0 epochs: its initial network as the model (the random-feature reference of
    docs/method.md), written without starting Ray."""
    data = load_split(store, "train", feature_version=cfg.features.version)
    init_state = (torch.load(Path(init_model) / MODEL_FILE, map_location="cpu", weights_only=True)
                  if init_model else None)
    trainer = StageTrainer(cfg, stage, data.features, class_labels(data.meta, class_keys), len(class_keys),
                           init_state=init_state)
    out = Path(out_dir)
    save_model(out, trainer.core, model_meta(cfg, stage, class_keys, 0))
    write_history([], out)
    return out


def write_history(history: list[dict], out_dir: Path) -> None:
    """Per-epoch metrics as ``history.csv`` beside the model."""
    pd.DataFrame(history).to_csv(Path(out_dir) / HISTORY_CSV, index=False)


# ----------------------------------------------------------------------------- scoring
def embed_table(model, table: ClipTable, cfg: PipelineConfig, use_ray: bool | None = None) -> torch.Tensor:
    """Embeddings [N, D] of every clip of a ClipTable, whole-clip or window-mean (config)."""
    window = cfg.train.crop_frames if cfg.score.embedding == "windows" else None
    n = len(table.features)
    if use_ray is None:
        use_ray = n >= RAY_EMBED_MIN_CLIPS
    if use_ray:
        # deferred: Ray Data actors embed large stores only, and every Ray Train worker imports this module
        from pipelines.stages.ray_embed import embed_with_ray

        return embed_with_ray(model, table.features, cfg, window)
    return embed_clips(model, table.features, range(n), cfg.score.batch_size,
                       window=window, hop=cfg.score.window_hop)


def fit_sections(train_meta: pd.DataFrame, train_emb: torch.Tensor, cfg: PipelineConfig
                 ) -> dict[str, SectionModel]:
    """One backend per (machine, section), prototypes of both domains, gamma threshold."""
    sections: dict[str, SectionModel] = {}
    for (machine, section), rows in train_meta.groupby(["machine", "section"], sort=True):
        idx = torch.tensor(rows.index.to_numpy())
        ids = class_ids(rows["attribute_class"])
        class_index = torch.tensor(rows["attribute_class"].map(ids).to_numpy("int64"))
        model = fit_section(train_emb[idx], class_index, class_keys=list(ids),
                            shrinkage=cfg.score.shrinkage, covariance=cfg.score.covariance)
        sections[section_key(machine, section)] = calibrate_threshold(
            model, train_emb[idx], cfg.score.threshold_quantile)
    return sections


# ----------------------------------------------------------------------------- the detector
class PrototypeDetector(Detector):
    name = "prototype"
    weights_file = MODEL_FILE
    stage_names = STAGES
    servable = True

    def stages(self, cfg: PipelineConfig) -> list[TrainingStage]:
        stages = []
        if cfg.pretrain.enabled:
            stages.append(TrainingStage("pretrain", ("features", "model", "train", "pretrain")))
        if cfg.finetune.enabled:
            init = None if cfg.finetune.from_scratch or not cfg.pretrain.enabled else "pretrain"
            stages.append(TrainingStage("finetune", ("features", "model", "train", "finetune"), init))
        return stages

    def fit(self, cfg, stage, *, store, out_dir, init_model=None, mlflow_run_id=None, tracking_uri=None,
            run_name=None, callbacks=()) -> Path:
        return run_training(cfg, stage, store=store, out_dir=out_dir, init_model=init_model,
                            mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri, run_name=run_name,
                            callbacks=callbacks)

    def score(self, cfg, model_dir, train, test) -> tuple[pd.DataFrame, dict]:
        model, _ = self.load(model_dir)
        sections = fit_sections(train.meta, embed_table(model, train, cfg), cfg)
        return score_clips(test.meta, embed_table(model, test, cfg), sections), sections

    def save(self, directory, model, cfg, **info) -> Path:
        return save_model(directory, model, model_meta(cfg, info["stage"], info["class_keys"], info["epochs"]))

    def load(self, directory) -> tuple[EmbeddingNet, dict]:
        return load_model(directory)

    def export(self, model_dir, served_dir) -> Path:
        return copy_model(model_dir, served_dir)

    def label(self, cfg: PipelineConfig) -> str:
        if not cfg.finetune.enabled:
            return "Pre-train only"
        if cfg.finetune.from_scratch or not cfg.pretrain.enabled:
            return "Fine-tune (w/o pre-train)"
        return "Fine-tune (w/ pre-train)"


DETECTOR = PrototypeDetector()
