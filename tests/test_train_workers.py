"""Worker-count invariance (issue: a config means the same optimisation on 1, 2 or 16 workers).

Both training stages split one global batch over the Ray Train workers, gather the embeddings
before the loss and synchronise batch-norm statistics, so 2 workers must reproduce the losses
(and weights) of one process over the first steps, up to float summation order. The single
process here is the plain loop without Ray; the 2-worker run is real Ray Train (gloo, DDP).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import load_config

N_CLIPS, N_CLASSES, N_MELS = 24, 4, 32
EPOCHS = 3
STAGES = ("pretrain", "finetune")


def _cfg(stage: str):
    # tiny network; pre-training batch 8 and fine-tuning N x K = 3 x 2 are global batches
    return load_config("tiny", ["features.n_mels=32", "model.n_mels=32", "model.width=4", "model.embedding_dim=8",
                                "model.attention_dim=4", "pretrain.batch_size=8", "pretrain.lr=0.01", "finetune.lr=0.01",
                                f"pretrain.epochs={EPOCHS}", "pretrain.lr_milestones=[2]",
                                "pretrain.mpe_ratio=0.5", f"finetune.epochs={EPOCHS}",
                                "finetune.n_classes=3", "finetune.k=2", "finetune.min_steps=9",
                                "train.seed=5"])


def _data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLIPS) % N_CLASSES
    features = [torch.randn(N_MELS, 70 + (i % 3), generator=g) + 0.3 * labels[i] for i in range(N_CLIPS)]
    return features, labels


def _train(stage: str, workers=None) -> tuple[list[float], dict]:
    from pipelines.detectors.prototype import StageTrainer

    features, labels = _data()
    kwargs = {"workers": workers} if workers is not None else {}
    trainer = StageTrainer(_cfg(stage), stage, features, labels, N_CLASSES, **kwargs)
    if workers is not None and workers.world > 1:
        import ray.train

        trainer.wrap(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    losses = []
    for epoch in range(EPOCHS):
        trainer.epoch(epoch)
        losses += trainer.step_losses
    return losses, {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}


def _worker(cfg):
    import ray.train

    from pipelines.distributed import worker_group

    workers = worker_group()
    out = Path(cfg["out"])
    for stage in STAGES:
        losses, state = _train(stage, workers)
        (out / f"{stage}-rank{workers.rank}.json").write_text(json.dumps(losses))
        if workers.rank == 0:
            torch.save(state, out / f"{stage}-state.pt")
    ray.train.report({"done": 1})


@pytest.mark.slow
def test_two_workers_train_like_one_process(ray_session, tmp_path):
    """Both stages, one after the other in one worker group (its start-up is most of the time)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    references = {stage: _train(stage) for stage in STAGES}
    for stage, (reference_losses, _) in references.items():  # the loss moves: the check has teeth
        assert len(set(reference_losses)) == len(reference_losses) >= 9, stage
    TorchTrainer(
        _worker, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="workers", storage_path=str(tmp_path / "ray")),
    ).fit()
    for stage, (reference_losses, reference_state) in references.items():
        for rank in (0, 1):
            losses = json.loads((tmp_path / f"{stage}-rank{rank}.json").read_text())
            # every step's loss; float summation order differs, and the SGD steps amplify it a little
            assert losses == pytest.approx(reference_losses, rel=1e-3, abs=1e-5), (stage, rank)
        state = torch.load(tmp_path / f"{stage}-state.pt", weights_only=True)
        for name, value in reference_state.items():
            torch.testing.assert_close(state[name].float(), value.float(), atol=1e-3, rtol=1e-2, msg=f"{stage} {name}")


def test_steps_do_not_depend_on_workers():
    """Steps per epoch come from the global batch (and min_steps), never from the worker count."""
    from asd.training import Workers
    from pipelines.detectors.prototype import StageTrainer

    features, labels = _data()
    for stage, natural in (("pretrain", N_CLIPS // 8), ("finetune", -(-N_CLIPS // 6))):
        one = StageTrainer(_cfg(stage), stage, features, labels, N_CLASSES)
        two = StageTrainer(_cfg(stage), stage, features, labels, N_CLASSES,
                           workers=Workers(1, 2, lambda t: None, lambda t: t))  # counts only
        assert one.steps == two.steps
        min_steps = _cfg(stage).finetune.min_steps if stage == "finetune" else None
        assert one.steps == max(natural, -(-min_steps // EPOCHS) if min_steps else natural)
