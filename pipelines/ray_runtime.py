"""Starting or joining Ray, the same way for every stage.

``address=None`` and no ``RAY_ADDRESS`` in the environment: a local Ray on this machine
(``num_cpus`` caps it; the dashboard is off because a laptop run does not need it).
``address="auto"``, ``ray://...`` or ``RAY_ADDRESS`` (set by Ray Jobs): join that cluster, whose
size is the cluster's business, so ``num_cpus`` is ignored there.

The local Ray listens on loopback only and checks Ray's token (docs/security.md): a local Ray
otherwise serves its GCS, raylet and worker gRPC ports on every interface of the machine.

Ray starts a worker that has a ``runtime_env`` (ours, and Ray Train's controller and workers,
which always have one) through ``bash -c "exec <python> ..."`` with the interpreter's path
unquoted: from a checkout whose path holds a space or a quote, every such worker died at start and
the stage waited forever. :func:`worker_python` gives Ray the path quoted, for the local Ray and
for a cluster whose nodes run on this machine (docs/reliability.md); :func:`worker_start_watch`
stops a stage whose workers die at start anyway with one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from pipelines import console
from pipelines.errors import UserError

log = logging.getLogger(__name__)

# Ray Train's controller drains each worker's one-slot result queue once per health check
# (2 s by default), so every ray.train.report waited up to 2 s: with short epochs (tests, small
# stores, GPUs) training ran at one epoch per 2 s. Polling every 0.25 s costs one small RPC per
# worker; set on the local Ray here and in the runtime env of submitted jobs (pipelines/operations/submit.py),
# unless the environment sets it.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent ``ray.init``: a running Ray in this process is reused as it is."""
    # deferred: the reaper process runs this module (python -m) and must stay small: its RSS
    # counts in every stage's peak memory (pipelines/monitor.py)
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    console.route_ray_logs()
    # workers' output (Ray Train's per-report lines, Ray Data's progress) stays in Ray's session
    # logs unless -v; errors still reach the driver as exceptions
    quiet = {"log_to_driver": console.verbose(), "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **quiet, runtime_env=cluster_runtime_env(address))
    else:
        ensure_private_token()
        with loopback_node():
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet,
                     runtime_env={"worker_process_setup_hook": quiet_state_api_pollers,
                                  "env_vars": dict(TRAIN_ENV), **worker_python(sys.executable)})
        start_reaper()
    console.rearm_sigterm()


def worker_python(python: str | None) -> dict:
    """The ``runtime_env`` entry that lets Ray start workers from ``python`` wherever it lives:
    none for a path bash reads as one word (or no path); else ``py_executable``, the path quoted
    (Ray puts it in its ``bash -c`` command as it is)."""
    quoted = shlex.quote(python) if python else python
    return {} if quoted == python else {"py_executable": quoted}


def cluster_runtime_env(address: str) -> dict | None:
    """The driver's ``runtime_env`` on a cluster: its nodes' interpreter quoted where they run on
    this machine (:func:`worker_python`); None elsewhere, and in a Ray Job, whose own runtime_env
    has it (pipelines/operations/submit.py: merging the two would conflict)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # deferred: Ray

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        return None
    return worker_python(local_node_python(gcs_port(address))) or None


def gcs_port(address: str) -> int | None:
    """The GCS port of a cluster address (``auto``: this machine's latest ``ray start``); None for
    a Ray Client address (``ray://``), whose nodes this machine cannot see."""
    from ray._private import services  # deferred: Ray, as in init_ray

    if address.startswith("ray://"):
        return None
    bootstrap = services.canonicalize_bootstrap_address(address)
    return int(bootstrap.rsplit(":", 1)[1]) if bootstrap else None


def local_node_python(port: int | None) -> str | None:
    """The interpreter that this machine's Ray node serving ``port`` (its cluster's GCS port, or
    the head's dashboard port) starts workers with; None when no such node runs here."""
    if port is None:
        return None
    for proc in psutil.process_iter(["name", "cmdline"]):
        args = proc.info["cmdline"] or []
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if proc.info["name"] == "raylet" and flags.get("gcs-address", "").endswith(f":{port}") and \
                flags.get("python_worker_command"):
            return shlex.split(flags["python_worker_command"])[0]
        if args[1:2] and args[1].endswith(os.path.join("dashboard", "dashboard.py")) and \
                flags.get("port") == str(port):
            return args[0]
    return None


@contextlib.contextmanager
def loopback_node():
    """Start the local Ray with 127.0.0.1 as its node IP, so that every Ray process binds loopback.

    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray maps a loopback address back to
    the machine's routable IP, and its C++ servers then listen on ``*``. Ray keeps the loopback IP
    only in its local-only mode (``ENABLE_RAY_CLUSTER`` false, read from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once at import, the default on macOS and Windows), which
    is switched on only while this process starts its Ray: a later ``ray start`` from here is not
    affected."""
    from ray._private import ray_constants  # deferred: Ray, as in init_ray

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ensure_private_token() -> None:
    """Create Ray's default token file (``~/.ray/auth_token``) readable by its owner only.

    Ray 2.60 turns token authentication on for a local Ray and, when no token exists, writes one
    with the umask's permissions (0644 under the usual 022): any local user could read it and use
    the cluster. A token given by ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``, or
    ``RAY_AUTH_MODE=disabled``, is left to whoever set it; an existing default file loses its
    group/other permissions."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or \
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            log.warning("Ray's token file %s was readable by other users: now 0600", path)
            os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits


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


# What the raylet logs (to raylet.err, after the worker's own error) for each worker process
# that died before it registered; Ray retries the start every minute, without end.
DEAD_AT_START = "have not registered within the timeout"
STALL_S = 120.0  # no result for this long, and dead workers in the raylet's log: the stage stops


class WorkersNotStarting(UserError):
    """The raylet's worker processes die at start: the stage would wait forever."""


class _StopWaiting(BaseException):
    """What the watch's signal raises in the stage's thread: not an ``Exception``, which Ray Data
    would log with its whole stack as a bug of its own, on its way out."""


def dead_at_start(logs_dir: Path) -> tuple[int, str]:
    """(how many worker processes died at start, the last error line they left) per the raylet's
    ``raylet.err`` in ``logs_dir``."""
    try:
        lines = (logs_dir / "raylet.err").read_text(errors="replace").splitlines()
    except OSError:
        return 0, ""
    errors = [ln.strip() for ln in lines if ln.strip() and DEAD_AT_START not in ln]
    return sum(DEAD_AT_START in ln for ln in lines), errors[-1] if errors else ""


@contextlib.contextmanager
def worker_start_watch(stage: str, logs_dir: str | os.PathLike | None = None, stall_s: float = STALL_S,
                       poll_s: float = 5.0):
    """``with worker_start_watch("extract") as progressed:`` around a stage's loop over its Ray
    results, calling ``progressed()`` on each: when none came for ``stall_s`` while the raylet
    (``logs_dir``: its session's logs) reported worker processes that died at start since the
    watch began, the stage stops with :class:`WorkersNotStarting`, one line, instead of waiting
    forever. A thread waiting on Ray Data has no way out but a signal: the watch sends SIGUSR1 to
    the main thread, whose handler it sets meanwhile, so it watches a stage on the main thread only."""
    if logs_dir is None:
        import ray  # deferred: Ray, as in init_ray

        node = ray._private.worker._global_node  # None on Ray Client: the raylet's logs are elsewhere
        logs_dir = node.get_logs_dir_path() if node else None
    if logs_dir is None or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    logs_dir = Path(logs_dir)
    dead_before, _ = dead_at_start(logs_dir)
    over, lock, reason = threading.Event(), threading.Lock(), []

    def stop(_signum, _frame) -> None:
        raise _StopWaiting

    def watch() -> None:
        over.wait(stall_s)
        while True:
            with lock:
                if over.is_set():
                    return
                dead, last_error = dead_at_start(logs_dir)
                if dead > dead_before:
                    reason.append(f"{stage}: no Ray worker came up in {stall_s:g} s; {dead - dead_before} worker "
                                  f"process(es) died at start ({last_error or 'no error line'}); see "
                                  f"{logs_dir / 'raylet.err'}")
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                    return
            over.wait(poll_s)

    previous = signal.signal(signal.SIGUSR1, stop)
    threading.Thread(target=watch, name=f"{stage}-worker-start-watch", daemon=True).start()
    try:
        yield over.set
    except _StopWaiting:
        raise WorkersNotStarting(reason[0]) from None
    finally:
        with lock:
            over.set()
            signal.signal(signal.SIGUSR1, signal.SIG_DFL if previous is None else previous)  # None: set in C


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
