"""The epoch-level prototype all-reduce on Ray Train (gloo): 2 workers on disjoint shards give
the same prototypes (and MPE sub-prototypes) as 1 process on all data, including classes that
only one worker holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asd.model import EmbeddingNet, ModelConfig
from asd.training import epoch_prototypes

ray = pytest.importorskip("ray")

N_CLIPS, N_CLASSES = 23, 5
MODEL_CFG = ModelConfig(width=8, embedding_dim=16, attention_dim=8, n_mels=32)


def _data():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(32, 64 + 3 * (i % 4), generator=g) for i in range(N_CLIPS)]
    labels = torch.randint(0, N_CLASSES - 1, (N_CLIPS,), generator=g)
    labels[4] = N_CLASSES - 1  # the last class sits on one clip: rank 0 of 2 holds it (4 % 2 == 0)
    return features, labels


def _model():
    torch.manual_seed(1)
    return EmbeddingNet(MODEL_CFG).eval()


def _prototypes(local, all_reduce=None):
    features, labels = _data()
    kwargs = {"all_reduce": all_reduce} if all_reduce else {}
    p = epoch_prototypes(_model(), features, labels, local, N_CLASSES, mpe_ratio=0.5, mpe_per_class=2,
                         generator=torch.Generator().manual_seed(7), batch_size=4, **kwargs)
    return p.prototypes, p.prototype_class


def _worker(cfg):
    import ray.train

    from pipelines.distributed import worker_group

    workers = worker_group()
    rank = workers.rank
    protos, _ = _prototypes(range(rank, N_CLIPS, workers.world), workers.all_reduce)
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(protos.tolist()))
    ray.train.report({"done": 1})


@pytest.mark.slow
def test_two_workers_equal_one_process(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    reference, proto_class = _prototypes(range(N_CLIPS))
    assert proto_class.tolist() == list(range(N_CLASSES)) + [c for c in range(N_CLASSES) for _ in range(2)]
    _, labels = _data()
    assert (labels[1::2] == N_CLASSES - 1).sum() == 0  # rank 1 really lacks the last class

    TorchTrainer(
        _worker, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="allreduce", storage_path=str(tmp_path / "ray")),
    ).fit()
    for rank in (0, 1):
        got = torch.tensor(json.loads((tmp_path / f"rank{rank}.json").read_text()))
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_single_rank_share_sums_match_loop():
    """Independent check of Eq. 2 on the embeddings: prototype = normalised class mean."""
    features, labels = _data()
    model = _model()
    protos, _ = _prototypes(range(N_CLIPS))
    with torch.no_grad():
        z = torch.cat([model(f[None, None]) for f in features]).double()
    for c in range(N_CLASSES):
        mean = z[labels == c].mean(0)
        torch.testing.assert_close(protos[c].double(), mean / mean.norm(), atol=1e-5, rtol=0)


def test_window_mean_prototypes_match_loop():
    """``prototype_embedding: windows``: a clip's embedding is the re-normalised mean over its
    64-frame windows (hop 2 here, the last window aligned to the clip's end), the prototype the
    normalised class mean of those."""
    features, labels = _data()
    model = _model()
    got = epoch_prototypes(model, features, labels, range(N_CLIPS), N_CLASSES, mpe_ratio=None,
                           mpe_per_class=1, generator=torch.Generator().manual_seed(7), batch_size=3,
                           window=64, hop=2).prototypes
    clip_z = []
    with torch.no_grad():
        for f in features:
            starts = sorted(set(range(0, f.shape[1] - 64 + 1, 2)) | {f.shape[1] - 64})
            wins = torch.stack([f[:, s:s + 64] for s in starts])
            m = model(wins[:, None]).double().mean(0)
            clip_z.append(m / m.norm())
    z = torch.stack(clip_z)
    assert not torch.allclose(got, _prototypes(range(N_CLIPS))[0][:N_CLASSES])  # windows matter
    for c in range(N_CLASSES):
        mean = z[labels == c].mean(0)
        torch.testing.assert_close(got[c].double(), mean / mean.norm(), atol=1e-5, rtol=0)
