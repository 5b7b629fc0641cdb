"""Stage -> loss wiring of the training stage (pipelines/detectors/prototype.py StageTrainer), in one process
without Ray: pre-training calls asd.training.pretrain_loss with pretrain.tau, fine-tuning calls
finetune_loss with finetune.tau and finetune.npe_lambda; the first step's loss is recomputed from
the recorded embeddings with an independent numpy loop."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from pipelines.config import load_config

N_CLIPS, N_CLASSES, N_MELS = 8, 2, 16
PRE_TAU, FINE_TAU, NPE = 0.11, 0.23, [0.3, 0.4]


def _cfg():
    return load_config("tiny", [f"features.n_mels={N_MELS}", f"model.n_mels={N_MELS}", "model.width=4",
                                "model.embedding_dim=8", "model.attention_dim=4", "pretrain.batch_size=4",
                                f"pretrain.tau={PRE_TAU}", f"finetune.tau={FINE_TAU}", f"finetune.npe_lambda={NPE}",
                                "finetune.n_classes=2", "finetune.k=2"])


def _data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLIPS) % N_CLASSES
    return [torch.randn(N_MELS, 70, generator=g) + labels[i] for i in range(N_CLIPS)], labels


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args):
        calls.append((name, [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]))
        return real(*args)

    monkeypatch.setattr(module, name, spy)


def _run_epoch(stage, monkeypatch):
    """(calls of pretrain_loss/finetune_loss, the step losses) of epoch 0 of ``stage``."""
    from pipelines.detectors.prototype import StageTrainer

    features, labels = _data()
    trainer = StageTrainer(_cfg(), stage, features, labels, N_CLASSES)
    module = importlib.import_module(type(trainer).__module__)  # where the loss names are looked up
    calls = []
    for name in ("pretrain_loss", "finetune_loss"):
        _spy(monkeypatch, module, name, calls)
    trainer.epoch(0)
    return calls, trainer.step_losses


def _ref_loss(z, labels, prototypes, prototype_class, tau):
    """-log softmax over all prototypes / tau, averaged over the anchor's own-class prototypes
    (Eq. 3; Eq. 1 with one prototype per class), mean over anchors."""
    z, p = z.double().numpy(), prototypes.double().numpy()
    total = 0.0
    for b in range(len(z)):
        logits = p @ z[b] / tau
        log_prob = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        total -= log_prob[prototype_class.numpy() == int(labels[b])].mean()
    return total / len(z)


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def test_pretraining_uses_the_pretrain_loss_with_pretrain_tau(monkeypatch):
    """Every pre-training step calls pretrain_loss(z, y, epoch prototypes, pretrain.tau) only."""
    calls, losses = _run_epoch("pretrain", monkeypatch)
    assert [name for name, _ in calls] == ["pretrain_loss"] * len(losses) and len(losses) == 2
    z, y, protos, tau = calls[0][1]
    assert tau == PRE_TAU
    assert protos.prototypes.shape[0] > N_CLASSES  # MPE sub-prototypes (tiny: mpe_ratio 0.25)
    want = _ref_loss(z, y, protos.prototypes, protos.prototype_class, PRE_TAU)
    assert losses[0] == pytest.approx(want, rel=1e-5)


def test_finetuning_uses_the_finetune_loss_with_its_tau_and_npe(monkeypatch):
    """Every fine-tuning step calls finetune_loss(z, y, finetune.tau, finetune.npe_lambda, g) only;
    with NPE the loss exceeds the plain balanced-batch loss (Eq. 4) of the same embeddings."""
    calls, losses = _run_epoch("finetune", monkeypatch)
    assert [name for name, _ in calls] == ["finetune_loss"] * len(losses) and len(losses) == 2
    z, y, tau, npe_lambda, generator = calls[0][1]
    assert tau == FINE_TAU and list(npe_lambda) == NPE and isinstance(generator, torch.Generator)
    classes = torch.unique(y)
    batch_protos = _unit(torch.stack([z[y == c].sum(0) for c in classes]))
    balanced = _ref_loss(z, torch.searchsorted(classes, y), batch_protos, torch.arange(len(classes)), FINE_TAU)
    assert losses[0] > balanced + 1e-3
