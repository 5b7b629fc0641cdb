"""``asd submit``: run the whole pipeline (or a retrain) on a Ray cluster as a Ray Job.

Equivalent to ``ray job submit --working-dir . -- python -m pipelines run --config <cfg>``,
with the runtime environment the job needs (the project as working dir without data, venv
or runs; MLflow and Ray settings as environment variables), then follows the job's logs and
exits with its status. The driver of the job runs on the head node, so paths in the config
(``run_dir``, ``data.root``) must be valid there and, on multi-node clusters, on shared
storage that every node mounts (see README: running on a cluster). ``--dry-run`` lists the
files that would be uploaded and submits nothing.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil

from ray import job_submission
from ray._private import ray_constants
from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

from pipelines.ray_runtime import TRAIN_ENV, local_node_python, worker_python

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # pipelines/operations/ -> the repository
# Never upload these: large, machine-specific, or produced by runs; and secrets, which would
# land on every node of the cluster and in Ray's package store (docs/security.md). Patterns
# are .gitignore syntax, matched by Ray against paths relative to the working dir.
EXCLUDES = [".venv/", "runs/", "data/", "features/", "mlruns/", "mlartifacts/", "*.db",
            ".git", "__pycache__/", "*.egg-info/", ".pytest_cache/",
            ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*",
            "id_ed25519*", ".netrc", "*credentials*", ".ray/", ".ssh/", ".mlflow/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
JOBS = ("run", "retrain")  # the CLI subcommands a Ray Job runs
# Environment variables forwarded to the job when set here.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "RAY_AUTH_MODE")


def job_entrypoint(command: str, config: str, overrides: list[str], python: str = "python") -> str:
    """The job's shell command: ``python -m pipelines <command> --config ... --set ...`` (the CLI)."""
    if command not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {command!r}")
    parts = [python, "-m", "pipelines", command, "--config", config]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def runtime_env(working_dir: Path = PROJECT_ROOT, extra_env: dict | None = None,
                address: str | None = None) -> dict:
    """The job's runtime_env; for a head on this machine (``address``: its dashboard) also the
    head's interpreter quoted, without which Ray cannot start the job's workers from a path with
    a space or a quote (pipelines.ray_runtime.worker_python)."""
    env = dict(TRAIN_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    env.update(extra_env or {})
    return {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env,
            **worker_python(head_python(address) if address else None)}


def head_python(address: str) -> str | None:
    """The interpreter of the cluster head whose dashboard is at ``address``, when it runs on this
    machine; None otherwise."""
    url = urlparse(address if "://" in address else f"http://{address}")
    return local_node_python(url.port) if on_this_machine(url.hostname) else None


def on_this_machine(host: str | None) -> bool:
    """Whether ``host`` names this machine (loopback, or one of its interfaces' addresses)."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    except OSError:
        return False
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return ip.is_loopback or str(ip) in local


def upload_listing(env: dict) -> list[str]:
    """What Ray will upload as the job's ``working_dir``: files and empty folders, relative to it.

    Ray's own packaging walk (its default excludes, ``excludes``, and the .gitignore / .rayignore
    files it honours), without building the package, so the list is exactly what Ray uploads."""
    root = Path(env["working_dir"]).absolute()
    excludes = ray_constants.get_runtime_env_default_excludes() + list(env["excludes"])
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    found: list[str] = []

    def add(path: Path) -> None:  # what Ray's zip handler packs
        if path.is_file() or path.is_dir() and next(path.iterdir(), None) is None:
            found.append(path.relative_to(root).as_posix())

    _dir_travel(root, [_get_excludes(root, excludes)], add, include_gitignore=include_gitignore)
    return sorted(found)


def submit(address: str, entrypoint: str, *, env: dict | None = None, follow: bool = True,
           timeout_s: float | None = None, submission_id: str | None = None) -> tuple[str, str]:
    """Submit the job; with ``follow`` print its logs until it ends. Returns (job id, status)."""
    client = job_submission.JobSubmissionClient(address)  # looked up at call time: tests replace it
    job_id = submit_job(client, entrypoint=entrypoint, runtime_env=runtime_env(extra_env=env, address=address),
                        submission_id=submission_id)
    print(f"submitted Ray job {job_id} to {address}: {entrypoint}", flush=True)
    if not follow:
        return job_id, str(client.get_job_status(job_id))
    status = wait_for_job(client, job_id, timeout_s=timeout_s, echo=True)
    return job_id, status


def submit_job(client, *, retry_s: float = 60.0, **kwargs) -> str:
    """``client.submit_job(**kwargs)``, retried while the head's job agent is still starting
    (right after ``ray start`` / ``ray up`` the dashboard answers before the agent does)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def wait_for_job(client, job_id: str, *, timeout_s: float | None = None, echo: bool = False,
                 poll_s: float = 2.0) -> str:
    """Poll until the job reaches a terminal state, printing new log output as it comes."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if echo:
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Ray job {job_id} still {status} after {timeout_s} s")
        time.sleep(poll_s)


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit the whole pipeline to a Ray cluster as a Ray Job",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray dashboard/job address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--job", choices=JOBS, default="run", help="what to run (default: run)")
    p.add_argument("--config", "-c", default="demo", help="config name or YAML path (inside the project)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--python", default="python",
                   help="interpreter on the cluster (default: the cluster's `python`)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI the job must use (reachable from the cluster)")
    p.add_argument("--no-follow", action="store_true", help="submit and return without following logs")
    p.add_argument("--timeout", type=float, help="give up following after this many seconds")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files that would be uploaded and exit without connecting")
    p.set_defaults(func=main)


def main(args) -> int:
    env = {"MLFLOW_TRACKING_URI": args.mlflow_uri} if args.mlflow_uri else None
    entry = job_entrypoint(args.job, args.config, args.overrides, args.python)
    if args.dry_run:
        files = upload_listing(runtime_env(extra_env=env))
        print("\n".join(files))
        print(f"dry run: {len(files)} files of {PROJECT_ROOT} would be uploaded; nothing submitted to "
              f"{args.address}: {entry}")
        return 0
    job_id, status = submit(args.address, entry, env=env, follow=not args.no_follow, timeout_s=args.timeout)
    print(f"Ray job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") and (args.no_follow or status == "SUCCEEDED") else 1
