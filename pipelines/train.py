"""``asd train``: pre-training and fine-tuning on Ray Train (TorchTrainer, PyTorch DDP).

Pre-training (Sec. 2 + 3.1.1): before every epoch each worker embeds its share of all
training clips, and the per-class (and MPE subset) embedding sums and counts are all-reduced,
so every worker holds the same global prototypes; then the epoch trains on random 64-frame
crops with the multi-prototype loss (Eq. 3).
Fine-tuning (Sec. 3.1.2 + 3.2): N x K balanced batches, in-batch prototypes (Eq. 4), NPE
pseudo-anomalies (Eqs. 5-6); every worker draws its own batches from its own seed.

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

from asd.model import EmbeddingNet
from asd.sampler import BalancedBatchSampler, random_crops
from asd.training import (
    epoch_prototypes, finetune_loss, input_stats, no_reduce, pretrain_loss, prototype_drift,
)
from pipelines.checkpoints import MODEL_FILE, copy_model, load_model, save_model
from pipelines.config import PipelineConfig, add_config_arguments, from_dict, load_config, to_dict
from pipelines.compute_process import prepare_compute_process

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


def _dist():
    """(rank, world size, all-reduce) for the current process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        def all_reduce(t: torch.Tensor) -> None:
            # gloo reduces CPU tensors; nccl needs them on the GPU
            on = t.cuda() if dist.get_backend() == "nccl" else t
            dist.all_reduce(on)
            if on is not t:
                t.copy_(on.cpu())
        return dist.get_rank(), dist.get_world_size(), all_reduce
    return 0, 1, no_reduce


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every rank. DDP broadcasts them at the start of each
    training forward, but each rank's own last forward of an epoch then updates its copy, so
    without this the ranks embedded their prototype shares with slightly different networks
    (and a resumed run, where every rank loads rank 0's checkpoint, trained differently)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _mean_across(value: float, all_reduce, world: int) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    all_reduce(t)
    return float(t) / world


def train_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker (also callable directly without Ray, for one process)."""
    import ray.train

    cfg: PipelineConfig = from_dict(PipelineConfig, loop_cfg["config"])
    stage = loop_cfg["stage"]
    tc = cfg.train
    sc = cfg.pretrain if stage == "pretrain" else cfg.finetune
    rank, world, all_reduce = _dist()
    prepare_compute_process(tc.threads_per_worker or tc.cpus_per_worker)
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")

    data = _load_training_data(loop_cfg)
    class_keys = loop_cfg["class_keys"]
    labels = _class_labels(data.meta, class_keys)
    features = data.features

    # same initial weights on every rank and every run (DDP would broadcast rank 0's anyway)
    torch.manual_seed(tc.seed)
    model = EmbeddingNet(cfg.model)
    if loop_cfg.get("init_model"):
        model.load_state_dict(torch.load(Path(loop_cfg["init_model"]) / MODEL_FILE,
                                         map_location="cpu", weights_only=True))
    else:
        model.set_input_stats(*input_stats(features))
    model = model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=sc.lr, momentum=sc.momentum,
                                weight_decay=sc.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, sc.lr_milestones, sc.lr_gamma)

    start_epoch, resumed_from, history = 0, -1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location=device, weights_only=True))
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / HISTORY_FILE).read_text())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = resumed_from = int(state["epoch"]) + 1

    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    core = getattr(model, "module", model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=tc.use_gpu and tc.bf16)
    fault = loop_cfg.get("fault") or {}

    previous = None
    sampler = None
    if stage == "finetune":
        per_worker = math.ceil((sc.batches_per_epoch or math.ceil(
            len(labels) / (min(sc.n_classes, len(class_keys)) * sc.k))) / world)
        sampler = BalancedBatchSampler(labels, sc.n_classes, sc.k, per_worker,
                                       seed=tc.seed * 7919 + rank + 1)

    # windows of the training crop, hop crop/2 (the scoring default); both in this stage's digest
    proto_windows = ({"window": tc.crop_frames, "hop": max(1, tc.crop_frames // 2)}
                     if stage == "pretrain" and sc.prototype_embedding == "windows" else {})
    for epoch in range(start_epoch, sc.epochs):
        if fault.get("epoch") == epoch and rank == fault.get("rank", 0) and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"failed at epoch {epoch}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch} (fault test)")
        g_shared = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch)
        g_local = torch.Generator().manual_seed((tc.seed * 1_000_003 + epoch) * 101 + rank)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if stage == "pretrain":
            _broadcast_buffers(core)
            protos = epoch_prototypes(
                core, features, labels, range(rank, len(labels), world), len(class_keys),
                mpe_ratio=sc.mpe_ratio, mpe_per_class=sc.mpe_per_class, generator=g_shared,
                all_reduce=all_reduce, batch_size=cfg.score.batch_size, device=device,
                **proto_windows)
            metrics["prototype_drift"] = prototype_drift(previous, protos.class_prototypes)
            previous = protos.class_prototypes
            protos.prototypes = protos.prototypes.to(device)
            protos.prototype_class = protos.prototype_class.to(device)
            metrics["prototype_seconds"] = time.perf_counter() - t0
            per_rank = max(1, sc.batch_size // world)
            steps = max(1, len(labels) // (per_rank * world))
            order = torch.randperm(len(labels), generator=g_shared)
            batches = (order[(s * world + rank) * per_rank:(s * world + rank + 1) * per_rank]
                       for s in range(steps))
        else:
            batches = sampler.epoch(epoch)
            steps = len(sampler)
        model.train()
        t1 = time.perf_counter()
        total_loss, seen = 0.0, 0
        for idx in batches:
            if idx.numel() == 0:  # fewer clips than ranks x batch: keep every rank stepping
                idx = torch.randint(len(labels), (1,), generator=g_local)
            x = random_crops(features, idx, tc.crop_frames, g_local).unsqueeze(1).to(device)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(device)
            with autocast:
                z = model(x).float()
            loss = (pretrain_loss(z, y, protos, sc.tau) if stage == "pretrain"
                    else finetune_loss(z, y, sc.tau, sc.npe_lambda, g_local))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            seen += idx.numel()
        train_seconds = time.perf_counter() - t1
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics.update(
            epoch=epoch, loss=_mean_across(total_loss / max(steps, 1), all_reduce, world), lr=lr,
            samples_per_s=_mean_across(seen / train_seconds, all_reduce, world) * world,
            epoch_seconds=time.perf_counter() - t0, resumed_from_epoch=resumed_from,
        )
        history.append(metrics)
        _report(epoch, model, optimizer, scheduler, history, rank, loop_cfg, cfg, stage, class_keys)


def _report(epoch, model, optimizer, scheduler, history, rank, loop_cfg, cfg, stage, class_keys):
    import ray.train

    metrics = history[-1]

    if rank != 0:
        ray.train.report(metrics)
        return
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
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    tc = cfg.train
    class_keys = training_classes(store, cfg.features.version)
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
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name or f"{stage}-{cfg.digest()}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("%s: %d workers, %d attribute classes", stage, tc.num_workers, len(class_keys))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        out = copy_model(d, out_dir)
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
    write_history(history, out)
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
    out = args.out or cfg.path(f"models/{args.stage}")
    init = args.init
    if args.stage == "finetune" and init is None and not cfg.finetune.from_scratch:
        init = cfg.path("models/pretrain")
        if not (Path(init) / MODEL_FILE).is_file():
            raise SystemExit(f"fine-tuning starts from {init}, which holds no model: run "
                             "`asd train --stage pretrain` first or set finetune.from_scratch=true")
    model_dir = run_training(cfg, args.stage, store=store, out_dir=out, init_model=init)
    print(f"{args.stage}: model written to {model_dir}")
    print(json.dumps(load_model(model_dir)[1]["epochs"]))
    return 0
