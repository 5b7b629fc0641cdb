"""The official DCASE 2022 Task 2 autoencoder baseline (the paper's Table 1 "AutoEncoder" row).

Log-Mel as librosa computes it (``features.kind=librosa_logmel``: 128 bins, n_fft 1024, hop 512,
Slaney Mel scale and area normalisation) -> every run of 5 consecutive frames concatenated into a
640-dim vector -> dense autoencoder 640 -> 128 x4 -> 8 -> 128 x4 -> 640 with batch norm and ReLU,
MSE loss, Adam (lr 1e-3), batch 512, 100 epochs, the last 10 % of the file-ordered vectors held
out for validation (Keras ``validation_split=0.1``). One model per machine type. The anomaly
score of a clip is the mean reconstruction error over its vectors; the decision threshold is the
0.9 quantile of a gamma distribution fitted to the training clips' scores of the machine type.
docs/method.md ("AE baseline: faithful to the official recipe") lists what was checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AEConfig:
    n_mels: int = 128
    frames: int = 5
    hidden: int = 128
    bottleneck: int = 8

    @property
    def input_dim(self) -> int:
        return self.n_mels * self.frames


def frame_vectors(features: torch.Tensor, frames: int) -> torch.Tensor:
    """[n_mels, T] -> [T - frames + 1, frames * n_mels]; vector t holds frames t..t+frames-1,
    frame-major (the baseline's ``vector[:, n_mels*k:n_mels*(k+1)] = logmel[:, k:k+n].T``)."""
    windows = features.unfold(1, frames, 1)  # [n_mels, n_vectors, frames]
    return windows.permute(1, 2, 0).reshape(windows.shape[1], -1)


ADAM_EPS = 1e-7  # Keras' Adam epsilon (PyTorch's default is 1e-8)


def validation_split(n_vectors: Sequence[int], fraction: float) -> list[int]:
    """Training vectors per clip under Keras ``validation_split``: the last ``fraction`` of the
    vectors of all clips concatenated in file order is held out (never trained on).

    Keras splits at ``int(total * (1 - fraction))`` before shuffling, so with equal-length clips
    sorted by name the official baseline never trains on the last section's last clips, target
    domain included. Returns, for every clip, how many of its leading vectors are trained on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation split must be in [0, 1), got {fraction}")
    split_at = int(sum(n_vectors) * (1.0 - fraction))
    out, start = [], 0
    for n in n_vectors:
        out.append(max(0, min(n, split_at - start)))
        start += n
    return out


def _dense(i: int, o: int) -> list[nn.Module]:
    return [_linear(i, o), nn.BatchNorm1d(o, eps=1e-3, momentum=0.01), nn.ReLU()]


def _linear(i: int, o: int) -> nn.Linear:
    """Keras' Dense initialisation: Glorot-uniform weights, zero bias."""
    layer = nn.Linear(i, o)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DenseAutoencoder(nn.Module):
    """640 -> [128]x4 -> 8 -> [128]x4 -> 640, batch norm + ReLU after every hidden layer.

    Initialised and normalised as Keras does (Glorot-uniform weights, zero biases, batch norm
    with epsilon 1e-3 and a running-statistics momentum of 0.99, i.e. PyTorch momentum 0.01).
    """

    def __init__(self, cfg: AEConfig = AEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        enc = _dense(cfg.input_dim, h) + _dense(h, h) + _dense(h, h) + _dense(h, h) + _dense(h, cfg.bottleneck)
        dec = _dense(cfg.bottleneck, h) + _dense(h, h) + _dense(h, h) + _dense(h, h) + [_linear(h, cfg.input_dim)]
        self.net = nn.Sequential(*enc, *dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def reconstruction_error(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """Per-vector mean squared error [N] (the training loss is its mean)."""
    return (model(vectors) - vectors).pow(2).mean(dim=1)


@torch.no_grad()
def clip_scores(model: nn.Module, features: list[torch.Tensor], frames: int) -> torch.Tensor:
    """Anomaly score of each clip: mean reconstruction error over its frame vectors."""
    model.eval()
    return torch.tensor([float(reconstruction_error(model, frame_vectors(f, frames)).mean())
                         for f in features], dtype=torch.float64)
