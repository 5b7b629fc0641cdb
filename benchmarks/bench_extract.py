"""Extraction throughput, side by side in one run on the same clips:

(a) the official DCASE baseline's style: ``librosa.load`` + ``librosa.feature.melspectrogram``,
    file by file, in one process (needs ``pip install -r benchmarks/requirements.txt``);
(b) a single-process loop over the project's own feature function (``asd.audio.load_audio`` +
    ``asd.features.log_mel``), with 1 torch thread and with torch's default threads, first with
    glibc's default allocator settings, then after ``pipelines.compute_process.tune_allocator``
    (which every extraction worker applies; the tuned loop is the fair reference for (c));
(c) ``pipelines.stages.extract.extract``: Ray Data workers into the Parquet store (hashing, manifest and
    Parquet writing included; Ray started before the clock, and its start-up reported apart);
(d) the per-shard work of (c) (read, hash, decode, features, Parquet write), shard after shard in
    this one process: the same work as (c) without Ray.

Peak memory of (c): the summed RSS of this process and every process it started (Ray's GCS,
raylet, workers), sampled every 50 ms, for growing subsets of the clips.

    .venv/bin/python benchmarks/bench_extract.py --data data/demo [--preset demo] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from asd.audio import load_audio
from asd.features import FeatureConfig, log_mel
from pipelines.monitor import PeakMemory


def librosa_loop(paths: list[Path], fcfg: FeatureConfig) -> float:
    import librosa

    t0 = time.perf_counter()
    for p in paths:
        y, sr = librosa.load(p, sr=fcfg.sample_rate, mono=True)
        mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=fcfg.n_fft, hop_length=fcfg.hop_length,
                                             n_mels=fcfg.n_mels, power=2.0)
        _ = 10.0 * np.log10(np.maximum(mel, np.finfo(np.float32).eps))
    return len(paths) / (time.perf_counter() - t0)


def project_loop(paths: list[Path], fcfg: FeatureConfig, threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for p in paths:
        wave, _ = load_audio(p, fcfg.sample_rate)
        _ = log_mel(wave, fcfg).numpy().astype(np.float16)
    return len(paths) / (time.perf_counter() - t0)


def shard_loop(data: Path, paths: list[Path], fcfg: FeatureConfig, dtype: str, batch_size: int) -> float:
    """(d) The extraction's own per-shard work (read, hash, decode, features, Parquet write) in this
    one process, shard after shard: what (c) parallelises, without Ray."""
    from pipelines.compute_process import prepare_compute_process
    from pipelines.stages.extract import _shards, discover, extract_shard

    prepare_compute_process(1)  # as an extraction worker
    wanted = {p.resolve() for p in paths}
    data_root, found, _ = discover(data)
    specs = _shards([f for f in found if f.meta and (data_root / f.path).resolve() in wanted], batch_size)
    out = Path(tempfile.mkdtemp(prefix="bench-shard-loop-"))
    try:
        t0 = time.perf_counter()
        n = sum(len(extract_shard({"shard": s}, str(data_root.resolve()), str(out), asdict(fcfg), dtype))
                for s in specs)
        return n / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def compare_dtypes(data: Path, work: Path, fcfg: FeatureConfig, batch_size: int) -> dict:
    """Store size, read time of the train split, and rounding error: float16 against float32."""
    from pipelines.stages.extract import extract
    from pipelines.store import load_split

    res, tables = {}, {}
    for dtype in ("float32", "float16"):
        store = work / f"store-{dtype}"
        extract(data, store, fcfg, dtype=dtype, batch_size=batch_size)
        t0 = time.perf_counter()
        tables[dtype] = load_split(store, "train")
        res[dtype] = {"store_mib": sum(f.stat().st_size for f in store.rglob("*.parquet")) / 2**20,
                      "load_train_s": time.perf_counter() - t0}
    err = max(float((a - b).abs().max()) for a, b in zip(tables["float16"].features, tables["float32"].features))
    res["float16_max_abs_error_db"] = err
    return res


def subset_tree(src: Path, dst: Path, paths: list[Path]) -> Path:
    """A DCASE tree of symlinks to ``paths`` (so subsets cost no copying)."""
    for p in paths:
        link = dst / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), link)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="data root with dev_data/ (generated with --preset if missing)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="clips per extraction task / shard")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--loop-clips", type=int, default=1000, help="clips timed in the single-process loops")
    ap.add_argument("--skip-librosa", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    data = Path(args.data)
    if not (data / "dev_data").is_dir():
        from pipelines.synth.generate import PRESETS, generate

        generate(PRESETS[args.preset], data, seed=0, workers=args.cpus)
    fcfg = FeatureConfig()
    paths = sorted((data / "dev_data").rglob("*.wav"))
    loop_paths = paths[:: max(1, len(paths) // args.loop_clips)][: args.loop_clips]
    for p in loop_paths[:20]:  # warm the page cache for every method alike
        p.read_bytes()
    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                 "clips": len(paths), "loop_clips": len(loop_paths), "cpus": args.cpus,
                 "batch_size": args.batch_size, "dtype": args.dtype}
    if not args.skip_librosa:
        out["librosa_loop_clips_per_s"] = librosa_loop(loop_paths, fcfg)
    out["project_loop_1thread_clips_per_s"] = project_loop(loop_paths, fcfg, 1)
    out["project_loop_default_threads_clips_per_s"] = project_loop(loop_paths, fcfg, args.cpus)
    from pipelines.compute_process import tune_allocator

    out["allocator_tuned"] = tune_allocator()  # irreversible in this process: the default runs come first
    out["project_loop_tuned_1thread_clips_per_s"] = project_loop(loop_paths, fcfg, 1)
    out["project_loop_tuned_default_threads_clips_per_s"] = project_loop(loop_paths, fcfg, args.cpus)
    out["shard_loop_1process_clips_per_s"] = shard_loop(data, loop_paths, fcfg, args.dtype, args.batch_size)

    import ray

    from pipelines.stages.extract import extract

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    out["ray_start_s"] = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        runs = []
        for frac in (0.25, 0.5, 1.0):
            subset = paths[: max(1, int(len(paths) * frac))]
            root = subset_tree(data, work / f"data-{frac}", subset)
            with PeakMemory(0.05) as peak:
                s = extract(root, work / f"store-{frac}", fcfg, dtype=args.dtype, batch_size=args.batch_size)
            runs.append({"clips": s.extracted, "seconds": s.seconds, "clips_per_s": s.clips_per_s,
                         "peak_rss_mib": peak.mib})
            print(json.dumps(runs[-1]), flush=True)
        out["ray_extract"] = runs
        out["dtype_comparison"] = compare_dtypes(data, work, fcfg, args.batch_size)
        out["ratio_vs_shard_loop"] = runs[-1]["clips_per_s"] / out["shard_loop_1process_clips_per_s"]
        loops = [v for k, v in out.items() if k.startswith("project_loop_")]
        out["ratio_vs_best_project_loop"] = runs[-1]["clips_per_s"] / max(loops)
        out["ratio_vs_tuned_1thread_loop"] = runs[-1]["clips_per_s"] / out["project_loop_tuned_1thread_clips_per_s"]
        if "librosa_loop_clips_per_s" in out:
            out["ratio_vs_librosa_loop"] = runs[-1]["clips_per_s"] / out["librosa_loop_clips_per_s"]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
