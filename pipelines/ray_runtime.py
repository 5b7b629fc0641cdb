"""Starting or joining Ray, the same way for every stage.

``address=None`` and no ``RAY_ADDRESS`` in the environment: a local Ray on this machine
(``num_cpus`` caps it; the dashboard is off because a laptop run does not need it).
``address="auto"``, ``ray://...`` or ``RAY_ADDRESS`` (set by Ray Jobs): join that cluster, whose
size is the cluster's business, so ``num_cpus`` is ignored there.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)

# Ray Train's controller drains each worker's one-slot result queue once per health check
# (2 s by default), so every ray.train.report waited up to 2 s: with short epochs (tests, small
# stores, GPUs) training ran at one epoch per 2 s. Polling every 0.25 s costs one small RPC per
# worker; set on the local Ray here and in the runtime env of submitted jobs (pipelines/submit.py),
# unless the environment sets it.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent ``ray.init``: a running Ray in this process is reused as it is."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": quiet_state_api_pollers,
                              "env_vars": dict(TRAIN_ENV)})
        start_reaper()


def start_reaper() -> None:
    """Watch this process from a detached one that ends the local Ray it started when it dies.

    ``ray.init`` ties the GCS and raylet to the driver, but when the driver is killed
    (``kill -9``, an OOM kill) the raylet's dashboard and runtime-env agents were measured to
    outlive it by minutes; :func:`reap_after` kills every process the driver had started."""
    subprocess.Popen([sys.executable, "-m", "pipelines.ray_runtime", "--reap-after", str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def reap_after(pid: int, poll_s: float = 0.5) -> None:
    """Remember the descendants of ``pid`` while it lives; when it is gone, kill those still
    running (matched by pid and start time, so a reused pid is never hit)."""
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, psutil.Process] = {}
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while alive(driver):
        try:
            known.update({p.pid: p for p in driver.children(recursive=True) if p.pid != os.getpid()})
        except psutil.NoSuchProcess:
            pass  # a short-lived worker ended during the walk, or the driver itself: look again
        time.sleep(poll_s)
    leftovers = [p for p in known.values() if alive(p)]
    for p in leftovers:
        try:
            leftovers += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# Ray Train's placement-group cleaner asks the state API, which the dashboard serves, whether the
# controller is alive once a second, and warns on every failed query: without a dashboard (local
# Ray above) that is a warning per second of training and nothing else.
_STATE_API_POLLERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_pollers() -> None:
    """``worker_process_setup_hook`` of the local Ray: errors only from :data:`_STATE_API_POLLERS`."""
    for name in _STATE_API_POLLERS:
        logging.getLogger(name).setLevel(logging.ERROR)



if __name__ == "__main__":  # the reaper process of start_reaper
    if len(sys.argv) == 3 and sys.argv[1] == "--reap-after":
        reap_after(int(sys.argv[2]))
