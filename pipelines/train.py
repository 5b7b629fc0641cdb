"""``asd train``: pre-training and fine-tuning on Ray Train (TorchTrainer, PyTorch DDP).

Pre-training (Sec. 2 + 3.1.1): before every epoch each worker embeds its share of all
training clips, and the per-class (and MPE subset) embedding sums and counts are all-reduced,
so every worker holds the same global prototypes; then the epoch trains on random 64-frame
crops with the multi-prototype loss (Eq. 3).
Fine-tuning (Sec. 3.1.2 + 3.2): N x K balanced batches, in-batch prototypes (Eq. 4), NPE
pseudo-anomalies (Eqs. 5-6).
Both stages split one global batch over the workers and gather the embeddings before the loss,
with batch-norm statistics of the global batch, so a config trains the same network on 1, 2 or
16 workers (asd.training.train_epoch).

A checkpoint is reported every epoch; a restarted run (same storage path and name) resumes
from the latest one, and FailureConfig(max_failures) restarts a failed worker group.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from asd.model import EmbeddingNet, sync_batchnorm
from asd.sampler import BalancedBatchSampler
from asd.training import (
    Workers, epoch_prototypes, finetune_loss, input_stats, pretrain_loss, prototype_drift,
    random_sampling_batches, steps_per_epoch, train_epoch,
)
from pipelines.checkpoints import MODEL_FILE, copy_model, load_model, save_model
from pipelines.config import PipelineConfig, add_config_arguments, from_dict, load_config, to_dict
from pipelines.console import EpochProgress
from pipelines.compute_process import prepare_compute_process
from pipelines.errors import UserError, require_feature_store

log = logging.getLogger(__name__)
STAGES = ("pretrain", "finetune")
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"  # every epoch's metrics, carried in each checkpoint (survives resumes)


# ----------------------------------------------------------------------------- worker side
def _class_labels(meta, class_keys: list[str]) -> torch.Tensor:
    index = {k: i for i, k in enumerate(class_keys)}
    return torch.tensor([index[k] for k in meta["attribute_class"]], dtype=torch.long)


def _load_training_data(loop_cfg: dict):
    if loop_cfg.get("data_ref") is not None:
        import ray

        return ray.get(loop_cfg["data_ref"])
    from pipelines.store import load_split

    return load_split(loop_cfg["store"], "train", feature_version=loop_cfg["feature_version"])


def _dist() -> Workers:
    """This process's place among the Ray Train workers (one process on its own outside them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Workers()
    import torch.distributed.nn.functional as dist_fn

    on_gpu = dist.get_backend() == "nccl"  # gloo reduces CPU tensors; nccl needs them on the GPU

    def all_reduce(t: torch.Tensor) -> None:
        on = t.cuda() if on_gpu else t
        dist.all_reduce(on)
        if on is not t:
            t.copy_(on.cpu())

    def sum_over_workers(t: torch.Tensor) -> torch.Tensor:
        return dist_fn.all_reduce(t)  # autograd: the backward sums the gradients over workers

    return Workers(dist.get_rank(), dist.get_world_size(), all_reduce, sum_over_workers)


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every rank. DDP broadcasts them at the start of each
    training forward, but each rank's own last forward of an epoch then updates its copy, so
    without this the ranks embedded their prototype shares with slightly different networks
    (and a resumed run, where every rank loads rank 0's checkpoint, trained differently)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# seeds of the shared per-epoch generator and of the fine-tuning sampler, derived from train.seed
EPOCH_SEED_STRIDE = 1_000_003
SAMPLER_SEED_STRIDE = 7919


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
        g_shared = torch.Generator().manual_seed(tc.seed * EPOCH_SEED_STRIDE + epoch)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.stage == "pretrain":
            _broadcast_buffers(self.core)
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


def train_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    cfg: PipelineConfig = from_dict(PipelineConfig, loop_cfg["config"])
    stage = loop_cfg["stage"]
    tc = cfg.train
    workers = _dist()
    prepare_compute_process(tc.threads_per_worker or tc.cpus_per_worker)
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")

    data = _load_training_data(loop_cfg)
    class_keys = loop_cfg["class_keys"]
    init_state = None
    if loop_cfg.get("init_model"):
        init_state = torch.load(Path(loop_cfg["init_model"]) / MODEL_FILE, map_location="cpu", weights_only=True)
    trainer = StageTrainer(cfg, stage, data.features, _class_labels(data.meta, class_keys), len(class_keys),
                           workers=workers, device=device, init_state=init_state)

    start_epoch, resumed_from, history = 0, -1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.core.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location=device, weights_only=True))
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / HISTORY_FILE).read_text())
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = resumed_from = int(state["epoch"]) + 1

    if workers.world > 1:
        trainer.wrap(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    fault = loop_cfg.get("fault") or {}
    for epoch in range(start_epoch, trainer.sc.epochs):
        if fault.get("epoch") == epoch and workers.rank == fault.get("rank", 0) and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"failed at epoch {epoch}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch} (fault test)")
        metrics = trainer.epoch(epoch)
        metrics["samples_per_s"] = workers.mean(metrics["samples_per_s"])
        metrics["resumed_from_epoch"] = resumed_from
        history.append(metrics)
        _report(epoch, trainer.model, trainer.optimizer, trainer.scheduler, history, workers.rank,
                loop_cfg, cfg, stage, class_keys)


def _report(epoch, model, optimizer, scheduler, history, rank, loop_cfg, cfg, stage, class_keys):
    import ray.train

    metrics = history[-1]

    if rank != 0:
        ray.train.report(metrics)
        return
    if loop_cfg.get("progress") is not None:  # the driver's progress bar (pipelines.console)
        try:
            loop_cfg["progress"].put_nowait(metrics)
        except Exception as err:  # noqa: BLE001 - a progress line is never worth a failed epoch
            log.warning("progress bar update failed (%s): training goes on without it", type(err).__name__)
            loop_cfg["progress"] = None  # one warning, not one per epoch
    if loop_cfg.get("mlflow_run_id"):
        from pipelines.tracking import log_epoch_metrics

        log_epoch_metrics(loop_cfg["tracking_uri"], loop_cfg["mlflow_run_id"], stage, metrics, epoch)
    with tempfile.TemporaryDirectory() as d:
        save_model(d, model, _model_meta(cfg, stage, class_keys, epoch + 1))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, "torch_rng": torch.get_rng_state()}, Path(d) / STATE_FILE)
        (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _model_meta(cfg: PipelineConfig, stage: str, class_keys: list[str], epochs: int) -> dict:
    return {"model": asdict(cfg.model), "features": asdict(cfg.features), "stage": stage,
            "class_keys": class_keys, "epochs": epochs, "train_config": to_dict(cfg)}


# ----------------------------------------------------------------------------- driver side
def training_classes(store: str | Path, feature_version: str) -> list[str]:
    """Sorted attribute-class keys of every training clip in the store."""
    from pipelines.store import load_split

    meta = load_split(store, "train", feature_version=feature_version, with_features=False).meta
    keys = sorted(meta["attribute_class"].dropna().unique().tolist())
    if not keys:
        raise ValueError(f"the feature store {store} holds no labelled training clips")
    return keys


def run_training(cfg: PipelineConfig, stage: str, *, store: str | Path, out_dir: str | Path,
                 init_model: str | Path | None = None, mlflow_run_id: str | None = None,
                 tracking_uri: str | None = None, fault: dict | None = None,
                 run_name: str | None = None) -> Path:
    """Train one stage on Ray Train and copy the final model to ``out_dir``; return it.

    Re-running with the same ``run_name`` and run_dir resumes from the latest checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import init_ray

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}")
    tc = cfg.train
    class_keys = training_classes(store, cfg.features.version)
    if (cfg.pretrain if stage == "pretrain" else cfg.finetune).epochs == 0:
        return _untrained_model(cfg, stage, store, out_dir, class_keys, init_model)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    loop_cfg = {
        "config": to_dict(cfg), "stage": stage, "store": str(Path(store).resolve()),
        "feature_version": cfg.features.version, "class_keys": class_keys,
        "init_model": str(Path(init_model).resolve()) if init_model else None,
        "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "fault": fault,
        "data_ref": None,
    }
    if tc.data_loading == "object_store":
        from pipelines.store import load_split

        loop_cfg["data_ref"] = ray.put(load_split(store, "train", feature_version=cfg.features.version))
    storage = (Path(cfg.run_dir) / "ray_results").resolve()
    epochs = (cfg.pretrain if stage == "pretrain" else cfg.finetune).epochs
    progress = EpochProgress(stage, epochs)
    loop_cfg["progress"] = progress.queue
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name or f"{stage}-{cfg.digest()}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("%s: %d epochs on %d worker(s), %d attribute classes", stage, epochs, tc.num_workers, len(class_keys))
    t0 = time.perf_counter()
    with progress:
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        out = copy_model(d, out_dir)
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
    write_history(history, out)
    log.info("%s: %d epochs in %.0f s, final loss %.3f; model in %s", stage, len(history),
             time.perf_counter() - t0, history[-1]["loss"], out)
    return out


def _untrained_model(cfg: PipelineConfig, stage: str, store, out_dir, class_keys, init_model) -> Path:
    """A stage of 0 epochs: its initial network as the model (the random-feature reference of
    docs/method.md), written without starting Ray."""
    from pipelines.store import load_split

    data = load_split(store, "train", feature_version=cfg.features.version)
    init_state = (torch.load(Path(init_model) / MODEL_FILE, map_location="cpu", weights_only=True)
                  if init_model else None)
    trainer = StageTrainer(cfg, stage, data.features, _class_labels(data.meta, class_keys), len(class_keys),
                           init_state=init_state)
    out = Path(out_dir)
    save_model(out, trainer.core, _model_meta(cfg, stage, class_keys, 0))
    write_history([], out)
    return out


def write_history(history: list[dict], out_dir: Path) -> None:
    """Per-epoch metrics as ``history.csv`` beside the model."""
    import pandas as pd

    pd.DataFrame(history).to_csv(Path(out_dir) / "history.csv", index=False)


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pre-train or fine-tune the embedding network (Ray Train)",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--store", help="feature store (default: from the config)")
    p.add_argument("--out", help="where to write the trained model (default: <run_dir>/models/<stage>)")
    p.add_argument("--init", help="model directory to start from (fine-tuning: the pre-trained model)")
    p.add_argument("--address", help="Ray cluster address (default: local Ray, or $RAY_ADDRESS)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    store = args.store or cfg.path(cfg.extract.store)
    require_feature_store(store, cfg.features.version)
    out = args.out or cfg.path(f"models/{args.stage}")
    init = args.init
    if args.stage == "finetune" and init is None and not cfg.finetune.from_scratch:
        init = cfg.path("models/pretrain")
        if not (Path(init) / MODEL_FILE).is_file():
            raise UserError(f"fine-tuning starts from {init}, which holds no model: run "
                            "`asd train --stage pretrain` first or set finetune.from_scratch=true")
    model_dir = run_training(cfg, args.stage, store=store, out_dir=out, init_model=init)
    print(f"{args.stage}: model written to {model_dir}")
    print(json.dumps(load_model(model_dir)[1]["epochs"]))
    return 0
