"""``asd submit``: run the whole pipeline (or a retrain) on a Ray cluster as a Ray Job.

Equivalent to ``ray job submit --working-dir . -- python -m pipelines run --config <cfg>``,
with the runtime environment the job needs (the project's code and configs as working dir, an
allowlist; MLflow and Ray settings as environment variables), then follows the job's logs and
exits with its status. The driver of the job runs on the head node, so paths in the config
(``run_dir``, ``data.root``) must be valid there and, on multi-node clusters, on shared
storage that every node mounts (see README: running on a cluster). ``--dry-run`` lists the
files that would be uploaded and submits nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import psutil
import yaml

from ray import job_submission

from pipelines.config import resolve_config_path
from pipelines.errors import UserError
from pipelines.ray_runtime import TRAIN_ENV, local_node_python, worker_python

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # pipelines/operations/ -> the repository
# What is uploaded is an allowlist, because whatever goes up is readable by every Ray token holder
# (Ray's package store on the head, the job's working dir on every node) and a denylist misses
# every secret it does not name (docs/security.md). A job runs `python -m pipelines <command>
# --config <cfg>` in its working dir, which imports asd/ and pipelines/ and reads the YAML of
# configs/; pyproject.toml and requirements.txt say what the nodes must have installed. Nothing
# else, data and run outputs included, is packaged; a config file outside configs/ is added by name.
# folder -> the suffixes of its files (pipelines/ holds data files too: the dataset catalogue)
PACKAGED_TREES = {"asd": (".py",), "pipelines": (".py", ".yaml"), "configs": (".yaml",)}
PACKAGED_FILES = ("pyproject.toml", "requirements.txt")
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


def runtime_env(working_dir: Path, extra_env: dict | None = None, address: str | None = None) -> dict:
    """The job's runtime_env, with ``working_dir`` the staged package (:func:`staged_package`); for a
    head on this machine (``address``: its dashboard) also the head's interpreter quoted, without
    which Ray cannot start the job's workers from a path with a space or a quote
    (pipelines.ray_runtime.worker_python)."""
    env = dict(TRAIN_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    env.update(extra_env or {})
    return {"working_dir": str(working_dir), "env_vars": env,
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


def package_files(root: Path = PROJECT_ROOT, extra: Iterable[str] = ()) -> list[str]:
    """What ``asd submit`` uploads, relative to ``root``: :data:`PACKAGED_FILES` and the files of
    :data:`PACKAGED_TREES` with their suffixes, plus ``extra``. Symlinks (they may lead anywhere)
    and hidden names (a venv or a tool's folder inside a package, never the project's code) are
    left out."""
    def plain(path: Path) -> bool:
        return path.is_file() and not path.is_symlink()

    found = {name for name in PACKAGED_FILES if plain(root / name)}
    for tree, suffixes in PACKAGED_TREES.items():
        for folder, dirs, files in os.walk(root / tree):  # symlinked folders are not entered
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.update((Path(folder) / f).relative_to(root).as_posix() for f in files
                         if f.endswith(suffixes) and not f.startswith(".") and plain(Path(folder) / f))
    return sorted(found | set(extra))


def job_config(config: str, root: Path = PROJECT_ROOT) -> tuple[str, list[str]]:
    """(the ``--config`` the job gets, the files it needs besides the package). A config name is
    read from the packaged configs/; a YAML path is packaged with every file its ``extends:`` chain
    names and passed relative to the project, and must lie inside the project."""
    if not Path(config).is_file():
        resolve_config_path(config)  # an unknown name fails here, before anything is uploaded
        return config, []
    chain, path = [], Path(config).resolve()
    while path not in chain:
        if not path.is_relative_to(root.resolve()):
            raise UserError(f"--config {config}: {path} is outside the project {root}; a job reads only "
                            "files of the project: move it under configs/")
        chain.append(path)
        data = yaml.safe_load(path.read_text())
        parent = data.get("extends") if isinstance(data, dict) else None
        if not parent:
            break
        path = (path.parent / parent).resolve()
    files = [p.relative_to(root.resolve()).as_posix() for p in chain]
    return files[0], files


@contextlib.contextmanager
def staged_package(files: list[str], root: Path = PROJECT_ROOT) -> Iterator[Path]:
    """A private temporary folder holding copies of ``files``: the job's working_dir, so what Ray
    packs and uploads is exactly ``files`` (Ray's package is content-addressed: an unchanged
    project is not uploaded again)."""
    with tempfile.TemporaryDirectory(prefix="asd-job-") as staged:
        for name in files:
            (Path(staged) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, Path(staged) / name)
        yield Path(staged)


def submit(address: str, entrypoint: str, files: list[str], *, env: dict | None = None, follow: bool = True,
           timeout_s: float | None = None, submission_id: str | None = None) -> tuple[str, str]:
    """Submit the job with ``files`` of the project as its working dir; with ``follow`` print its
    logs until it ends. Returns (job id, status)."""
    client = job_submission.JobSubmissionClient(address)  # looked up at call time: tests replace it
    with staged_package(files) as working_dir:  # Ray uploads it within submit_job
        job_id = submit_job(client, entrypoint=entrypoint, submission_id=submission_id,
                            runtime_env=runtime_env(working_dir, extra_env=env, address=address))
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
    p.add_argument("--config", "-c", default="demo",
                   help="config name in configs/, or a YAML path inside the project (uploaded with the job)")
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
    config, config_files = job_config(args.config)
    entry = job_entrypoint(args.job, config, args.overrides, args.python)
    files = package_files(extra=config_files)
    if args.dry_run:
        print("\n".join(files))
        print(f"dry run: {len(files)} files of {PROJECT_ROOT} would be uploaded; nothing submitted to "
              f"{args.address}: {entry}")
        return 0
    job_id, status = submit(args.address, entry, files, env=env, follow=not args.no_follow,
                            timeout_s=args.timeout)
    print(f"Ray job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") and (args.no_follow or status == "SUCCEEDED") else 1
