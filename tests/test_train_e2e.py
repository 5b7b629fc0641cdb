"""Ray Train end to end on the `tiny` synthetic preset with 2 gloo workers: pre-training then
fine-tuning run, the loss falls, checkpoints load in the scoring code, and a worker that fails
mid-run is recovered from the last checkpoint rather than from scratch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipelines.checkpoints import load_model
from pipelines.config import load_config


pytestmark = pytest.mark.slow  # Ray Train runs of the tiny preset


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, ray_session):
    from pipelines.stages.extract import extract
    from pipelines.synth.generate import PRESETS, generate

    root = tmp_path_factory.mktemp("tiny")
    generate(PRESETS["tiny"], root / "data", seed=0, workers=2)
    cfg = load_config("tiny", [f"run_dir={root / 'run'}", f"data.root={root / 'data'}"])
    store = cfg.path(cfg.extract.store)
    summary = extract(root / "data", store, cfg.features)
    assert summary.extracted > 0
    return cfg, store


def _history(model_dir: Path) -> pd.DataFrame:
    return pd.read_csv(model_dir / "history.csv")


# the loss is measured against prototypes that move every epoch, so on tiny data it climbs for a
# few epochs before it falls (5 seeds measured): 30 epochs, lr step at 20, the ends compared
PRETRAIN_EPOCHS, PRETRAIN_MILESTONES = 30, [20]


@pytest.fixture(scope="module")
def pretrained(tiny_store):
    from pipelines.detectors.prototype import run_training

    cfg, store = tiny_store
    cfg.pretrain.epochs, cfg.pretrain.lr_milestones = PRETRAIN_EPOCHS, PRETRAIN_MILESTONES
    return run_training(cfg, "pretrain", store=store, out_dir=cfg.path("models/pretrain"))


def test_pretrain_then_finetune_two_workers(tiny_store, pretrained):
    from pipelines.detectors.prototype import embed_table
    from pipelines.store import load_split
    from pipelines.detectors.prototype import run_training

    cfg, store = tiny_store
    hist = _history(pretrained)
    assert list(hist["epoch"]) == list(range(PRETRAIN_EPOCHS))
    assert hist["loss"].iloc[-3:].mean() < hist["loss"].iloc[:3].mean() - 0.1, hist["loss"].tolist()
    assert hist["samples_per_s"].gt(0).all()

    fine = run_training(cfg, "finetune", store=store, out_dir=cfg.path("models/finetune"),
                        init_model=pretrained)
    assert len(_history(fine)) == cfg.finetune.epochs
    model, meta = load_model(fine)
    assert meta["stage"] == "finetune" and meta["epochs"] == cfg.finetune.epochs
    # fine-tuning started from the pre-trained weights: the input statistics carried over
    pre_model, _ = load_model(pretrained)
    torch.testing.assert_close(model.input_mean, pre_model.input_mean)
    # the scoring code embeds with the checkpoint: unit-length embeddings for every test clip
    test = load_split(store, "test", feature_version=cfg.features.version)
    emb = embed_table(model, test, cfg, use_ray=False)
    assert emb.shape == (len(test.features), cfg.model.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-4, rtol=0)
    # the Ray Data actor pool (used for large stores) gives the same embeddings as in-process
    for mode in ("whole", "windows"):
        cfg.score.embedding = mode
        torch.testing.assert_close(embed_table(model, test, cfg, use_ray=True),
                                   embed_table(model, test, cfg, use_ray=False), atol=1e-5, rtol=0)
    cfg.score.embedding = "whole"


@dataclass(frozen=True)
class FailOnce:
    """Epoch callback: the worker of ``rank`` raises at the start of ``epoch``, once (the marker
    file, shared by the restarted group, says it already did)."""

    epoch: int
    rank: int
    marker: str

    def __call__(self, epoch: int, rank: int) -> None:
        if (epoch, rank) == (self.epoch, self.rank) and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"failed at epoch {epoch}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch} (fault test)")


def test_worker_failure_resumes_from_checkpoint_exactly(tiny_store, pretrained, tmp_path):
    """A worker fails at epoch 2 of a 4-epoch run; the restarted group resumes from the last
    checkpoint registered (epoch 1's, or 0's if epoch 1's report was not yet), and every epoch's loss equals the uninterrupted run's (same seed and schedule):
    the weights, optimizer, scheduler and random streams all came back, and two runs of one
    config train the same model."""
    from pipelines.detectors.prototype import run_training

    cfg, store = tiny_store
    # the first 4 epochs of the pretrained fixture's schedule: no lr step before epoch 20
    cfg.pretrain.epochs, cfg.pretrain.lr_milestones, cfg.train.max_failures = 4, [], 1
    marker = tmp_path / "failed-once"
    out = run_training(cfg, "pretrain", store=store, out_dir=tmp_path / "model", run_name="fault-test",
                       callbacks=[FailOnce(epoch=2, rank=1, marker=str(marker))])
    assert marker.is_file(), "the injected failure did not happen"
    hist = _history(out)
    # the restarted worker group resumed from the last checkpoint registered before the failure:
    # epoch 1's (resuming at 2), or epoch 0's when the controller saw the failure before it had
    # registered epoch 1's report (a race on 2 loaded cores, seen in CI); never from scratch
    after = hist[hist["resumed_from_epoch"] >= 0]
    assert not after.empty, hist
    start = int(after["epoch"].iloc[0])
    assert start in (1, 2) and set(after["resumed_from_epoch"]) == {start}, hist
    assert after["epoch"].tolist() == list(range(start, 4))
    assert hist["epoch"].tolist() == list(range(4)) and (hist["resumed_from_epoch"].iloc[:start] == -1).all(), hist
    _, meta = load_model(out)
    assert meta["epochs"] == cfg.pretrain.epochs
    uninterrupted = _history(pretrained)["loss"].iloc[:4].tolist()
    assert hist["loss"].tolist() == uninterrupted


@dataclass(frozen=True)
class DiskFullAt:
    """Epoch callback: rank 0 writes to /dev/full at the start of ``epoch``, the kernel's own
    ENOSPC raised inside a training worker, as a checkpoint written on a full disk raises it."""

    epoch: int

    def __call__(self, epoch: int, rank: int) -> None:
        if (epoch, rank) == (self.epoch, 0):
            with open("/dev/full", "wb") as f:
                f.write(b"checkpoint")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_in_a_training_worker_reaches_the_cli_as_the_full_disk(tiny_store, tmp_path):
    """Ray Train reports a worker's error as a WorkerGroupError with its traceback; a full disk
    behind it is raised as the OSError itself, which the CLI turns into its one line (tested in
    test_bad_input.py)."""
    import errno

    import ray.train

    from pipelines.detectors.prototype import run_training

    cfg, store = tiny_store
    cfg.pretrain.epochs, cfg.pretrain.lr_milestones, cfg.train.max_failures = 2, [], 0
    with pytest.raises(OSError) as info:
        run_training(cfg, "pretrain", store=store, out_dir=tmp_path / "model", run_name="disk-full",
                     callbacks=[DiskFullAt(epoch=1)])
    assert info.value.errno == errno.ENOSPC
    assert not isinstance(info.value, ray.train.TrainingFailedError)
    assert not (tmp_path / "model").exists()  # no model from a failed run
