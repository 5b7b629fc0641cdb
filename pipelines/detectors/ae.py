"""The official AE baseline as a detector: Ray Train (DDP) training of one dense autoencoder
per machine type on plain log-Mel frame vectors; a clip's score is its mean reconstruction
error, with one gamma threshold per machine type (the official 00_train.py / 01_test.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import ray.train
import ray.train.torch
import torch

from asd.backend import decide, fit_gamma_threshold
from asd.baseline_ae import (ADAM_EPS, AEConfig, DenseAutoencoder, clip_scores, frame_vectors,
                             reconstruction_error, validation_split)
from asd.contracts import META_FILE
from asd.sampler import epoch_seed
from pipelines import distributed
from pipelines.compute_process import prepare_compute_process
from pipelines.config import PipelineConfig, from_dict, to_dict
from pipelines.detectors.base import Detector, TrainingStage
from pipelines.detectors.prototype import write_history
from pipelines.store import ClipTable, load_split

log = logging.getLogger(__name__)
AE_FILE = "ae.pt"
OPTIM_FILE = "ae_optim.pt"  # Adam state of every machine's AE, so a resumed run continues exactly
# each rank's vector order: epoch_seed(train.seed, epoch * RANK_SLOTS + rank), room for 101 ranks
RANK_SLOTS = 101


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


def _resume(models: dict, machines: list[str]) -> tuple[int, list[dict], dict | None]:
    """Load the latest checkpoint into ``models``; the next epoch, the history, the Adam states."""
    with distributed.latest_checkpoint() as d:
        if d is None:
            return 0, [], None
        state = torch.load(d / AE_FILE, weights_only=True)
        optim_state = torch.load(d / OPTIM_FILE, weights_only=True)
        start = json.loads((d / META_FILE).read_text())["epochs"]
        history = distributed.read_history(d)
    for m in machines:
        models[m].load_state_dict(state[m])
    return start, history, optim_state


def _shard(data: ClipTable, machines: list[str], acfg: AEConfig, validation: float, rank: int, world: int):
    """This worker's training and held-out vectors per machine. Keras' validation_split as the
    official baseline: the last fraction of each machine's vectors in file order is held out
    (only the validation loss is computed on it); clips are dealt to the workers round robin."""
    shards, held_out = {}, {}
    for m in machines:
        rows = data.meta[data.meta["machine"] == m].sort_values("path", kind="stable").index
        n_vec = [max(0, data.features[i].shape[1] - acfg.frames + 1) for i in rows]
        n_fit = validation_split(n_vec, validation)
        mine = [(i, n, v) for k, (i, n, v) in enumerate(zip(rows, n_fit, n_vec)) if k % world == rank]
        shards[m] = ([data.features[i] for i, n, _ in mine if n > 0], [slice(0, n) for _, n, _ in mine if n > 0])
        held_out[m] = ([data.features[i] for i, n, v in mine if n < v], [slice(n, None) for _, n, v in mine if n < v])
    return shards, held_out


def _train_machine(model, optimizer, vectors: torch.Tensor, per_rank_batch: int, g: torch.Generator) -> float:
    """One epoch of one machine's AE on this worker's vectors; the mean batch loss."""
    # equal step counts on every rank (DDP): the smallest shard decides
    n = int(distributed.min_over_workers(vectors.shape[0]))
    order = torch.randperm(vectors.shape[0], generator=g)[:n]
    total, steps = 0.0, 0
    model.train()
    for s in range(0, len(order), per_rank_batch):
        batch = vectors[order[s:s + per_rank_batch]]
        if batch.shape[0] < 2:  # batch norm needs two vectors
            continue
        loss = reconstruction_error(model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + float(loss), steps + 1
    return total / max(steps, 1)


def ae_train_loop(loop_cfg: dict) -> None:
    """Every worker trains every machine's AE on its shard of the clips; DDP averages gradients."""
    cfg: PipelineConfig = from_dict(PipelineConfig, loop_cfg["config"])
    workers = distributed.worker_group()
    rank, world = workers.rank, workers.world
    prepare_compute_process(cfg.train.threads_per_worker or cfg.train.cpus_per_worker)
    data = load_split(loop_cfg["store"], "train", feature_version=cfg.features.version)
    machines = sorted(data.meta["machine"].unique())
    acfg = _ae_config(cfg)
    torch.manual_seed(cfg.train.seed)
    models = {m: DenseAutoencoder(acfg) for m in machines}
    start, history, optim_state = _resume(models, machines)
    wrapped = {m: (ray.train.torch.prepare_model(models[m], move_to_device=False) if world > 1 else models[m])
               for m in machines}
    opts = {m: torch.optim.Adam(wrapped[m].parameters(), lr=cfg.ae.lr, eps=ADAM_EPS) for m in machines}
    for m in (machines if optim_state else ()):
        opts[m].load_state_dict(optim_state[m])
    shards, held_out = _shard(data, machines, acfg, cfg.ae.validation_split, rank, world)
    per_rank_batch = max(2, -(-cfg.ae.batch_size // world))  # DDP averages: one step = ae.batch_size vectors
    reporter = distributed.EpochReporter(loop_cfg, "ae", rank)
    for epoch in range(start, cfg.ae.epochs):
        reporter.start(epoch)
        g = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, epoch * RANK_SLOTS + rank))
        metrics = {"epoch": epoch}
        for m in machines:
            vectors = _epoch_vectors(shards[m][0], acfg.frames, cfg.ae.vectors_per_clip, g, shards[m][1])
            metrics[f"loss/{m}"] = workers.mean(_train_machine(wrapped[m], opts[m], vectors, per_rank_batch, g))
            if cfg.ae.validation_split > 0:  # the unwrapped model: no DDP collective in its forward
                val = torch.tensor(_val_loss(models[m], held_out[m], acfg.frames), dtype=torch.float64)
                workers.all_reduce(val)
                metrics[f"val_loss/{m}"] = float(val[0] / val[1].clamp_min(1))
        metrics["loss"] = sum(v for k, v in metrics.items() if k.startswith("loss/")) / len(machines)
        history.append(metrics)

        def write(d: Path, epochs: int = epoch + 1) -> None:
            save_ae(d, models, cfg, epochs)
            torch.save({m: o.state_dict() for m, o in opts.items()}, d / OPTIM_FILE)

        reporter.report(history, write)


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
    (directory / META_FILE).write_text(json.dumps(
        {"detector": "ae", "stage": "ae", "ae": asdict(_ae_config(cfg)), "features": asdict(cfg.features),
         "machines": sorted(models), "epochs": epochs, "train_config": to_dict(cfg)}, indent=2))
    return directory


def load_ae(directory) -> tuple[dict[str, DenseAutoencoder], dict]:
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    state = torch.load(directory / AE_FILE, weights_only=True)
    models = {}
    for m, sd in state.items():
        models[m] = DenseAutoencoder(AEConfig(**meta["ae"]))
        models[m].load_state_dict(sd)
        models[m].eval()
    return models, meta


def run_ae_training(cfg: PipelineConfig, *, store, out_dir, mlflow_run_id=None, tracking_uri=None,
                    run_name: str | None = None, callbacks=()) -> Path:
    if cfg.features.kind != "librosa_logmel":  # any other kind is rejected by the config (method=ae)
        log.warning("features.kind=%s is not the official AE baseline's front end (librosa_logmel): "
                    "scores differ from the official recipe (docs/method.md)", cfg.features.kind)
    loop_cfg = {"config": to_dict(cfg), "store": str(Path(store).resolve()), "mlflow_run_id": mlflow_run_id,
                "tracking_uri": tracking_uri, "callbacks": list(callbacks)}
    result = distributed.fit(cfg, ae_train_loop, loop_cfg, stage="ae", epochs=cfg.ae.epochs,
                             run_name=run_name or f"ae-{cfg.digest()}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for name in (AE_FILE, META_FILE):
            (out / name).write_bytes((Path(d) / name).read_bytes())
        write_history(distributed.read_history(d), out)
    return out


def ae_scores(models: dict, table, frames: int) -> torch.Tensor:
    """Mean reconstruction error of every clip of a ClipTable, with its machine's model."""
    scores = torch.full((len(table.features),), float("nan"), dtype=torch.float64)
    for m, rows in table.meta.groupby("machine"):
        if m not in models:
            raise ValueError(f"no AE was trained for machine type {m!r}")
        scores[torch.tensor(rows.index.to_numpy())] = clip_scores(models[m], [table.features[i] for i in rows.index], frames)
    return scores


def score_ae(models: dict, frames: int, train: ClipTable, test: ClipTable, quantile: float) -> pd.DataFrame:
    """Clip score = mean reconstruction error; one gamma threshold per machine type, fitted to the
    scores of all its training clips (every section), as the official baseline."""
    train_scores, test_scores = ae_scores(models, train, frames), ae_scores(models, test, frames)
    scored = test.meta.copy()
    scored["score"], scored["decision"], scored["nearest_attribute"] = test_scores.numpy(), -1, None
    for machine, rows in test.meta.groupby("machine", sort=True):
        fit_rows = train.meta.index[train.meta["machine"] == machine]
        threshold = fit_gamma_threshold(train_scores[torch.tensor(fit_rows.to_numpy())], quantile)
        scored.loc[rows.index, "decision"] = decide(test_scores[torch.tensor(rows.index.to_numpy())], threshold).numpy()
    return scored


class AEDetector(Detector):
    name = "ae"
    weights_file = AE_FILE
    stage_names = ("ae",)

    def stages(self, cfg: PipelineConfig) -> list[TrainingStage]:
        return [TrainingStage("ae", ("features", "ae", "train"))]

    def fit(self, cfg, stage, *, store, out_dir, init_model=None, mlflow_run_id=None, tracking_uri=None,
            run_name=None, callbacks=()) -> Path:
        return run_ae_training(cfg, store=store, out_dir=out_dir, mlflow_run_id=mlflow_run_id,
                               tracking_uri=tracking_uri, run_name=run_name, callbacks=callbacks)

    def score(self, cfg, model_dir, train, test) -> tuple[pd.DataFrame, dict]:
        models, meta = self.load(model_dir)
        return score_ae(models, meta["ae"]["frames"], train, test, cfg.score.threshold_quantile), {}

    def save(self, directory, model, cfg, **info) -> Path:
        return save_ae(directory, model, cfg, info["epochs"])

    def load(self, directory) -> tuple[dict[str, DenseAutoencoder], dict]:
        return load_ae(directory)

    def label(self, cfg: PipelineConfig) -> str:
        return "AE baseline"


DETECTOR = AEDetector()
