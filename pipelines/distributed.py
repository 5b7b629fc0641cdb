"""The distributed plumbing every trained detector shares: Ray Train + torch.distributed.

- :func:`worker_group`: this process's rank, world size and collectives (``asd.training.Workers``);
- :func:`broadcast_buffers` and :func:`min_over_workers`: the two collectives outside the loss;
- :func:`latest_checkpoint`: the checkpoint a restarted worker group resumes from;
- :class:`EpochReporter`: one epoch's report (rank 0 writes the checkpoint, logs to MLflow and
  feeds the driver's progress bar; the other ranks report metrics only), and the test callbacks
  run at the start of each epoch;
- :func:`fit`: the TorchTrainer factory (one storage path under the run directory, failure and
  checkpoint policy from the config) that runs a training loop and returns its final checkpoint.

A detector's training loop is ``for epoch: reporter.start(epoch); train; reporter.report(...)``;
everything about Ray Train lives here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from asd.training import Workers
from pipelines.config import PipelineConfig
from pipelines.console import EpochProgress
from pipelines.errors import NO_SPACE
from pipelines import ray_runtime

log = logging.getLogger(__name__)
HISTORY_FILE = "history.json"  # every epoch's metrics, carried in each checkpoint (survives resumes)
EpochCallback = Callable[[int, int], None]  # (epoch, rank), called before the epoch trains


def _group_initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def worker_group() -> Workers:
    """This process's place among the Ray Train workers (one process on its own outside them)."""
    if not _group_initialised():
        return Workers()
    on_gpu = dist.get_backend() == "nccl"  # gloo reduces CPU tensors; nccl needs them on the GPU

    def all_reduce(t: torch.Tensor) -> None:
        on = t.cuda() if on_gpu else t
        dist.all_reduce(on)
        if on is not t:
            t.copy_(on.cpu())

    def sum_over_workers(t: torch.Tensor) -> torch.Tensor:
        return dist_fn.all_reduce(t)  # autograd: the backward sums the gradients over workers

    return Workers(dist.get_rank(), dist.get_world_size(), all_reduce, sum_over_workers)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP broadcasts them at the start of
    each training forward, but each rank's own last forward of an epoch then updates its copy, so
    without this the ranks would embed with slightly different networks (and a resumed run, where
    every rank loads rank 0's checkpoint, would train differently)."""
    if _group_initialised():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def min_over_workers(value: float) -> float:
    """The smallest ``value`` of all workers (equal step counts under DDP)."""
    t = torch.tensor([float(value)])
    if _group_initialised():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t[0])


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The directory of the checkpoint this worker group resumes from; None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


def read_history(directory: str | Path) -> list[dict]:
    return json.loads((Path(directory) / HISTORY_FILE).read_text())


class EpochReporter:
    """Per-epoch reporting of one training stage on one worker (see the module docstring)."""

    def __init__(self, loop_cfg: dict, stage: str, rank: int) -> None:
        self.stage, self.rank = stage, rank
        self.progress = loop_cfg.get("progress")
        self.tracking_uri, self.mlflow_run_id = loop_cfg.get("tracking_uri"), loop_cfg.get("mlflow_run_id")
        self.callbacks: list[EpochCallback] = list(loop_cfg.get("callbacks") or ())

    def start(self, epoch: int) -> None:
        """Run the epoch callbacks (tests inject worker failures with them)."""
        for callback in self.callbacks:
            callback(epoch, self.rank)

    def report(self, history: list[dict], write_checkpoint: Callable[[Path], None]) -> None:
        """Report ``history[-1]``; rank 0 also checkpoints (``write_checkpoint(dir)`` + history)."""
        metrics = history[-1]
        if self.rank != 0:
            ray.train.report(metrics)
            return
        self._show(metrics)
        if self.mlflow_run_id:
            # deferred: MLflow (~1 s to import) only on the rank that logs, not in every worker
            from pipelines.tracking import log_epoch_metrics

            log_epoch_metrics(self.tracking_uri, self.mlflow_run_id, self.stage, metrics, int(metrics["epoch"]))
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(Path(d))
            (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def _show(self, metrics: dict) -> None:
        if self.progress is None:
            return
        try:
            self.progress.put_nowait(metrics)
        except Exception as err:  # noqa: BLE001 - a progress line is never worth a failed epoch
            log.warning("progress bar update failed (%s): training goes on without it", type(err).__name__)
            self.progress = None  # one warning, not one per epoch


def no_space_behind(err: BaseException) -> OSError | None:
    """The full disk (or quota) behind a failed training run, if a worker's error was one: a
    checkpoint or model written on a full device fails in the worker, and Ray Train reports it
    wrapped in a ``WorkerGroupError`` with its own traceback."""
    for failure in getattr(err, "worker_failures", {}).values():
        seen: set[int] = set()
        cause: BaseException | None = failure
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, OSError) and cause.errno in NO_SPACE:
                return cause
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
    return None


def fit(cfg: PipelineConfig, loop: Callable[[dict], None], loop_cfg: dict, *, stage: str, epochs: int,
        run_name: str, use_gpu: bool = False) -> ray.train.Result:
    """Run ``loop`` on ``train.num_workers`` Ray Train workers with a progress bar; return the
    result, whose checkpoint is the last epoch's. A restarted run with the same ``run_name`` and
    run directory resumes from its latest checkpoint; ``train.max_failures`` restarts a failed
    worker group."""
    tc = cfg.train
    ray_runtime.init_ray(cfg.ray.address, cfg.ray.num_cpus)
    progress = EpochProgress(stage, epochs)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_cfg, "progress": progress.queue},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=str((Path(cfg.run_dir) / "ray_results").resolve()),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    with progress:
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            full = no_space_behind(err)
            if full is None:
                raise
            raise full from None  # the CLI's one line: no space left on the device (pipelines/cli.py)
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint: {result.error}")
    return result
