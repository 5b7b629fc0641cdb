"""The embedding network f_theta (paper Sec. 4.2): ResNet18 with Time-Frequency Attention Pooling.

Input: features [B, 1, n_mels, T] (any T >= 64). Output: unit-length embeddings [B, D].
The paper gives no formula for the attention pooling; ours is documented in docs/method.md:
separable softmax weights over frequency and over time on the last feature map, whose outer
product weights every time-frequency cell, so the pooled vector is one convex combination.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STEMS = ("standard", "stride1")


@dataclass(frozen=True)
class ModelConfig:
    """Size of the network. The paper uses width 64; CPU demos use 16 or 32.

    ``stem="standard"`` is ResNet's 7x7/2 convolution + 3x3/2 max-pool (4x down-sampling in
    time and frequency before the residual stages); ``"stride1"`` is a 3x3/1 convolution without
    pooling, which keeps 4x more resolution in each axis at ~16-25x the compute.
    """

    width: int = 64
    embedding_dim: int = 128
    stem: str = "standard"
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    attention_dim: int = 64
    n_mels: int = 128  # input height: size of the per-bin normalisation buffers

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 convolutions with batch norm and an identity/projection skip."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class TimeFrequencyAttentionPooling(nn.Module):
    """Pool a feature map [B, C, F, T] to [B, C] with attention over frequency and time.

    alpha = softmax_F(v_f . tanh(W_f mean_T(H)))   (which frequency bands matter)
    beta  = softmax_T(v_t . tanh(W_t mean_F(H)))   (which frames matter)
    pooled = sum_{f,t} alpha_f beta_t H[:, f, t]
    """

    def __init__(self, channels: int, attention_dim: int) -> None:
        super().__init__()
        self.freq_score = nn.Sequential(nn.Conv1d(channels, attention_dim, 1), nn.Tanh(),
                                        nn.Conv1d(attention_dim, 1, 1))
        self.time_score = nn.Sequential(nn.Conv1d(channels, attention_dim, 1), nn.Tanh(),
                                        nn.Conv1d(attention_dim, 1, 1))

    def weights(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights alpha [B, F] and beta [B, T], each summing to one."""
        alpha = self.freq_score(h.mean(dim=3)).squeeze(1).softmax(dim=-1)
        beta = self.time_score(h.mean(dim=2)).squeeze(1).softmax(dim=-1)
        return alpha, beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.weights(h)
        return torch.einsum("bcft,bf,bt->bc", h, alpha, beta)


class EmbeddingNet(nn.Module):
    """f_theta: ResNet18 trunk -> TF attention pooling -> linear projection -> L2 normalisation."""

    def __init__(self, cfg: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.stem == "standard":
            self.stem = nn.Sequential(nn.Conv2d(1, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                      nn.ReLU(inplace=True))
        stages, c_in = [], w
        for i, n in enumerate(cfg.blocks):
            c_out = w * 2**i
            stages += [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1)
                       for j in range(n)]
            c_in = c_out
        self.trunk = nn.Sequential(*stages)
        self.pool = TimeFrequencyAttentionPooling(c_in, cfg.attention_dim)
        self.project = nn.Linear(c_in, cfg.embedding_dim)
        # Per-bin input normalisation, fitted once from training features (set_input_stats).
        self.register_buffer("input_mean", torch.zeros(1, 1, cfg.n_mels, 1))
        self.register_buffer("input_std", torch.ones(1, 1, cfg.n_mels, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-Mel-bin mean/std [n_mels] of the training features (dB scale)."""
        self.input_mean.copy_(mean.reshape(self.input_mean.shape))
        self.input_std.copy_(std.clamp_min(1e-3).reshape(self.input_std.shape))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, n_mels, T] -> last residual feature map [B, C, F', T']."""
        x = (x - self.input_mean) / self.input_std
        return self.trunk(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        z = self.project(self.pool(self.feature_map(x)))
        return F.normalize(z, dim=-1)


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the *global* batch split over
    data-parallel workers, so that one worker and several train the same network.

    ``sum_over_workers`` sums a tensor over workers and carries gradients (its backward sums
    the gradients too, as ``torch.distributed.nn.functional.all_reduce`` does); the identity for
    one worker. ``torch.nn.SyncBatchNorm`` would do this but refuses CPU tensors. One sum per
    forward (count, sum and sum of squares together: collectives dominate on CPU), taken about
    the running mean, which every worker holds identically, so that the variance does not lose
    precision to a large mean. Evaluation mode is plain BatchNorm2d; the state dict is
    BatchNorm2d's.
    """

    sum_over_workers: Callable[[torch.Tensor], torch.Tensor] = staticmethod(lambda t: t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        shifted = x - self.running_mean.view(1, -1, 1, 1)
        count = torch.tensor([x.numel() / c], dtype=shifted.dtype, device=x.device)  # not bf16: exact
        local = torch.cat([shifted.sum(dim=(0, 2, 3)), shifted.pow(2).sum(dim=(0, 2, 3)), count])
        total = self.sum_over_workers(local)
        n = total[-1]
        shift_mean = total[:c] / n
        var = (total[c:2 * c] / n - shift_mean.pow(2)).clamp_min(0)
        mean = shift_mean + self.running_mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def sync_batchnorm(model: nn.Module, sum_over_workers: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """Turn every BatchNorm2d of ``model`` into a :class:`SyncedBatchNorm2d` (in place, same
    parameters and buffers) that sums its statistics with ``sum_over_workers``. (On CUDA,
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` is the fused equivalent.)"""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            if not (module.track_running_stats and isinstance(module.momentum, float)):
                raise ValueError("SyncedBatchNorm2d needs running statistics with a fixed momentum")
            module.__class__ = SyncedBatchNorm2d
        if isinstance(module, SyncedBatchNorm2d):
            module.sum_over_workers = sum_over_workers
    return model
