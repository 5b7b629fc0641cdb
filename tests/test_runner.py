"""The stage runner (pipelines/operations/runner.py) and the detector registry, without Ray or MLflow:
stages are plain functions here, so what is checked is the runner's own logic: order, digests
from inputs and fingerprints, skipping, forcing, and what it records."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipelines import detectors
from pipelines.operations.runner import Stage, StageBook, combine, run_stages


def _graph(tmp_path, calls, fingerprints, data="v1"):
    """extract (always runs; its digest is the data's) -> train -> score, writing real outputs."""
    def extract(ctx):
        calls.append("extract")
        return {"output_digest": hashlib.sha256(data.encode()).hexdigest()[:16]}

    def writer(name):
        def run(ctx):
            calls.append(name)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "done").write_text(ctx.digest)
            return {"seen": sorted(ctx.earlier)}
        return run

    return [Stage("extract", extract, mlflow_run=False),
            Stage("train", writer("train"), inputs=("extract",), fingerprint=fingerprints["train"],
                  output=tmp_path / "train", done_file="done", mlflow_run=False),
            Stage("score", writer("score"), inputs=("train",), fingerprint=fingerprints["score"],
                  output=tmp_path / "score", done_file="done", mlflow_run=False)]


def test_runner_runs_in_order_then_skips_what_is_up_to_date(tmp_path):
    calls, fp = [], {"train": "a", "score": "s"}
    book = StageBook(tmp_path / "run")
    first = run_stages(_graph(tmp_path, calls, fp), book)
    assert calls == ["extract", "train", "score"]
    assert first["score"]["seen"] == ["extract", "train"]  # each stage sees every earlier one
    # the digest chain: train from the data's digest, score from train's
    data = hashlib.sha256(b"v1").hexdigest()[:16]
    assert json.loads((tmp_path / "run" / "stages" / "train.json").read_text())["digest"] == combine(data, "a")
    assert (tmp_path / "score" / "done").read_text() == combine(combine(data, "a"), "s")
    for record in first.values():
        assert record["seconds"] >= 0 and record["peak_rss_mib"] > 0

    calls.clear()
    again = run_stages(_graph(tmp_path, calls, fp), book)
    assert calls == ["extract"]  # no output: always runs; the rest are up to date
    assert again["train"]["skipped"] and again["score"]["skipped"]


def test_a_change_reruns_the_stage_and_everything_downstream(tmp_path):
    book, calls = StageBook(tmp_path / "run"), []
    run_stages(_graph(tmp_path, calls, {"train": "a", "score": "s"}), book)

    calls.clear()  # the score config changed: only score
    run_stages(_graph(tmp_path, calls, {"train": "a", "score": "s2"}), book)
    assert calls == ["extract", "score"]

    calls.clear()  # new data: the digest of extract changes, so train and score run
    run_stages(_graph(tmp_path, calls, {"train": "a", "score": "s2"}, data="v2"), book)
    assert calls == ["extract", "train", "score"]

    calls.clear()  # forced, or the output gone: that stage runs; score's inputs did not change
    run_stages(_graph(tmp_path, calls, {"train": "a", "score": "s2"}, data="v2"), book, force=["train"])
    assert calls == ["extract", "train"]
    (tmp_path / "score" / "done").unlink()
    calls.clear()
    run_stages(_graph(tmp_path, calls, {"train": "a", "score": "s2"}, data="v2"), book)
    assert calls == ["extract", "score"]


def test_a_failing_stage_records_nothing_and_stops_the_run(tmp_path):
    book, calls = StageBook(tmp_path / "run"), []
    stages = _graph(tmp_path, calls, {"train": "a", "score": "s"})

    def broken(ctx):
        raise RuntimeError("boom")
    stages[1].run = broken
    with pytest.raises(RuntimeError, match="boom"):
        run_stages(stages, book)
    assert book.get("train") is None and calls == ["extract"]


def test_the_registry_names_every_detector_and_reads_old_model_directories(tmp_path):
    from pipelines.config import METHODS

    assert METHODS == detectors.NAMES
    for name in detectors.NAMES:
        detector = detectors.get(name)
        assert detector.name == name and detector.stage_names
        # a model directory names its detector; directories written before that carry their stage
        (tmp_path / "meta.json").write_text(json.dumps({"detector": name}))
        assert detectors.of_model_dir(tmp_path) is detector
        for stage in detector.stage_names:
            assert detectors.name_in_meta({"stage": stage}) == name
    with pytest.raises(ValueError, match="no detector 'nope'"):
        detectors.get("nope")
    with pytest.raises(ValueError, match="names no registered detector"):
        detectors.name_in_meta({"stage": "nope"})


def test_versions_registered_before_the_layout_change_find_their_model_code():
    """A model version stores its models-from-code file, which imported ``pipelines.pyfunc_model``
    before the served model moved to pipelines/serving/: that import must keep working."""
    from pipelines.pyfunc_model import AsdPyfuncModel as old_path
    from pipelines.serving.pyfunc_model import AsdPyfuncModel

    assert old_path is AsdPyfuncModel
