"""A real Ray cluster of `ray start` processes on this machine, for the cluster tests
(tests/test_cluster.py, tests/test_node_loss.py).

Nodes are started with `--node-ip-address=127.0.0.1`, but Ray 2.60's `ray start` replaces a
loopback address by the machine's routable one (`services.resolve_ip_for_localhost`), so they
register under that address and their GCS and raylets listen on all interfaces; the dashboard
stays on 127.0.0.1. Ray keeps a loopback node IP only in its single-node mode (what
pipelines.ray_runtime.loopback_node uses for the local Ray), in which `ray start --address` refuses
to add a node: a multi-node test cluster cannot be loopback-only.

Every node gets its own short temp dir and explicit free ports, so that another Ray on the
machine (a benchmark, the tests' own local Ray) can neither take its ports nor be touched by its
cleanup: processes are found by their node's temp dir, never by name, and `ray stop` (which stops
every Ray on the machine) is never used. Authentication is off: a loopback-only test cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are picked, so the OS
    cannot hand one port out twice (one node's components on one port fail `ray start`)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_env(**extra: str) -> dict[str, str]:
    """This process's environment for `ray start` and for drivers of the cluster."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}


@dataclass
class LocalNode:
    temp_dir: str  # the node's --temp-dir: on the command line of its raylet, agents and monitors
    gcs_address: str  # 127.0.0.1:<port> of the cluster's GCS
    dashboard_url: str | None = None  # head only


AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def _agent_ports(ports: list[int]) -> list[str]:
    # every port free and explicit, so that another Ray on the machine cannot take the agent's
    return [f"--{name}={port}" for name, port in zip(AGENT_PORTS, ports, strict=True)]


def _ray_start(args: list[str], temp: str, env: dict[str, str], what: str, ports: list[int] | None = None) -> None:
    # worker ports 0: each worker process binds a port the OS picks (as ray.cluster_utils does), not
    # one of the range 10002-19999 that every raylet on the machine hands out by default
    cmd = [str(RAY), "start", "--node-ip-address=127.0.0.1", *args,
           *_agent_ports(ports or free_ports(len(AGENT_PORTS))),
           "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        stop_node(temp)
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def start_head(num_cpus: int = 2, env: dict[str, str] | None = None,
               extra_args: tuple[str, ...] = ()) -> LocalNode:
    """`ray start --head` on 127.0.0.1 from this venv, with a dashboard (Ray Jobs need it)."""
    gcs, dash, *agents = free_ports(2 + len(AGENT_PORTS))  # distinct: one component per port
    # a short temp dir: Ray's Unix socket paths under it must stay within the 107-byte limit
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    _ray_start(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                f"--num-cpus={num_cpus}", *extra_args], temp, env or cluster_env(), "ray start --head", agents)
    return LocalNode(temp, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}")


def start_worker_node(gcs_address: str, num_cpus: int = 1, env: dict[str, str] | None = None,
                      extra_args: tuple[str, ...] = ()) -> LocalNode:
    """A second node joining the head at ``gcs_address`` (`ray start --address=...`), with its own
    temp dir (Ray 2.60 accepts --temp-dir per node)."""
    temp = tempfile.mkdtemp(prefix="rayw-", dir="/tmp")
    _ray_start([f"--address={gcs_address}", f"--num-cpus={num_cpus}", *extra_args], temp, env or cluster_env(),
               f"ray start --address={gcs_address}")
    return LocalNode(temp, gcs_address)


def node_processes(temp_dir: str):
    """The node's processes: those whose command line names its temp dir (raylet, agents, log
    monitor; the head's GCS and dashboard) and all their descendants (the raylet's workers, whose
    command lines Ray rewrites to `ray::...`)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def kill_node(temp_dir: str) -> list[tuple[str, str]]:
    """SIGKILL every process of the node at once, as if its machine had died; return the name
    (``raylet``, ``gcs_server``, a worker's ``ray::...``) and command line of each."""
    import psutil

    procs, names = node_processes(temp_dir), []
    for p in procs:
        try:
            names.append((p.name(), " ".join(p.cmdline())))
        except psutil.NoSuchProcess:
            pass
    for p in procs:  # a tight loop: none of them gets to notice the others' deaths
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return names


def stop_node(temp_dir: str) -> None:
    """Stop the node's processes (TERM, then KILL what is left) and remove its temp dir."""
    import psutil

    procs = node_processes(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive + node_processes(temp_dir):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(1)
    shutil.rmtree(temp_dir, ignore_errors=True)
