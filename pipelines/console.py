"""What a person sees: the project's own lines on the console, everything else in a log file.

At default verbosity the console gets the project's loggers (``asd.*``, ``pipelines.*``) at INFO,
progress bars (:func:`progress`, :class:`EpochProgress`) and errors from anywhere; Ray's, Ray
Train's and Ray Data's own logs (and every worker's output) go to ``<run_dir>/logs/<command>.log``
only (``asd extract``: ``logs/extract.log`` beside its store), whose path is printed once.
``asd -v <command>`` sends everything to the console as well.
Routing is by logger and level (Ray's loggers are re-parented to ours and its workers' output is
not forwarded to the driver: ``ray.init(log_to_driver=False)``), never by message text.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

OWN_LOGGERS = ("asd", "pipelines", "__main__")
_state = {"verbose": False, "log_file": None}


class _ConsoleFilter(logging.Filter):
    """Own loggers at INFO and up; everyone else's at ERROR and up (all of them with -v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"] or record.levelno >= logging.ERROR:
            return True
        return record.name.split(".")[0] in OWN_LOGGERS


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (as ``logging.lastResort``):
    a command run in-process after another (tests, notebooks) never writes to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(verbose: bool = False) -> None:
    """Console logging for one command (idempotent)."""
    _state["verbose"] = verbose
    # MLflow's artifact progress bars (its console handler is off: pipelines/__init__.py)
    if not verbose:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_asd_console", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_ConsoleFilter())
        handler._asd_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def verbose() -> bool:
    return bool(_state["verbose"])


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's or a container's stop) as an interruption: the command
    unwinds as on Ctrl-C (locks released, journals kept, Ray shut down) and ends in one line."""


def _terminated(_signum, _frame) -> None:
    _state["terminated"] = True
    raise Terminated


def terminated() -> bool:
    """Whether SIGTERM arrived: Ray Train re-raises an interruption as a plain KeyboardInterrupt."""
    return bool(_state.get("terminated"))


def handle_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (the CLI, at the start of a command)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
        _state.update(sigterm=True, terminated=False)


def rearm_sigterm() -> None:
    """After ``ray.init``, which replaces SIGTERM's handler (its C++ core's prints a stack dump and
    aborts): ours again, where a command had set it."""
    if _state.get("sigterm") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


class _LogFileHandler(logging.FileHandler):
    """The run's log file. When a record cannot be written (a full disk under the run directory),
    one line says so and the file stops, instead of logging's traceback on stderr for every
    later record; the console goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
            return
        logging.getLogger().removeHandler(self)
        print(f"logs: {self.baseFilename} stopped ({err.strerror or err}); the console goes on", file=sys.stderr)


def log_to_file(folder: str | Path, command: str) -> Path:
    """Every record (Ray's included) also goes to ``<folder>/<command>.log``; prints its path once."""
    path = Path(folder) / f"{command}.log"
    if _state["log_file"] == path:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    _state["log_file"] = path
    print(f"logs: {path}", flush=True)  # stdout: stderr stays for errors
    return path


def route_ray_logs() -> None:
    """Ray's loggers to ours: Ray gives its ``ray`` and ``ray.data`` loggers console handlers of
    their own (on import) and stops them from propagating; without those, their records reach the
    run's log file (and the console with -v). Ray Data's own session log file stays."""
    importlib.import_module("ray.data")  # configures its logger on import: route it after that

    for name in ("ray", "ray.data", "mlflow"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("ray.data").setLevel(logging.INFO)


def progress(total: int | None, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on stderr (rate and ETA), redrawn at most twice a second."""
    from tqdm import tqdm  # deferred: costs more than all of `asd --help`'s imports together

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True, leave=True)


class EpochProgress:
    """Driver side of a training stage's progress bar: the rank-0 worker puts each epoch's
    metrics into a Ray queue (``queue``, passed to the workers), a driver thread shows them as
    ``epoch x/y, loss, samples/s, ETA``. Works wherever the workers run (a queue actor, not a file)."""

    def __init__(self, stage: str, epochs: int) -> None:
        # Ray, deferred: the CLI imports this module and `asd --help` stays Ray-free
        import ray  # deferred: see above
        from ray.util.queue import Queue  # deferred: see above
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # deferred: see above

        # on the driver's node (as Ray Train's controller is): anywhere else, losing that node
        # killed the queue, and with it the rank-0 worker's report and the run (tests/test_node_loss.py)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.stage, self.epochs = stage, epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._show, daemon=True)

    def __enter__(self) -> "EpochProgress":
        self._thread.start()
        return self

    def _show(self) -> None:
        from ray.util.queue import Empty  # deferred: Ray, as in __init__ (the CLI imports this module)

        bar = progress(self.epochs, self.stage, "epoch")
        try:
            while not self._stop.is_set():
                try:
                    metrics = self.queue.get(timeout=0.5)
                except Empty:
                    continue
                except Exception:  # noqa: BLE001 - the queue actor is gone: the stage is ending
                    break
                bar.n = int(metrics["epoch"]) + 1
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "samples_per_s") if k in metrics})
        finally:
            bar.close()

    def __exit__(self, *exc) -> None:
        deadline = time.time() + 2.0
        try:
            while time.time() < deadline and not self.queue.empty():  # the last epochs' lines
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the queue actor is gone: a progress bar never fails a run
            pass
        self._stop.set()
        self._thread.join(timeout=5)
        self.queue.shutdown()
