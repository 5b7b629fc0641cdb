"""Cluster side: ray_cluster.yaml against Ray's own schema, and the tiny pipeline submitted as a
Ray Job to a real local head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from local_cluster import cluster_env, start_head, stop_node

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_config_matches_ray_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    # a CPU head and a GPU worker type, with autoscaling bounds and pinned installs
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(n["max_workers"] >= n["min_workers"] for n in gpu_types)
    assert any("requirements.txt" in c for c in config["setup_commands"])


def test_cluster_config_schema_rejects_a_broken_config():
    """The validation above can fail: a config without a provider is rejected."""
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_job_entrypoint_and_runtime_env(tmp_path):
    from pipelines.operations.submit import job_entrypoint, runtime_env

    entry = job_entrypoint("run", "tiny", ["run_dir=/tmp/x y"], python="/v/bin/python")
    assert entry == "/v/bin/python -m pipelines run --config tiny --set 'run_dir=/tmp/x y'"
    env = runtime_env(tmp_path, extra_env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert env["working_dir"] == str(tmp_path) and env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


@pytest.fixture
def local_head():
    """`ray start --head` on loopback from this venv (auth disabled: a loopback test cluster)."""
    env = cluster_env()
    try:
        head = start_head(num_cpus=2, env=env)
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield head.dashboard_url, env
    finally:
        stop_node(head.temp_dir)  # only this head's processes: `ray stop` would stop every Ray here


@pytest.mark.slow
def test_tiny_pipeline_as_ray_job(local_head, tmp_path, mlflow_server, monkeypatch):
    import mlflow
    from ray.job_submission import JobSubmissionClient

    from pipelines.operations.submit import (job_entrypoint, package_files, runtime_env, staged_package,
                                             submit_job, wait_for_job)

    address, env = local_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run_dir, data = tmp_path / "run", tmp_path / "data"
    name = "asd-job-test"
    # one Ray Train stage (fine-tuning) is enough here: the two stages' training runs are tested
    # in-process (test_pipeline.py); each stage's worker group costs ~30 s to start on 2 cores
    entry = job_entrypoint("run", "tiny", [f"run_dir={run_dir}", f"data.root={data}", "pretrain.enabled=false",
                                           f"mlflow.registered_model={name}"], python=sys.executable)
    client = JobSubmissionClient(address)
    with staged_package(package_files()) as working_dir:  # the allowlisted project, as `asd submit` uploads it
        job_id = submit_job(client, entrypoint=entry, runtime_env=runtime_env(
            working_dir, extra_env={"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_DISABLE_TELEMETRY": "true"},
            address=address))
    status = wait_for_job(client, job_id, timeout_s=900)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]

    # an earlier in-process pipeline test leaves its own registry URI set in this process
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["asd-tiny"], filter_string="tags.pipeline = 'tiny'",
                              output_format="list")
    assert runs and runs[0].info.status == "FINISHED"
    champion = mlflow.MlflowClient(mlflow_server, mlflow_server).get_model_version_by_alias(name, "champion")
    assert champion.version == "1"
    assert (run_dir / "results.md").is_file() and (run_dir / "scoring" / "submission").is_dir()
    # the job's Ray Train stage ran on the cluster's workers and left its model
    assert (run_dir / "models" / "finetune").is_dir() and not (run_dir / "models" / "pretrain").exists()
