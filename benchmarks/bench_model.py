"""Cost of the stem choice: forward+backward samples/s of EmbeddingNet on 1x128x64 crops for the
standard (7x7/2 + max-pool) and stride-1 stems at several widths, plus the last feature map size.

    .venv/bin/python benchmarks/bench_model.py [--threads 2] [--seconds 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from asd.model import EmbeddingNet, ModelConfig


def samples_per_s(model: torch.nn.Module, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 1, 128, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model(x).sum().backward()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| stem | width | samples/s (fwd+bwd, batch 32) | last map, 64-frame crop | last map, 313 frames |")
    print("|---|---|---|---|---|")
    for stem in ("standard", "stride1"):
        for w in args.widths:
            model = EmbeddingNet(ModelConfig(width=w, stem=stem))
            with torch.no_grad():
                crop = tuple(model.feature_map(torch.randn(1, 1, 128, 64)).shape[2:])
                clip = tuple(model.feature_map(torch.randn(1, 1, 128, 313)).shape[2:])
            rate = samples_per_s(model, 32, args.seconds)
            print(f"| {stem} | {w} | {rate:.1f} | {crop[0]}x{crop[1]} | {clip[0]}x{clip[1]} |", flush=True)


if __name__ == "__main__":
    main()
