"""The official DCASE 2022 Task 2 autoencoder baseline (the paper's Table 1 "AutoEncoder" row).

Log-Mel (128 bins, n_fft 1024, hop 512) -> 5 consecutive frames concatenated into 640-dim
vectors -> dense autoencoder 640 -> 128 x4 -> 8 -> 128 x4 -> 640 with batch norm and ReLU,
MSE loss; the anomaly score of a clip is the mean reconstruction error over its vectors.
One model per machine type.
"""

from __future__ import annotations

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


def _dense(i: int, o: int) -> list[nn.Module]:
    return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]


class DenseAutoencoder(nn.Module):
    """640 -> [128]x4 -> 8 -> [128]x4 -> 640, batch norm + ReLU after every hidden layer."""

    def __init__(self, cfg: AEConfig = AEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        enc = _dense(cfg.input_dim, h) + _dense(h, h) + _dense(h, h) + _dense(h, h) + _dense(h, cfg.bottleneck)
        dec = _dense(cfg.bottleneck, h) + _dense(h, h) + _dense(h, h) + _dense(h, h) + [nn.Linear(h, cfg.input_dim)]
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
