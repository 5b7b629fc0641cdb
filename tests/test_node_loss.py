"""Node loss on a real two-node Ray cluster: a head and a second node started with `ray start` on
this machine (tests/local_cluster.py), one pre-training worker on each (1 CPU per node, 1 per
worker). Once the checkpoint of epoch 1 is registered, every process of the second node is
killed at once (SIGKILL, as if its machine died) and a replacement node joins. The run resumes
from the last checkpoint, trains the configured epochs, and its losses and weights equal, bit for
bit, those of an uninterrupted run on the same cluster.

Everything Ray runs in processes of that cluster: `asd extract` and `asd train` are started as
separate drivers (`--address`), so the test process's own Ray (tests that share a session with
this one) is left alone; the nodes are found and stopped by their temp dirs, never `ray stop`.

Measured on 2 loaded cores: the surviving worker's gloo all-reduce fails ("Connection reset by
peer") and Train's controller retries the worker group within ~1 s of the kill; the GCS declares
the node dead ~5 s after it (the health checks below); the new group starts in ~20 s (worker
processes, imports, data) and the first resumed checkpoint lands 35-50 s after the kill. This
test found that the driver's progress queue (pipelines.console.EpochProgress, a Ray actor)
could be placed on the lost node, whose death then failed the run: it is now pinned to the
driver's node, and the rank-0 update is best effort.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import torch
from local_cluster import cluster_env, kill_node, start_head, start_worker_node, stop_node

from pipelines.checkpoints import MODEL_FILE, load_meta

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 4
KILL_AFTER_EPOCH = 1  # the second node dies once the checkpoint of this epoch is registered
# GCS health checks of the raylets: a killed raylet refuses the check at once, so the node is
# declared dead after failure_threshold periods (~5 s; Ray's defaults: 5 x 3 s); a live but busy
# raylet (2 loaded cores) must miss 5 checks of 2 s in a row to be declared dead by mistake
HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_timeout_ms": "2000", "RAY_health_check_failure_threshold": "5"}
NODE_ARGS = ("--object-store-memory=200000000",)  # tiny data: 200 MB per node, not 30 % of the RAM
DRIVER_ENV = {
    # Train's controller polls its workers every 0.25 s (default 2 s; pipelines/ray_runtime.py)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}
TRAIN_SETTINGS = [f"pretrain.epochs={EPOCHS}", "pretrain.lr_milestones=[]", "train.num_workers=2",
                  "train.cpus_per_worker=1", "train.max_failures=2"]


def _asd(args: list[str], gcs: str, log: Path) -> subprocess.Popen:
    env = cluster_env(RAY_ADDRESS=gcs, **DRIVER_ENV)
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipelines", *args, "--address", gcs], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def _sets(run_dir: Path, data: Path, extra: list[str] = ()) -> list[str]:
    args = []
    for s in [f"run_dir={run_dir}", f"data.root={data}", *extra]:
        args += ["--set", s]
    return args


def _train(run_dir: Path, data: Path, store: Path, gcs: str) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True)
    log = run_dir / "driver.log"
    return _asd(["train", "--stage", "pretrain", "--config", "tiny", "--store", str(store),
                 *_sets(run_dir, data, TRAIN_SETTINGS)], gcs, log), log


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else "(no log)"


def _latest_checkpoint(run_dir: Path) -> dict | None:
    """Metrics of the latest checkpoint Ray Train's controller has registered (what a restarted
    worker group gets from ``ray.train.get_checkpoint()``), from the snapshot it keeps beside the
    checkpoints; None before the first one or while the file is being rewritten."""
    for snapshot in (run_dir / "ray_results").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            return None
        return latest["metrics"] if latest else None
    return None


def _wait(proc: subprocess.Popen, log: Path, what: str, timeout: float = 900) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} still running after {timeout:.0f} s:\n{_tail(log)}")
    assert rc == 0, f"{what} exited {rc}:\n{_tail(log)}"


def _keep_logs(node_temp: str, dest: Path) -> list[str]:
    """Copy the node's Ray logs to ``dest`` (tmp_path: kept by pytest for a post-mortem) and
    return the GCS's lines about a failed health check or a dead node."""
    import shutil

    lines = []
    for logs in Path(node_temp).glob("session_2*/logs"):
        shutil.copytree(logs, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        gcs = logs / "gcs_server.out"
        if gcs.is_file():
            failed = [ln for ln in gcs.read_text(errors="replace").splitlines()
                      if "health check failed" in ln.lower() or "node is dead" in ln.lower()]
            lines += failed[:1] + [ln for ln in failed[1:] if "node is dead" in ln.lower()]
    return lines


@pytest.mark.slow
def test_node_loss_during_pretraining_resumes_from_the_last_checkpoint(tmp_path):
    from pipelines.synth.generate import PRESETS, generate

    data, store = tmp_path / "data", tmp_path / "store"
    generate(PRESETS["tiny"], data, seed=0, workers=2)
    env = cluster_env(**HEALTH_CHECKS)
    nodes, drivers = [], []
    try:
        # one CPU per node and one CPU per worker: one pre-training worker on each node
        head = start_head(num_cpus=1, env=env, extra_args=NODE_ARGS)
        nodes.append(head)
        nodes.append(start_worker_node(head.gcs_address, num_cpus=1, env=env, extra_args=NODE_ARGS))
        gcs = head.gcs_address

        log = tmp_path / "extract.log"
        drivers.append(_asd(["extract", "--config", "tiny", "--store", str(store),
                             *_sets(tmp_path / "extract", data)], gcs, log))
        _wait(drivers[-1], log, "asd extract")

        # the uninterrupted run on the same cluster: the reference
        proc, ref_log = _train(tmp_path / "reference", data, store, gcs)
        drivers.append(proc)
        _wait(proc, ref_log, "the uninterrupted asd train")

        proc, log = _train(tmp_path / "interrupted", data, store, gcs)
        drivers.append(proc)
        deadline = time.monotonic() + 600
        while (latest := _latest_checkpoint(tmp_path / "interrupted")) is None \
                or latest["epoch"] < KILL_AFTER_EPOCH:
            assert proc.poll() is None, (f"asd train ended (exit {proc.returncode}) before its checkpoint "
                                         f"of epoch {KILL_AFTER_EPOCH}:\n{_tail(log)}")
            assert time.monotonic() < deadline, f"no checkpoint of epoch {KILL_AFTER_EPOCH} in 600 s:\n{_tail(log)}"
            time.sleep(0.1)
        seen = int(latest["epoch"])
        assert seen < EPOCHS - 1, f"the run was past its last epoch ({seen}) before the node could be killed"
        t_kill, killed_at = time.monotonic(), datetime.now().strftime("%H:%M:%S.%f")[:-3]
        killed = kill_node(nodes[1].temp_dir)
        names = [name for name, _ in killed]
        assert "raylet" in names, f"no raylet among the killed processes: {names}"
        assert any("RayTrainWorker" in cmd for _, cmd in killed), f"no training worker ran on the killed node: {names}"
        # the driver's progress queue is pinned to the driver's node (it failed the run when it was not)
        assert not any("_QueueActor" in cmd for _, cmd in killed), names
        stop_node(nodes[1].temp_dir)  # removes its temp dir; nothing is left to stop
        nodes.append(start_worker_node(gcs, num_cpus=1, env=env, extra_args=NODE_ARGS))  # 2 CPUs again
        t_replaced = time.monotonic()

        resumed_at = None
        while proc.poll() is None and time.monotonic() < deadline + 300:
            latest = _latest_checkpoint(tmp_path / "interrupted")
            if resumed_at is None and latest and latest["resumed_from_epoch"] >= 0:
                resumed_at = time.monotonic()
            time.sleep(0.2)
        _wait(proc, log, "asd train that lost a node", timeout=60)
    finally:
        for p in drivers:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            death = _keep_logs(nodes[0].temp_dir, tmp_path / "head-logs") if nodes else []
        except OSError as err:
            death = [f"(the head's logs were not kept: {err})"]
        for node in reversed(nodes):
            stop_node(node.temp_dir)

    hist = pd.read_csv(tmp_path / "interrupted" / "models" / "pretrain" / "history.csv")
    reference = pd.read_csv(tmp_path / "reference" / "models" / "pretrain" / "history.csv")
    assert hist["epoch"].tolist() == list(range(EPOCHS))
    assert load_meta(tmp_path / "interrupted" / "models" / "pretrain")["epochs"] == EPOCHS
    # the restarted worker group resumed after the last checkpoint registered before the kill
    # (that of epoch `seen`, or one more if it was registered in the moment before the kill)
    resumed = hist[hist["resumed_from_epoch"] >= 0]
    assert not resumed.empty, f"no resumed epoch in the history:\n{hist}\n{_tail(log)}"
    start = int(resumed["epoch"].iloc[0])
    assert set(resumed["resumed_from_epoch"]) == {start} and seen + 1 <= start < EPOCHS, hist
    assert resumed["epoch"].tolist() == list(range(start, EPOCHS))
    assert (hist["resumed_from_epoch"].iloc[:start] == -1).all(), hist
    # the same losses, epoch by epoch, and bit for bit the same weights as the uninterrupted run
    assert hist["loss"].tolist() == reference["loss"].tolist()
    weights = torch.load(tmp_path / "interrupted" / "models" / "pretrain" / MODEL_FILE, weights_only=True)
    expected = torch.load(tmp_path / "reference" / "models" / "pretrain" / MODEL_FILE, weights_only=True)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    print(f"\nnode killed at {killed_at} after the checkpoint of epoch {seen}; resumed at epoch {start}; "
          f"replacement node up {t_replaced - t_kill:.1f} s after the kill; first resumed checkpoint "
          f"{(resumed_at - t_kill) if resumed_at else float('nan'):.1f} s after the kill")
    print("\n".join(death))
