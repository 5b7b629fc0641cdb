"""Security boundaries of the infrastructure (docs/security.md): the local Ray on loopback with a
private token, the cluster launcher's token, the Kubernetes manifests (schemas and hardening),
MLflow's basic-auth server, and what `asd submit` uploads."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
MLFLOW_SCRIPT = ROOT / "infra" / "mlflow_server.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the local Ray -----------------------------------------------------------------------------

# Run in a child process, so that the test session's own Ray is neither reused nor touched: start
# the local Ray as the pipeline does, make it start workers, and print every TCP socket that the
# driver and its descendants (GCS, raylet, agents, workers) listen on.
_LOCAL_RAY_LISTENERS = """
import json
import psutil, ray
from pipelines.ray_runtime import init_ray

init_ray(None, num_cpus=1)
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])
me = psutil.Process()
sockets = set()
for p in [me, *me.children(recursive=True)]:
    try:
        sockets |= {(p.name(), c.laddr.ip, c.laddr.port)
                    for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print("LISTENERS " + json.dumps(sorted(sockets)))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_with_a_private_token():
    temp = tempfile.mkdtemp(prefix="rsec-", dir="/tmp")  # short: Ray's socket paths live under it
    home = Path(temp) / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-c", _LOCAL_RAY_LISTENERS], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        token = home / ".ray" / "auth_token"
        token_mode, token_text = _mode(token), token.read_text()
    finally:
        # only this Ray's processes (their command lines carry its temp dir); never `ray stop`
        for signal in ("-TERM", "-KILL"):
            subprocess.run(["pkill", signal, "-f", temp], capture_output=True)
            time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTENERS ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    listeners = json.loads(line.removeprefix("LISTENERS "))
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in listeners}, listeners
    exposed = [s for s in listeners if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert token_mode == 0o600 and len(token_text) == 64  # made by init_ray, not by Ray (0644)


def test_local_token_file_is_private(tmp_path, monkeypatch):
    from pipelines.ray_runtime import ensure_private_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    ensure_private_token()
    first = token.read_text()
    assert _mode(token) == 0o600 and _mode(token.parent) == 0o700 and len(first) == 64
    token.chmod(0o644)  # as Ray 2.60 writes it under umask 022
    ensure_private_token()
    assert _mode(token) == 0o600 and token.read_text() == first  # tightened, never replaced

    token.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ensure_private_token()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given-by-the-environment")
    ensure_private_token()
    assert not token.exists()


# --- the cluster launcher ----------------------------------------------------------------------

@pytest.mark.slow  # about 4 s: runs the head's setup commands (Python subprocesses)
def test_cluster_launcher_provisions_a_private_token_for_every_node(tmp_path):
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if " ray start" in c)
    assert "RAY_AUTH_MODE=disabled" not in json.dumps(config)
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    # the autoscaler syncs the head's token file to each worker before the worker starts Ray
    assert config["cluster_synced_files"] == ["~/.ray/auth_token"]

    # the head's setup commands, run for real in a scratch home holding the project's venv
    (tmp_path / "asd").mkdir()
    (tmp_path / "asd" / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {**os.environ, "HOME": str(tmp_path)}
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    tokens = []
    for _ in range(2):  # a second `ray up` keeps the token the workers already have
        for command in config["head_setup_commands"]:
            proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert proc.stdout.strip() == ""  # the token is never printed into the launcher's log
        token = tmp_path / ".ray" / "auth_token"
        assert _mode(token) == 0o600 and _mode(token.parent) == 0o700
        tokens.append(token.read_text())
    assert len(tokens[0]) == 64 and set(tokens[0]) <= set("0123456789abcdef") and tokens[0] == tokens[1]


# --- Kubernetes ------------------------------------------------------------------------------

def _manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validator_for(doc: dict):
    """The Kubernetes v1.34 strict schema of the manifest's kind (tests/schemas/, vendored), or
    the KubeRay RayJob schema, whose pod templates refer to the Kubernetes ones."""
    import jsonschema
    from referencing import Registry, Resource

    k8s = json.loads((SCHEMAS / "kubernetes-v1.34.json").read_text())
    rayjob = json.loads((SCHEMAS / "kuberay-rayjob-v1.json").read_text())
    registry = Registry().with_resources(
        [(s["$id"], Resource.from_contents(s)) for s in (k8s, rayjob)])
    refs = {("batch/v1", "CronJob"): f"{k8s['$id']}#/$defs/io.k8s.api.batch.v1.CronJob",
            ("networking.k8s.io/v1", "NetworkPolicy"):
                f"{k8s['$id']}#/$defs/io.k8s.api.networking.v1.NetworkPolicy",
            ("ray.io/v1", "RayJob"): rayjob["$id"]}
    ref = refs[(doc["apiVersion"], doc["kind"])]
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator_for(doc).iter_errors(doc)]


def test_k8s_manifests_match_the_kubernetes_and_kuberay_schemas():
    kinds = set()
    for name, doc in _manifests():
        assert not _errors(doc), (name, _errors(doc))
        kinds.add(doc["kind"])
    assert kinds == {"RayJob", "CronJob", "NetworkPolicy"}


def test_k8s_schema_validation_rejects_what_the_api_server_would():
    docs = {doc["kind"]: doc for _, doc in _manifests()}
    broken = copy.deepcopy(docs["CronJob"])  # a misspelt field deep in a container
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert _errors(broken)
    broken = copy.deepcopy(docs["RayJob"])  # rayStartParams are strings; unknown RayJob fields
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 4
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert len(_errors(broken)) == 2
    broken = copy.deepcopy(docs["RayJob"])  # a bad field inside a Ray pod template
    head = broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    assert _errors(broken)


def _pod_templates(doc: dict) -> list[dict]:
    """The pod templates of a manifest: a CronJob's; a RayJob's submitter, head and worker groups."""
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]]
    if doc["kind"] == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        return [doc["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"],
                *(group["template"] for group in cluster["workerGroupSpecs"])]
    return []


def _pod_specs(doc: dict) -> list[dict]:
    return [template["spec"] for template in _pod_templates(doc)]


def test_k8s_pods_run_unprivileged_with_bounded_resources_and_pinned_images():
    pods = [pod for _, doc in _manifests() for pod in _pod_specs(doc)]
    assert len(pods) == 4  # the CronJob's; the RayJob's submitter, head and GPU workers
    for pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False and c["capabilities"]["drop"] == ["ALL"]
            assert c["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]  # the writable scratch: HOME, Ray's temp dir
            assert not any(p == "/root" or p.startswith("/root/") for p in mounts)
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), container["name"]
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition("@")[0].partition(":")[2]
            assert tag and tag != "latest", image


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_k8s_ray_token_comes_from_the_secret_and_ray_ports_are_fenced():
    docs = {doc["kind"]: doc for _, doc in _manifests()}
    token_ref = {"secretKeyRef": {"name": "asd-ray-auth", "key": "auth_token"}}
    rayjob = docs["RayJob"]["spec"]
    assert rayjob["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "asd-ray-auth"}
    for pod in _pod_specs(docs["RayJob"])[1:]:  # head and workers
        env = _env(pod["containers"][0])
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == token_ref
    cron = _pod_specs(docs["CronJob"])[0]
    env, mounts = _env(cron["containers"][0]), cron["containers"][0]["volumeMounts"]
    assert env["RAY_AUTH_MODE"] == "token"
    token_dir = str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent)
    volume = next(m["name"] for m in mounts if m["mountPath"] == token_dir)
    secret = next(v["secret"] for v in cron["volumes"] if v["name"] == volume)
    assert secret["secretName"] == "asd-ray-auth" and secret["defaultMode"] & 0o007 == 0

    policies = [doc for _, doc in _manifests() if doc["kind"] == "NetworkPolicy"]
    pipeline = {"app.kubernetes.io/part-of": "asd-prototypes"}
    for doc in docs.values():  # every pod of the pipeline carries the label the policies admit
        for template in _pod_templates(doc):
            assert template["metadata"]["labels"].items() >= pipeline.items()
    ray_policy = next(p for p in policies if "ray.io/is-ray-node" in p["spec"]["podSelector"]["matchLabels"])
    rules = ray_policy["spec"]["ingress"]
    assert ray_policy["spec"]["policyTypes"] == ["Ingress"]
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": pipeline}}]}
    assert all(r.get("ports") == [{"protocol": "TCP", "port": 8265}] for r in rules[1:])
    mlflow_policy = next(p for p in policies if p["metadata"].get("namespace") == "mlops")
    (rule,) = mlflow_policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    (source,) = rule["from"]  # pods of the pipeline AND in its namespace
    assert source["podSelector"] == {"matchLabels": pipeline} and "namespaceSelector" in source


# kubectl refuses `kubectl -n A apply -f` of an object that declares `namespace: B`
_APPLY = re.compile(r"kubectl\s+(?:-n|--namespace)[\s=](\S+)\s+apply\s+-f\s+infra/k8s/(\S+\.yaml)")


def _documents() -> list[Path]:
    """What a user reads for commands: the README, docs/ and the manifests' own comments."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(K8S.glob("*.yaml"))]


def test_k8s_manifests_apply_in_the_documented_namespaces():
    applied_in: dict[str, set[str]] = {}  # manifest file -> namespaces of its documented apply commands
    for document in _documents():
        for namespace, name in _APPLY.findall(document.read_text()):
            applied_in.setdefault(name, set()).add(namespace)
    for name, doc in _manifests():
        assert len(applied_in.get(name, ())) == 1, (name, applied_in.get(name))  # one documented namespace
        assert doc["metadata"].get("namespace") in (None, *applied_in[name]), name
    pipeline = {ns for name, doc in _manifests() if _pod_templates(doc) for ns in applied_in[name]}
    mlflow_policy = next(doc for name, doc in _manifests() if doc["metadata"]["name"] == "mlflow-from-asd")
    (source,) = mlflow_policy["spec"]["ingress"][0]["from"]  # MLflow admits the namespace the pipeline runs in
    assert {source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]} == pipeline


def test_documented_model_servers_refuse_pickles():
    """Every documented `mlflow models serve` block sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
    (docs/security.md): MLflow's default unpickles whatever version the registry holds."""
    blocks = [(document.name, block) for document in _documents() if document.suffix == ".md"
              for block in re.findall(r"```[^\n]*\n(.*?)```", document.read_text(), re.S)
              if "mlflow models serve" in block]
    assert {name for name, _ in blocks} >= {"README.md", "security.md", "mlflow.md"}
    for name, block in blocks:
        assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in block, (name, block)


# --- MLflow with basic authentication ----------------------------------------------------------

@pytest.fixture
def auth_mlflow_server(tmp_path):
    """``start(env) -> (uri, state dir)``: infra/mlflow_server.sh --auth in the background on a
    free loopback port, with ``env`` on top of this environment less MLFLOW_*; stopped after."""
    started: list[tuple[Path, dict]] = []

    def start(extra: dict[str, str]) -> tuple[str, Path]:
        state, port = tmp_path / f"server{len(started)}", _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", **extra)
        proc = subprocess.run(["bash", str(MLFLOW_SCRIPT), "--auth", "--port", str(port), "--dir", str(state),
                               "--python", sys.executable, "--background", "--timeout", "180"],
                              capture_output=True, text=True, timeout=240, env=env)
        started.append((state, env))
        log = state / "server.log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        assert proc.returncode == 0, (proc.stdout, proc.stderr, tail)
        return f"http://127.0.0.1:{port}", state

    yield start
    for state, env in started:
        subprocess.run(["bash", str(MLFLOW_SCRIPT), "--stop", "--dir", str(state)], capture_output=True,
                       text=True, timeout=60, env=env)


def _http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_mlflow_auth_server_rejects_anonymous_calls_and_logs_with_the_pipeline_credentials(
        auth_mlflow_server, monkeypatch):
    import mlflow

    from pipelines import tracking

    user, password = "asd-pipeline", "a-long-pipeline-password"
    uri, state = auth_mlflow_server({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=10"
    assert _http_status(search) == 401
    assert _http_status(search, user, "not-the-password") == 401
    assert _http_status(search, user, password) == 200
    assert _http_status(f"{uri}/health") == 200  # the pipeline's reachability probe needs no login
    # the server's files are its owner's only; the admin password is in no file
    assert _mode(state) == 0o700 and password not in (state / "basic_auth.ini").read_text()
    assert not (state / "credentials").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(name, "")  # recorded, so teardown undoes what connect() sets
        monkeypatch.delenv(name)
    tracking.connect(uri)
    try:
        experiment = mlflow.create_experiment("auth-check")
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_metric("auc", 0.75)
        assert mlflow.get_run(run.info.run_id).data.metrics == {"auc": 0.75}
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(mlflow.exceptions.MlflowException, match="401|Unauthorized|credentials"):
            mlflow.get_run(run.info.run_id)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.mark.slow
def test_mlflow_auth_server_without_given_credentials_makes_a_private_admin_file(auth_mlflow_server):
    import configparser

    uri, state = auth_mlflow_server({})
    creds_file = state / "credentials"
    assert _mode(creds_file) == 0o600
    creds = configparser.ConfigParser()
    creds.read(creds_file)
    user = creds["mlflow"]["mlflow_tracking_username"]
    password = creds["mlflow"]["mlflow_tracking_password"]
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=10"
    assert _http_status(search) == 401 and _http_status(search, user, password) == 200


# --- asd submit -------------------------------------------------------------------------------

# What a repository folder collects beside the code: Ray's token, the MLflow server's session key
# and auth config, cluster, registry and cloud credentials, keys, a venv, runs and data; some of
# them also inside the package folders, under names no code file has.
SECRETS = [".ray/auth_token", "auth_token", "mlflow-server/flask_secret_key", "mlflow-server/basic_auth.ini",
           ".kube/config", ".docker/config.json", ".pypirc", ".npmrc", "my-project-3f2a1c.json",
           "infra/gcp-service-account.json", ".htpasswd", "prod.tfvars", "infra/terraform/prod.auto.tfvars",
           ".env", "key.pem", "id_ed25519", ".netrc", ".git/config", ".venv/bin/python", "runs/demo/mlflow.db",
           "data/dev_data/fan/train/section_00_source_train_normal_0000_a_1.wav", "features/v-1/part-0.parquet",
           "configs/basic_auth.ini", "configs/.env", "pipelines/flask_secret_key", "pipelines/.pypirc",
           "asd/service-account.json", "pipelines/.venv/lib/site.py", "configs/.kube/config"]
# the files a job needs: the code, the configs, the declaration of what the nodes install
NEEDED = ["pyproject.toml", "requirements.txt", "asd/__init__.py", "asd/model.py", "pipelines/__init__.py",
          "pipelines/__main__.py", "pipelines/operations/run.py", "pipelines/datasets/dcase_task2.yaml",
          "configs/demo.yaml", "configs/tiny.yaml"]
# the project's own files that no job reads
UNNEEDED = ["README.md", "docs/keys.md", "infra/k8s/rayjob.yaml", "tests/test_x.py", "ray_cluster.yaml"]


def _project_with_secrets(root: Path) -> None:
    for name in SECRETS + NEEDED + UNNEEDED:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    with open(root / "recordings.tar", "wb") as big:  # a stray data file of 1 GiB (sparse)
        big.truncate(2**30)
    (root / "pipelines" / "token.py").symlink_to(root / ".ray" / "auth_token")  # code by name only


def test_submit_uploads_only_the_allowlist_and_exactly_what_ray_packs(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    from pipelines.operations.submit import package_files, runtime_env, staged_package

    project = tmp_path / "project"
    _project_with_secrets(project)
    files = package_files(project)
    assert files == sorted(NEEDED)
    # the package Ray itself builds from the job's runtime_env holds the same files, nothing else
    with staged_package(files, project) as working_dir:
        env = runtime_env(working_dir)
        package = tmp_path / "package.zip"
        create_package(env["working_dir"], package, include_gitignore=True, excludes=env.get("excludes", []))
    assert sorted(zipfile.ZipFile(package).namelist()) == sorted(NEEDED)


def test_submit_allowlist_holds_every_file_of_the_project_a_job_reads():
    """Every tracked file of asd/, pipelines/ and configs/ goes up (a job that misses one fails on
    the cluster), and nothing outside them but pyproject.toml and requirements.txt."""
    from pipelines.operations.submit import PACKAGED_FILES, PACKAGED_TREES, PROJECT_ROOT, package_files

    tracked = subprocess.run(["git", "ls-files", "--", *PACKAGED_TREES], cwd=PROJECT_ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    files = package_files()
    assert tracked and set(tracked) <= set(files)
    assert all(f in PACKAGED_FILES or f.split("/")[0] in PACKAGED_TREES for f in files)


def test_submit_packages_a_config_path_with_its_extends_chain_and_refuses_one_outside(tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.operations.submit import job_config

    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "demo.yaml").write_text("run_dir: runs/demo\n")
    (project / "experiments").mkdir()
    (project / "experiments" / "base.yaml").write_text("extends: ../configs/demo.yaml\n")
    (project / "experiments" / "mine.yaml").write_text("extends: base.yaml\n")
    config, files = job_config(str(project / "experiments" / "mine.yaml"), project)
    assert config == "experiments/mine.yaml"  # as the job finds it in its working dir
    assert files == ["experiments/mine.yaml", "experiments/base.yaml", "configs/demo.yaml"]
    assert job_config("tiny") == ("tiny", [])

    outside = tmp_path / "mine.yaml"
    outside.write_text("extends: demo\n")
    assert main(["submit", "--dry-run", "--config", str(outside)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asd submit: error: --config") and "outside the project" in err and "\n" not in err


def test_submit_dry_run_lists_the_upload_and_never_connects(monkeypatch, capsys):
    import ray.job_submission

    from pipelines.cli import main
    from pipelines.operations.submit import package_files

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run connected to the cluster")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    assert main(["submit", "--dry-run", "--address", f"http://127.0.0.1:{_free_port()}"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "pipelines/operations/submit.py" in listed and "configs/demo.yaml" in listed
    assert listed[:-1] == package_files() and "dry run:" in listed[-1]
