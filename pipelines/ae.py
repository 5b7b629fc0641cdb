"""The official AE baseline through the same pipeline: Ray Train (DDP) training of one dense
autoencoder per machine type on plain log-Mel frame vectors, scored by the scoring job
(mean reconstruction error per clip, gamma threshold per section, DCASE metrics)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from asd.baseline_ae import (ADAM_EPS, AEConfig, DenseAutoencoder, clip_scores, frame_vectors,
                             reconstruction_error, validation_split)
from pipelines.config import PipelineConfig, from_dict, to_dict
from pipelines.compute_process import prepare_compute_process

AE_FILE = "ae.pt"
OPTIM_FILE = "ae_optim.pt"  # Adam state of every machine's AE, so a resumed run continues exactly


def _ae_config(cfg: PipelineConfig) -> AEConfig:
    return AEConfig(n_mels=cfg.features.n_mels, frames=cfg.ae.frames, hidden=cfg.ae.hidden,
                    bottleneck=cfg.ae.bottleneck)


def _epoch_vectors(features, frames: int, per_clip: int | None, g: torch.Generator,
                   keep: list[slice] | None = None) -> torch.Tensor:
    """All frame vectors of the clips (``keep``: the part of each clip's vectors to use), or
    ``per_clip`` random ones per clip (CPU budgets)."""
    parts = []
    for k, f in enumerate(features):
        v = frame_vectors(f, frames)
        v = v if keep is None else v[keep[k]]
        if per_clip is not None and per_clip < v.shape[0]:
            v = v[torch.randperm(v.shape[0], generator=g)[:per_clip]]
        parts.append(v)
    return torch.cat(parts)


def ae_train_loop(loop_cfg: dict) -> None:
    """Every worker trains every machine's AE on its shard of the clips; DDP averages gradients."""
    import ray.train

    from pipelines.store import load_split
    from pipelines.train import HISTORY_FILE, _dist

    cfg: PipelineConfig = from_dict(PipelineConfig, loop_cfg["config"])
    workers = _dist()
    rank, world = workers.rank, workers.world
    prepare_compute_process(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
    data = load_split(loop_cfg["store"], "train", feature_version=cfg.features.version)
    machines = sorted(data.meta["machine"].unique())
    acfg = _ae_config(cfg)
    torch.manual_seed(cfg.train.seed)
    models = {m: DenseAutoencoder(acfg) for m in machines}
    start, history, optim_state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / AE_FILE, weights_only=True)
            optim_state = torch.load(Path(d) / OPTIM_FILE, weights_only=True)
            start = json.loads((Path(d) / "meta.json").read_text())["epochs"]
            history = json.loads((Path(d) / HISTORY_FILE).read_text())
        for m in machines:
            models[m].load_state_dict(state[m])
    wrapped = {m: (ray.train.torch.prepare_model(models[m], move_to_device=False) if world > 1 else models[m])
               for m in machines}
    opts = {m: torch.optim.Adam(wrapped[m].parameters(), lr=cfg.ae.lr, eps=ADAM_EPS) for m in machines}
    for m in (machines if optim_state else ()):
        opts[m].load_state_dict(optim_state[m])
    # Keras validation_split as the official baseline: the last fraction of each machine's vectors
    # in file order is held out; only the validation loss is computed on it
    shards, held_out = {}, {}
    for m in machines:
        rows = data.meta[data.meta["machine"] == m].sort_values("path", kind="stable").index
        n_vec = [max(0, data.features[i].shape[1] - acfg.frames + 1) for i in rows]
        n_fit = validation_split(n_vec, cfg.ae.validation_split)
        mine = [(i, n, v) for k, (i, n, v) in enumerate(zip(rows, n_fit, n_vec)) if k % world == rank]
        shards[m] = ([data.features[i] for i, n, _ in mine if n > 0], [slice(0, n) for _, n, _ in mine if n > 0])
        held_out[m] = ([data.features[i] for i, n, v in mine if n < v], [slice(n, None) for _, n, v in mine if n < v])
    per_rank_batch = max(2, -(-cfg.ae.batch_size // world))  # DDP averages: one step = ae.batch_size vectors
    for epoch in range(start, cfg.ae.epochs):
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch * 101 + rank)
        metrics = {"epoch": epoch}
        for m in machines:
            vectors = _epoch_vectors(shards[m][0], acfg.frames, cfg.ae.vectors_per_clip, g, shards[m][1])
            # equal step counts on every rank (DDP): the smallest shard decides
            n = torch.tensor([float(vectors.shape[0])])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(n, op=dist.ReduceOp.MIN)
            order = torch.randperm(vectors.shape[0], generator=g)[: int(n)]
            model, total, steps = wrapped[m], 0.0, 0
            model.train()
            for s in range(0, len(order), per_rank_batch):
                batch = vectors[order[s:s + per_rank_batch]]
                if batch.shape[0] < 2:  # batch norm needs two vectors
                    continue
                loss = reconstruction_error(model, batch).mean()
                opts[m].zero_grad(set_to_none=True)
                loss.backward()
                opts[m].step()
                total, steps = total + float(loss), steps + 1
            metrics[f"loss/{m}"] = workers.mean(total / max(steps, 1))
            if cfg.ae.validation_split > 0:  # the unwrapped model: no DDP collective in its forward
                val = torch.tensor(_val_loss(models[m], held_out[m], acfg.frames), dtype=torch.float64)
                workers.all_reduce(val)
                metrics[f"val_loss/{m}"] = float(val[0] / val[1].clamp_min(1))
        metrics["loss"] = sum(v for k, v in metrics.items() if k.startswith("loss/")) / len(machines)
        history.append(metrics)
        if rank != 0:
            ray.train.report(metrics)
            continue
        if loop_cfg.get("mlflow_run_id"):
            from pipelines.tracking import log_epoch_metrics

            log_epoch_metrics(loop_cfg["tracking_uri"], loop_cfg["mlflow_run_id"], "ae", metrics, epoch)
        with tempfile.TemporaryDirectory() as d:
            save_ae(d, models, cfg, epoch + 1)
            torch.save({m: o.state_dict() for m, o in opts.items()}, Path(d) / OPTIM_FILE)
            (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


@torch.no_grad()
def _val_loss(model, held_out, frames: int) -> tuple[float, int]:
    """(sum, count) of the reconstruction errors of this worker's held-out vectors (inference
    mode, as Keras' val_loss)."""
    feats, keep = held_out
    if not feats:
        return 0.0, 0
    model.eval()
    v = torch.cat([frame_vectors(f, frames)[k] for f, k in zip(feats, keep)])
    return float(reconstruction_error(model, v).sum()), v.shape[0]


def save_ae(directory, models: dict, cfg: PipelineConfig, epochs: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({m: mod.state_dict() for m, mod in models.items()}, directory / AE_FILE)
    (directory / "meta.json").write_text(json.dumps(
        {"stage": "ae", "ae": asdict(_ae_config(cfg)), "features": asdict(cfg.features),
         "machines": sorted(models), "epochs": epochs, "train_config": to_dict(cfg)}, indent=2))
    return directory


def load_ae(directory) -> tuple[dict[str, DenseAutoencoder], dict]:
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    state = torch.load(directory / AE_FILE, weights_only=True)
    models = {}
    for m, sd in state.items():
        models[m] = DenseAutoencoder(AEConfig(**meta["ae"]))
        models[m].load_state_dict(sd)
        models[m].eval()
    return models, meta


def run_ae_training(cfg: PipelineConfig, *, store, out_dir, mlflow_run_id=None, tracking_uri=None,
                    run_name: str | None = None) -> Path:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import init_ray
    from pipelines.train import HISTORY_FILE, write_history

    if cfg.features.kind != "librosa_logmel":  # any other kind is rejected by the config (method=ae)
        import logging

        logging.getLogger("asd.ae").warning(
            "features.kind=%s is not the official AE baseline's front end (librosa_logmel): "
            "scores differ from the official recipe (docs/method.md)", cfg.features.kind)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    trainer = TorchTrainer(
        ae_train_loop,
        train_loop_config={"config": to_dict(cfg), "store": str(Path(store).resolve()),
                           "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=run_name or f"ae-{cfg.digest()}",
                             storage_path=str((Path(cfg.run_dir) / "ray_results").resolve()),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"AE training finished without a checkpoint: {result.error}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for name in (AE_FILE, "meta.json"):
            (out / name).write_bytes((Path(d) / name).read_bytes())
        write_history(json.loads((Path(d) / HISTORY_FILE).read_text()), out)
    return out


def ae_scores(models: dict, table, frames: int) -> torch.Tensor:
    """Mean reconstruction error of every clip of a ClipTable, with its machine's model."""
    scores = torch.full((len(table.features),), float("nan"), dtype=torch.float64)
    for m, rows in table.meta.groupby("machine"):
        if m not in models:
            raise ValueError(f"no AE was trained for machine type {m!r}")
        scores[rows.index.to_numpy()] = clip_scores(models[m], [table.features[i] for i in rows.index], frames)
    return scores
