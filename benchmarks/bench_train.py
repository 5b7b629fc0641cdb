"""Training throughput: the same pre-training step (random 64-frame crops, Eq. 3 loss against
fixed prototypes, SGD) in a plain PyTorch loop and inside a 1-worker Ray Train TorchTrainer,
in one run. Reports steady-state samples/s (after warm-up) and the Ray overhead.

    .venv/bin/python benchmarks/bench_train.py [--width 16] [--steps 60] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from asd.losses import multi_prototype_loss
from asd.model import EmbeddingNet, ModelConfig
from asd.sampler import random_crops
from pipelines.compute_process import prepare_compute_process
from pipelines.ray_runtime import TRAIN_ENV


def _setup(width: int, n_clips: int, n_classes: int, device: str, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(128, 313, generator=g) for _ in range(n_clips)]
    labels = torch.randint(0, n_classes, (n_clips,), generator=g)
    torch.manual_seed(0)
    model = EmbeddingNet(ModelConfig(width=width)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    protos = torch.nn.functional.normalize(torch.randn(2 * n_classes, 128, generator=g), dim=1).to(device)
    proto_class = torch.arange(n_classes).repeat(2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    return features, labels, model, protos, proto_class, opt


def timed_steps(cfg: dict, model_wrapper=None) -> dict:
    """Run warm-up + measured steps; return samples/s of the measured part. The process is set up
    as the pipeline's training workers are (threads, allocator), in both the plain and the Ray run,
    unless ``default_allocator`` asks to measure glibc's default allocator settings."""
    if cfg["default_allocator"]:
        torch.set_num_threads(cfg["threads"])
    else:
        prepare_compute_process(cfg["threads"])
    device = cfg["device"]
    features, labels, model, protos, proto_class, opt = _setup(
        cfg["width"], cfg["clips"], cfg["classes"], device, cfg["channels_last"])
    if model_wrapper is not None:
        model = model_wrapper(model)
    g = torch.Generator().manual_seed(1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg["bf16"] and device == "cuda")

    def step():
        idx = torch.randint(len(features), (cfg["batch"],), generator=g)
        x = random_crops(features, idx, 64, g).unsqueeze(1).to(device, non_blocking=True)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            z = model(x).float()
        loss = multi_prototype_loss(z, labels[idx].to(device), protos, proto_class)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(cfg["warmup"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"samples_per_s": cfg["steps"] * cfg["batch"] / seconds, "seconds": seconds}


def _ray_worker(cfg: dict) -> None:
    import ray.train

    result = timed_steps(cfg)
    # Result.metrics is None without a checkpoint (Ray Train V2): hand the figures over in a file
    Path(cfg["result_file"]).write_text(json.dumps(result))
    ray.train.report(result)


def run_ray(cfg: dict) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=max(2, cfg["threads"]), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent), **TRAIN_ENV}})
    cfg = {**cfg, "result_file": tempfile.mktemp(suffix=".json")}
    t0 = time.perf_counter()
    TorchTrainer(
        _ray_worker, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg["device"] == "cuda",
                                     resources_per_worker={"CPU": cfg["threads"]}),
        run_config=RunConfig(name=f"bench-{int(t0)}", storage_path="/tmp/asd-bench-ray"),
    ).fit()
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {**json.loads(Path(cfg["result_file"]).read_text()), "wall_seconds_incl_startup": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="alternate plain/Ray this many times")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's allocator settings alone (the pipeline tunes them)")
    args = p.parse_args()
    cfg = vars(args)
    plain, ray_runs = [], []
    for _ in range(args.repeats):  # alternate to spread machine noise over both
        plain.append(timed_steps(cfg)["samples_per_s"])
        ray_runs.append(run_ray(cfg)["samples_per_s"])
    best_plain, best_ray = max(plain), max(ray_runs)
    print(json.dumps({"config": cfg, "machine": platform.processor() or platform.machine(), **TRAIN_ENV,
                      "plain_samples_per_s": plain, "ray_train_samples_per_s": ray_runs,
                      "overhead_pct_best": 100 * (1 - best_ray / best_plain)}, indent=2))


if __name__ == "__main__":
    main()
