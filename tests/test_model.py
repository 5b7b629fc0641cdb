"""Tests of the embedding network f_theta (asd/model.py): shapes, unit norm, the time-frequency
attention pooling against an explicit loop, input normalisation and state round-trips."""

from __future__ import annotations

import pytest
import torch

from asd.model import EmbeddingNet, ModelConfig, TimeFrequencyAttentionPooling


def _net(stem="standard", width=8, n_mels=32, dim=16, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(width=width, embedding_dim=dim, stem=stem, attention_dim=8, n_mels=n_mels)
    return EmbeddingNet(cfg)


def _randomise_batchnorm(net, seed=1):
    """Give every BatchNorm non-trivial running statistics and affine parameters, so eval-mode
    outputs depend on them (a fresh model's identity BN would hide a state_dict bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("stem", ["standard", "stride1"])
@pytest.mark.parametrize("frames", [64, 100, 313])
def test_output_shape_and_unit_norm(stem, frames):
    n_mels = 128  # the paper's feature height
    net = _net(stem, width=8, n_mels=n_mels).eval()
    x = 10 * torch.randn(3, 1, n_mels, frames, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        z = net(x)
    assert z.shape == (3, 16)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    # 3-d input [B, n_mels, T] is accepted as one channel.
    with torch.no_grad():
        torch.testing.assert_close(net(x[:, 0]), z)


def test_train_mode_forward_and_backward():
    net = _net("standard", width=16, n_mels=32).train()
    x = torch.randn(4, 1, 32, 64, generator=torch.Generator().manual_seed(0))
    z = net(x)
    assert z.shape == (4, 16)
    z.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_eval_mode_is_deterministic_and_per_sample():
    net = _net("standard", width=8, n_mels=32).eval()
    _randomise_batchnorm(net)
    x = torch.randn(4, 1, 32, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(x), net(x)
        single = torch.cat([net(x[i:i + 1]) for i in range(4)])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a, rtol=1e-5, atol=1e-6)


def test_attention_weights_sum_to_one_and_pooling_matches_loop():
    torch.manual_seed(0)
    pool = TimeFrequencyAttentionPooling(channels=6, attention_dim=5).double()
    h = torch.randn(2, 6, 4, 7, dtype=torch.float64)
    alpha, beta = pool.weights(h)
    assert alpha.shape == (2, 4) and beta.shape == (2, 7)
    torch.testing.assert_close(alpha.sum(1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(beta.sum(1), torch.ones(2, dtype=torch.float64))
    assert (alpha > 0).all() and (beta > 0).all()
    # Weights are not trivially uniform for random parameters.
    assert alpha.std() > 1e-4 and beta.std() > 1e-4
    pooled = pool(h)
    ref = torch.zeros(2, 6, dtype=torch.float64)
    for b in range(2):
        for f in range(4):
            for t in range(7):
                ref[b] += alpha[b, f] * beta[b, t] * h[b, :, f, t]
    torch.testing.assert_close(pooled, ref, rtol=0, atol=1e-12)


def test_attention_weights_follow_documented_formula():
    """alpha = softmax_F(v_f . tanh(W_f mean_T(H) + b) + c), beta likewise over time."""
    torch.manual_seed(3)
    pool = TimeFrequencyAttentionPooling(channels=5, attention_dim=3).double()
    h = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    alpha, beta = pool.weights(h)

    def ref_weights(seq, score):  # seq [C, L] -> softmax over L of the 2-layer 1x1-conv score
        w1, b1 = score[0].weight[:, :, 0], score[0].bias
        w2, b2 = score[2].weight[:, :, 0], score[2].bias
        s = torch.stack([(w2 @ torch.tanh(w1 @ seq[:, i] + b1) + b2)[0] for i in range(seq.shape[1])])
        e = torch.exp(s - s.max())
        return e / e.sum()

    for b in range(2):
        torch.testing.assert_close(alpha[b], ref_weights(h[b].mean(dim=2), pool.freq_score))
        torch.testing.assert_close(beta[b], ref_weights(h[b].mean(dim=1), pool.time_score))


def test_pooling_is_convex_combination_of_cells():
    torch.manual_seed(4)
    pool = TimeFrequencyAttentionPooling(channels=3, attention_dim=4)
    h = torch.randn(1, 3, 5, 5)
    pooled = pool(h)
    flat = h.flatten(2)
    assert (pooled >= flat.min(dim=2).values - 1e-6).all()
    assert (pooled <= flat.max(dim=2).values + 1e-6).all()
    # A constant map pools to the constant.
    const = torch.full((1, 3, 5, 5), 2.5)
    torch.testing.assert_close(pool(const), torch.full((1, 3), 2.5))


def test_set_input_stats_normalises_per_mel_bin():
    n_mels = 16
    net = _net("standard", width=8, n_mels=n_mels).eval()
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(n_mels, generator=g) * 20 - 40
    std = torch.rand(n_mels, generator=g) * 5 + 1
    std[3] = 1e-6  # clamped to 1e-3
    x = torch.randn(2, 1, n_mels, 64, generator=g) * 10 - 40
    net.set_input_stats(mean, std)
    with torch.no_grad():
        got = net(x)
    reference = _net("standard", width=8, n_mels=n_mels).eval()  # same seed -> same weights
    manual = torch.empty_like(x)
    for f in range(n_mels):
        s = max(float(std[f]), 1e-3)
        manual[:, :, f, :] = (x[:, :, f, :] - mean[f]) / s
    with torch.no_grad():
        expected = reference(manual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(net.input_std.flatten()[3]) == pytest.approx(1e-3)


@pytest.mark.parametrize("stem", ["standard", "stride1"])
def test_state_dict_round_trip_gives_identical_outputs(stem):
    n_mels = 16
    net = _net(stem, width=8, n_mels=n_mels, seed=0)
    _randomise_batchnorm(net)
    g = torch.Generator().manual_seed(6)
    net.set_input_stats(torch.randn(n_mels, generator=g), torch.rand(n_mels, generator=g) + 0.5)
    fresh = _net(stem, width=8, n_mels=n_mels, seed=123)  # different initial weights
    x = torch.randn(3, 1, n_mels, 64, generator=g)
    net.eval()
    fresh.eval()
    with torch.no_grad():
        before = fresh(x)
        out = net(x)
    assert not torch.allclose(before, out)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh.input_mean, net.input_mean) and torch.equal(fresh.input_std, net.input_std)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert "input_mean" in net.state_dict() and "input_std" in net.state_dict()


def test_model_config_validation_and_blocks_tuple():
    with pytest.raises(ValueError):
        ModelConfig(stem="wide")
    cfg = ModelConfig(blocks=[1, 1])
    assert cfg.blocks == (1, 1)
    net = EmbeddingNet(ModelConfig(width=4, embedding_dim=8, blocks=[1, 1], attention_dim=4, n_mels=16)).eval()
    with torch.no_grad():
        z = net(torch.randn(2, 1, 16, 64))
    assert z.shape == (2, 8)
    # Width doubles per stage: last stage has width * 2**(len(blocks)-1) channels.
    assert net.project.in_features == 4 * 2


def test_synced_batchnorm_on_one_worker_is_batchnorm():
    """SyncedBatchNorm2d with the one-worker sum: outputs, gradients and running statistics of
    torch's BatchNorm2d, over several training steps (inputs with a large mean, where a
    one-pass variance would lose precision), and the same state-dict keys."""
    import copy

    from asd.model import SyncedBatchNorm2d, sync_batchnorm

    torch.manual_seed(0)
    reference = EmbeddingNet(ModelConfig(width=8, embedding_dim=16, attention_dim=8, n_mels=32))
    synced = sync_batchnorm(copy.deepcopy(reference), lambda t: t)
    assert any(isinstance(m, SyncedBatchNorm2d) for m in synced.modules())
    assert list(synced.state_dict()) == list(reference.state_dict())
    for _ in range(3):
        x = torch.randn(6, 1, 32, 64) * 3 + 50
        a, b = reference(x), synced(x)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        a.pow(2).sum().backward()
        b.pow(2).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), synced.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-3, rtol=1e-3, msg=name)
    for (name, r), s in zip(reference.named_buffers(), synced.buffers()):
        torch.testing.assert_close(s.float(), r.float(), atol=1e-4, rtol=1e-4, msg=name)


def _down(n: int) -> int:
    """Output length of a stride-2 convolution or pooling with 'same' padding (k=3/p=1, k=7/p=3)."""
    return (n - 1) // 2 + 1


def _ref_trunk_shapes(cfg: ModelConfig, height: int, frames: int) -> list[tuple[int, int, int]]:
    """(channels, F, T) after every residual block: the standard stem halves twice (7x7/2 conv,
    3x3/2 max-pool), stride1 keeps the size; stage i has width * 2**i channels and its first
    block halves F and T for i > 0."""
    f, t = (_down(_down(height)), _down(_down(frames))) if cfg.stem == "standard" else (height, frames)
    shapes = []
    for i, n in enumerate(cfg.blocks):
        if i > 0:
            f, t = _down(f), _down(t)
        shapes += [(cfg.width * 2**i, f, t)] * n
    return shapes


def _ref_parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters from the layer shapes: bias-free convolutions, BatchNorm weight+bias,
    a 1x1 projection skip (conv + BN) where a block changes stride or width, two 2-layer 1x1-conv
    attention scorers and the linear projection."""
    w, a = cfg.width, cfg.attention_dim
    total = (49 if cfg.stem == "standard" else 9) * w + 2 * w
    c_in = w
    for i, n in enumerate(cfg.blocks):
        c = w * 2**i
        for j in range(n):
            cin = c_in if j == 0 else c
            total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c
            if (i > 0 and j == 0) or cin != c:
                total += cin * c + 2 * c
        c_in = c
    total += 2 * (c_in * a + a + a + 1)
    return total + c_in * cfg.embedding_dim + cfg.embedding_dim


@pytest.mark.parametrize("stem, blocks, height, frames", [
    ("standard", (2, 2, 2, 2), 128, 313), ("standard", (2, 2, 2, 2), 40, 101),
    ("stride1", (2, 2, 2, 2), 32, 70), ("standard", (1, 3, 2), 64, 64)])
def test_trunk_feature_map_sizes_and_parameter_count(stem, blocks, height, frames):
    """Feature map after every residual block, and the parameter count, from the architecture."""
    cfg = ModelConfig(width=4, embedding_dim=16, stem=stem, blocks=blocks, attention_dim=8, n_mels=height)
    net = EmbeddingNet(cfg).eval()
    seen = []
    for block in net.trunk:
        block.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:])))
    with torch.no_grad():
        net(torch.randn(2, 1, height, frames))
    assert seen == _ref_trunk_shapes(cfg, height, frames)
    assert sum(p.numel() for p in net.parameters()) == _ref_parameter_count(cfg)


def test_default_trunk_has_resnet18_parameter_count():
    """Stem + residual stages at width 64 are ResNet18's (11,689,512 parameters in torchvision)
    less its 1000-way fc (513,000) and with a 1-channel instead of 3-channel 7x7 input conv."""
    net = EmbeddingNet(ModelConfig())
    trunk = sum(p.numel() for m in (net.stem, net.trunk) for p in m.parameters())
    assert trunk == 11_689_512 - 513_000 - 7 * 7 * 64 * (3 - 1)
