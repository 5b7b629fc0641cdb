"""One runner for lists of stages: ``asd run`` and ``asd retrain`` are two stage lists over it.

A :class:`Stage` declares its name, the stages whose outputs it reads (``inputs``), the digest of
the config sections that shape it (``fingerprint``) and its output. Its digest combines the
digests of its inputs with its fingerprint; a stage whose digest equals the one recorded in
``<dir>/stages/<stage>.json`` and whose output still exists is skipped, so re-running after a
crash resumes instead of starting over (a training stage's Ray Train run name is derived from the
digest, so an interrupted one resumes from its last epoch checkpoint). A stage without an output
always runs (extraction, which is incremental itself; its digest is that of what it produced,
the feature-store manifest).

Every stage that runs is timed, and the peak memory of the driver and every process it started
(:class:`pipelines.monitor.PeakMemory`) is measured; both go into the summary, the stage's record
and its nested MLflow run. The runner's MLflow calls are best effort (:mod:`pipelines.tracking`):
a stage's record is written before them, so an MLflow outage never loses a finished stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlflow

from pipelines import tracking
from pipelines.monitor import PeakMemory
from pipelines.store import atomic_path

log = logging.getLogger(__name__)


def combine(*parts: str) -> str:
    """The digest of a stage from its inputs' digests and its own fingerprint."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class StageContext:
    """What a running stage gets from the runner."""

    digest: str  # this stage's digest (Ray Train run names derive from it)
    earlier: dict[str, dict]  # the summary of every stage run or skipped before this one
    mlflow_run_id: str | None  # the stage's nested MLflow run (None when it logs its own runs, or MLflow is down)


@dataclass
class Stage:
    name: str
    # does the work; returns what to record ("output_digest": the fingerprint of what it produced,
    # for a stage whose output is data rather than a function of its inputs)
    run: Callable[[StageContext], dict | None]
    inputs: tuple[str, ...] = ()
    fingerprint: str = ""
    output: Path | None = None  # None: always runs
    done_file: str | None = None  # the file in ``output`` that says the stage finished
    # a nested MLflow run of its own; False: the stage logs its own run and returns its "run_id",
    # which then gets the stage's timing and peak memory
    mlflow_run: bool = True

    def finished(self) -> bool:
        if self.output is None:
            return False
        return (self.output / self.done_file).exists() if self.done_file else self.output.exists()


class StageBook:
    """Per-stage records: input digest, outputs, timing. Decides what can be skipped."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def get(self, stage: str) -> dict | None:
        f = self._file(stage)
        return json.loads(f.read_text()) if f.is_file() else None

    def record(self, stage: str, digest: str, **info) -> None:
        """Whole or not at all (a record cut short by a full disk would stop every later run);
        a full disk is one line naming the file."""
        with atomic_path(self._file(stage)) as tmp:
            tmp.write_text(json.dumps({"digest": digest, "finished": time.time(), **info}, indent=2, default=str))


def run_stages(stages: list[Stage], book: StageBook, *, force: Iterable[str] = ()) -> dict[str, dict]:
    """Run ``stages`` in order, skipping those that are up to date (unless named in ``force``);
    return each stage's summary: what it recorded, its seconds and peak memory, or ``skipped``."""
    force = set(force)
    digests: dict[str, str] = {}
    summary: dict[str, dict] = {}
    for stage in stages:
        digest = combine(*(digests[i] for i in stage.inputs), stage.fingerprint)
        record = book.get(stage.name)
        if (stage.name not in force and record and record["digest"] == digest and stage.finished()):
            log.info("%s: up to date, skipped", stage.name)
            summary[stage.name] = {**record, "skipped": True}
        else:
            summary[stage.name] = _run(stage, digest, summary, book)
        digests[stage.name] = summary[stage.name].get("output_digest", digest)
    return summary


def _run(stage: Stage, digest: str, earlier: dict, book: StageBook) -> dict:
    t0 = time.perf_counter()
    with (tracking.tolerant_run(stage.name, tags={"stage": stage.name}) if stage.mlflow_run
          else contextlib.nullcontext()) as own_run_id:
        with PeakMemory() as peak:
            info = stage.run(StageContext(digest, dict(earlier), own_run_id)) or {}
        seconds = time.perf_counter() - t0
        run_id = own_run_id or info.get("run_id")  # a stage logging its own run returns it
        info = {**info, "seconds": seconds, "peak_rss_mib": peak.mib, **({"run_id": run_id} if run_id else {})}
        # recorded before any MLflow call: a server gone by now loses neither the stage nor its output
        book.record(stage.name, digest, **info)
        if run_id:
            tracking.best_effort(f"logging the {stage.name} stage's timing", mlflow.log_metrics,
                                 {"stage_seconds": seconds, "peak_rss_mib": peak.mib}, run_id=run_id)
    return info
