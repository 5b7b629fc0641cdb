"""Embedding many clips on Ray Data: an actor pool, each actor holding one copy of the network.

Used by the scoring job when the store is large (``pipelines.detectors.prototype.RAY_EMBED_MIN_CLIPS``); small stores
are embedded in-process, which is faster than starting actors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import ray
import torch

from asd.model import EmbeddingNet, ModelConfig
from asd.training import embed_clips
from pipelines.compute_process import prepare_compute_process
from pipelines.config import PipelineConfig
from pipelines import ray_runtime


class _Embedder:
    """Ray Data actor: rebuilds the network once, then embeds batches of clips."""

    def __init__(self, model_cfg: dict, state: dict, batch_size: int, window, hop: int, threads: int):
        prepare_compute_process(threads)
        self.model = EmbeddingNet(ModelConfig(**model_cfg))
        self.model.load_state_dict(state)
        self.model.eval()
        self.batch_size, self.window, self.hop = batch_size, window, hop

    def __call__(self, batch: dict) -> dict:
        feats = [torch.from_numpy(np.asarray(f, dtype=np.float32).reshape(int(m), -1))
                 for f, m in zip(batch["features"], batch["n_mels"])]
        z = embed_clips(self.model, feats, range(len(feats)), self.batch_size,
                        window=self.window, hop=self.hop)
        return {"i": batch["i"], "embedding": z.numpy()}


def embed_with_ray(model, features: list[torch.Tensor], cfg: PipelineConfig, window: int | None
                   ) -> torch.Tensor:
    """Embeddings [N, D] of ``features`` computed by an actor pool on the Ray cluster."""
    ray_runtime.init_ray(cfg.ray.address, cfg.ray.num_cpus)
    n_cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    actors = max(1, min(n_cpus, 8))
    items = [{"i": i, "n_mels": f.shape[0], "features": f.flatten().numpy()}
             for i, f in enumerate(features)]
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    ds = ray.data.from_items(items, override_num_blocks=actors * 4).map_batches(
        _Embedder, fn_constructor_args=(dataclasses.asdict(model.cfg), state, cfg.score.batch_size,
                                        window, cfg.score.window_hop, 1),
        batch_size=cfg.score.batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    out = torch.zeros(len(features), model.cfg.embedding_dim)
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        out[torch.tensor(batch["i"])] = torch.tensor(batch["embedding"])  # Ray hands out read-only arrays
    return out
