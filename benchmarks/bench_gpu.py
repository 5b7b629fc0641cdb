"""GPU figures of the paper's network: step throughput (fp32, bf16, bf16 + channels-last),
model FLOPs utilisation, the paper's full schedule at DCASE 2022 size, and checks that the GPU
path computes what the CPU path computes.

    PYTHONPATH=. python benchmarks/bench_gpu.py --out results.json   # on a machine with a GPU
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick     # the same code on a CPU

Imports torch and ``asd`` only (no Ray, no MLflow), so it runs wherever PyTorch does; the stages
are the pipeline's own library calls (``asd.training.epoch_prototypes`` and ``train_epoch``, the
losses of Eq. 3 and Eq. 6, the balanced sampler), with the settings of ``configs/dcase2022.yaml``.
Features are random log-Mel-shaped tensors: time does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from asd.losses import multi_prototype_loss
from asd.model import EmbeddingNet, ModelConfig
from asd.sampler import BalancedBatchSampler, random_crops
from asd.training import (epoch_prototypes, finetune_loss, input_stats, pretrain_loss, random_sampling_batches,
                          steps_per_epoch, train_epoch)

ROOT = Path(__file__).resolve().parents[1]
BF16_DENSE_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4}  # NVIDIA's SXM data sheets, dense bf16
# PipelineConfig defaults that configs/dcase2022.yaml does not set (pipelines/config.py)
TAU, MOMENTUM, WEIGHT_DECAY, CROP = 0.07, 0.9, 5e-5, 64
MODES = {"fp32": (False, False), "bf16": (True, False), "bf16 + channels-last": (True, True)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_model(width: int, device: str, channels_last: bool) -> EmbeddingNet:
    """The same initial weights on every call (seed 0), so models on two devices can be compared."""
    torch.manual_seed(0)
    model = EmbeddingNet(ModelConfig(width=width)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def autocast_for(device: str, bf16: bool):
    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def flops_per_sample(width: int, batch: int, device: str) -> float:
    """Forward + backward FLOPs of one 128 x 64 crop, counted by torch (matmuls and convolutions)."""
    model = make_model(width, device, False)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(batch, 1, 128, CROP, device=device)).sum().backward()
    return counter.get_total_flops() / batch


def step_throughput(width: int, batch: int, mode: str, placement: str, device: str, seconds: float) -> float:
    """Samples/s of the pre-training step (random crops, Eq. 3, SGD) in steady state. ``placement``
    "host crops" is the pipeline's (crops cut on the CPU, copied each step); "device-resident clips"
    keeps the clips on the device and cuts crops there (the input path's cost removed)."""
    bf16, channels_last = MODES[mode]
    g = torch.Generator().manual_seed(0)
    n_clips, n_classes = 512, 32
    feats = torch.randn(n_clips, 128, 313, generator=g)
    labels = torch.randint(0, n_classes, (n_clips,), generator=g).to(device)
    model = make_model(width, device, channels_last)
    protos = torch.nn.functional.normalize(torch.randn(2 * n_classes, 128, generator=g), dim=1).to(device)
    proto_class = torch.arange(n_classes).repeat(2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    clips = list(feats) if placement == "host crops" else feats.to(device)
    frames = torch.arange(CROP, device=device)

    def step() -> None:
        idx = torch.randint(n_clips, (batch,), generator=g)
        if placement == "host crops":
            x = random_crops(clips, idx, CROP, g).unsqueeze(1).to(device, non_blocking=True)
        else:
            starts = torch.randint(313 - CROP + 1, (batch,), generator=g).to(device)
            x = clips[idx.to(device)[:, None, None], torch.arange(128, device=device)[None, :, None],
                      (starts[:, None] + frames)[:, None, :]].unsqueeze(1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, bf16):
            z = model(x).float()
        loss = multi_prototype_loss(z, labels[idx.to(device)], protos, proto_class, TAU)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 10 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def schedule(device: str, n_clips: int, n_classes: int, max_steps: int | None, max_proto_clips: int | None,
             epochs: int) -> dict:
    """Wall time of the paper's schedule (configs/dcase2022.yaml) at ``n_clips`` training clips of
    10 s (313 frames), measured on whole epochs (or on ``max_steps`` steps and ``max_proto_clips``
    clips of an epoch, scaled up, where a full epoch would take too long: the CPU)."""
    cfg = yaml.safe_load((ROOT / "configs" / "dcase2022.yaml").read_text())
    pt, ft, width = cfg["pretrain"], cfg["finetune"], cfg["model"]["width"]
    bf16 = device == "cuda" and cfg["train"]["bf16"]
    channels_last = device == "cuda" and cfg["train"]["channels_last"]
    g = torch.Generator().manual_seed(0)
    features = list(torch.randn(n_clips, 128, 313, generator=g))
    labels = torch.arange(n_clips) % n_classes
    model = make_model(width, device, channels_last)
    model.set_input_stats(*(t.to(device) for t in input_stats(features[:500])))
    out: dict = {"clips": n_clips, "classes": n_classes, "width": width, "bf16": bf16,
                 "channels_last": channels_last, "pretrain_epochs": pt["epochs"], "finetune_epochs": ft["epochs"]}
    autocast = autocast_for(device, bf16)

    # pre-training epoch: the prototype pass (window means, as prototype_embedding: windows), then the steps
    pt_steps = steps_per_epoch(n_clips // pt["batch_size"], pt["epochs"], None)
    opt = torch.optim.SGD(model.parameters(), lr=pt["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    proto_clips = min(n_clips, max_proto_clips or n_clips)
    run_steps = min(pt_steps, max_steps or pt_steps)
    per_epoch = []
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        protos = epoch_prototypes(model, features[:proto_clips], labels[:proto_clips], range(proto_clips), n_classes,
                                  mpe_ratio=pt["mpe_ratio"], mpe_per_class=pt["mpe_per_class"],
                                  generator=torch.Generator().manual_seed(epoch), batch_size=cfg["score"]["batch_size"],
                                  device=device, window=CROP, hop=CROP // 2)
        protos.prototypes, protos.prototype_class = protos.prototypes.to(device), protos.prototype_class.to(device)
        sync(device)
        t1 = time.perf_counter()
        losses, _ = train_epoch(model, features, labels,
                                random_sampling_batches(n_clips, pt["batch_size"], run_steps, g),
                                lambda z, y: pretrain_loss(z, y, protos, TAU), opt, crop_frames=CROP,
                                generator=g, device=device, autocast=autocast, channels_last=channels_last)
        sync(device)
        t2 = time.perf_counter()
        proto_s = (t1 - t0) * n_clips / proto_clips
        steps_s = (t2 - t1) * pt_steps / run_steps
        per_epoch.append({"prototype_s": proto_s, "steps_s": steps_s, "loss_first": losses[0],
                          "loss_last": losses[-1], "finite": all(math.isfinite(v) for v in losses)})
    out["pretrain_steps_per_epoch"] = pt_steps
    out["pretrain_epochs_measured"] = per_epoch

    # fine-tuning epoch: balanced N x K batches, Eq. 6 with negative prototypes
    n_cls = min(ft["n_classes"], n_classes)
    ft_steps = steps_per_epoch(math.ceil(n_clips / (n_cls * ft["k"])), ft["epochs"], None)
    run_steps = min(ft_steps, max_steps or ft_steps)
    sampler = BalancedBatchSampler(labels, ft["n_classes"], ft["k"], run_steps, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=ft["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    per_epoch = []
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        losses, _ = train_epoch(model, features, labels, sampler.epoch(epoch),
                                lambda z, y: finetune_loss(z, y, TAU, ft["npe_lambda"], g), opt, crop_frames=CROP,
                                generator=g, device=device, autocast=autocast, channels_last=channels_last)
        sync(device)
        per_epoch.append({"steps_s": (time.perf_counter() - t0) * ft_steps / run_steps,
                          "finite": all(math.isfinite(v) for v in losses)})
    out["finetune_steps_per_epoch"] = ft_steps
    out["finetune_epochs_measured"] = per_epoch
    last_pt, last_ft = out["pretrain_epochs_measured"][-1], per_epoch[-1]
    pretrain_epoch_s = last_pt["prototype_s"] + last_pt["steps_s"]
    out["pretrain_epoch_s"] = pretrain_epoch_s
    out["finetune_epoch_s"] = last_ft["steps_s"]
    out["full_schedule_hours"] = (pretrain_epoch_s * pt["epochs"] + last_ft["steps_s"] * ft["epochs"]) / 3600
    out["scaled_from"] = {"max_steps": max_steps, "max_proto_clips": max_proto_clips}
    return out


def checks(device: str) -> dict:
    """The GPU path against the CPU path: fp32 embeddings of the same weights, bf16 against fp32,
    one step's gradients in each mode, and a learnable task trained in bf16 + channels-last."""
    if device == "cpu":
        return {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 here
    try:
        return _checks(device)
    finally:  # the throughput cells measure torch's defaults
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _checks(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 128, 313, generator=g)
    cpu_model = make_model(16, "cpu", False).eval()
    gpu_model = make_model(16, device, False).eval()
    with torch.no_grad():
        ref = cpu_model(x)
        gpu = gpu_model(x.to(device)).cpu()
        with autocast_for(device, True):
            low = gpu_model(x.to(device)).float().cpu()
    out = {"fp32_gpu_vs_cpu_max_abs": float((ref - gpu).abs().max()),
           "bf16_vs_fp32_min_cosine": float(torch.nn.functional.cosine_similarity(low, ref).min())}

    # one training step's gradient (fp32 unless named) from the same weights and batch, against
    # the CPU's; the CPU's own channels-last gradient gives the size of a mere reordering of sums
    crops, y = torch.randn(16, 1, 128, CROP, generator=g), torch.arange(16) % 4

    def gradient(dev: str, channels_last: bool, bf16: bool = False) -> torch.Tensor:
        model = make_model(16, dev, channels_last)
        inp = crops.to(dev)
        inp = inp.contiguous(memory_format=torch.channels_last) if channels_last else inp
        with autocast_for(dev, bf16):
            z = model(inp).float()
        finetune_loss(z, y.to(dev), TAU, None, None).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())
    cpu_grad = gradient("cpu", False)
    gpu_grad = gradient(device, False)
    out.update(grad_rel_diff_cpu_channels_last=rel(gradient("cpu", True), cpu_grad),
               grad_rel_diff_gpu_vs_cpu=rel(gpu_grad, cpu_grad),
               grad_rel_diff_gpu_channels_last=rel(gradient(device, True), gpu_grad),
               grad_rel_diff_gpu_bf16_channels_last=rel(gradient(device, True, True), gpu_grad))

    # a learnable task under bf16 + channels-last: each class raises its own band of Mel bins
    def clips(n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        y = torch.arange(n) % 4
        f = torch.randn(n, 128, 100, generator=gen)
        for c in range(4):
            f[y == c, 20 * c + 10:20 * c + 20] += 1.5
        return list(f), y
    train_f, train_y = clips(256, g)
    test_f, test_y = clips(128, g)
    model = make_model(16, device, True)
    model.set_input_stats(*(t.to(device) for t in input_stats(train_f)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(2)
    losses, _ = train_epoch(model, train_f, train_y, BalancedBatchSampler(train_y, 4, 8, 60, seed=0).epoch(0),
                            lambda z, y: finetune_loss(z, y, TAU, None, None), opt, crop_frames=CROP,
                            generator=gen, device=device, autocast=autocast_for(device, True), channels_last=True)
    protos = epoch_prototypes(model, train_f, train_y, range(256), 4, mpe_ratio=None, mpe_per_class=1,
                              generator=gen, device=device, window=CROP, hop=CROP // 2)
    test_protos = epoch_prototypes(model, test_f, test_y, range(128), 4, mpe_ratio=None, mpe_per_class=1,
                                   generator=gen, device=device, window=CROP, hop=CROP // 2)
    # nearest class prototype of each held-out class mean: a weak but independent read-out
    agree = (test_protos.class_prototypes @ protos.class_prototypes.T).argmax(1) == torch.arange(4)
    out.update(learnable_loss_first=losses[0], learnable_loss_last=losses[-1],
               learnable_classes_matched=int(agree.sum()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    p.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run of every part")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per throughput cell")
    p.add_argument("--clips", type=int, default=21000,
                   help="training clips of the schedule (DCASE 2022 dev: 7 types x 3 sections x 1000)")
    p.add_argument("--classes", type=int, default=63, help="attribute classes of the schedule")
    p.add_argument("--max-steps", type=int, default=None, help="time this many steps of an epoch, scale up")
    p.add_argument("--max-proto-clips", type=int, default=None, help="embed this many clips, scale up")
    p.add_argument("--parts", nargs="+", default=["checks", "throughput", "schedule"])
    args = p.parse_args()
    if args.quick:
        args.seconds, args.clips, args.max_steps, args.max_proto_clips = 0.2, 400, 5, 100
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in BF16_DENSE_PEAK_TFLOPS.items() if k in name), None)
    result: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "bf16_dense_peak_tflops": peak}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))

    if "checks" in args.parts:
        result["checks"] = checks(device)
        print(json.dumps(result["checks"], indent=1), flush=True)
        save()
    if "throughput" in args.parts:
        rows = []
        print("| width | batch | input | mode | samples/s | TFLOP/s | MFU (bf16 peak) |\n|---|---|---|---|---|---|---|")
        for width in (16, 64):
            fps = flops_per_sample(width, 8, device)
            for batch in (32, 256):
                for placement in ("host crops", "device-resident clips"):
                    for mode in MODES:
                        if device == "cpu" and mode != "fp32":
                            continue
                        rate = step_throughput(width, batch, mode, placement, device, args.seconds)
                        tflops = rate * fps / 1e12
                        mfu = tflops / peak if peak else None
                        rows.append({"width": width, "batch": batch, "input": placement, "mode": mode,
                                     "samples_per_s": rate, "flops_per_sample": fps, "tflops": tflops, "mfu": mfu})
                        print(f"| {width} | {batch} | {placement} | {mode} | {rate:.0f} | {tflops:.2f} | "
                              f"{'' if mfu is None else f'{100 * mfu:.2f} %'} |", flush=True)
                        result["throughput"] = rows
                        save()
    if "schedule" in args.parts:
        result["schedule"] = schedule(device, args.clips, args.classes, args.max_steps, args.max_proto_clips,
                                      epochs=1 if args.quick else 2)
        print(json.dumps(result["schedule"], indent=1), flush=True)
        save()


if __name__ == "__main__":
    main()
