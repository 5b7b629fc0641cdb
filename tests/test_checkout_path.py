"""A checkout anywhere: Ray started from an interpreter whose path has spaces, a quote, a
non-ASCII letter and 150+ characters, and the watch that stops a stage whose Ray workers die at
start (pipelines/ray_runtime.py, docs/reliability.md). `.ci/run` runs the suite from such a path."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import threading
import time

import pytest

from pipelines.ray_runtime import DEAD_AT_START, WorkersNotStarting, worker_python, worker_start_watch

ODD_DIR = "a user's projects/naïve (copy) $HOME/machine sound monitoring with a long descriptive folder name"


def test_a_quoted_interpreter_path_runs_through_bash(tmp_path):
    """What Ray does with ``py_executable``: ``bash -c "exec <it> <args>"``."""
    python = tmp_path / ODD_DIR / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    assert worker_python("/opt/venv/bin/python") == {} and worker_python(None) == {}
    cmd = f"exec {worker_python(str(python))['py_executable']} -c 'print(40 + 2)'"
    assert subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60).stdout == "42\n"


def test_a_stage_whose_workers_die_at_start_stops_with_one_line(tmp_path):
    err = tmp_path / "raylet.err"
    err.write_text(f"[earlier] Some workers of the worker process(1) {DEAD_AT_START}.\n")  # not this stage's

    def worker_dies() -> None:
        with err.open("a") as f:
            f.write("bash: -c: line 1: unexpected EOF while looking for matching `''\n"
                    f"[later] Some workers of the worker process(2) {DEAD_AT_START}. The process is dead\n")

    threading.Timer(0.2, worker_dies).start()
    t0 = time.monotonic()
    with pytest.raises(WorkersNotStarting) as raised:
        with worker_start_watch("extract", tmp_path, stall_s=0.5, poll_s=0.05):
            time.sleep(30)  # a stage waiting for results that never come
    message = str(raised.value)
    assert 0.5 <= time.monotonic() - t0 < 3
    assert "\n" not in message and message.startswith("extract: no Ray worker came up in 0.5 s; 1 worker")
    assert "unexpected EOF" in message and str(err) in message


def test_a_stage_with_results_or_without_dead_workers_is_left_alone(tmp_path):
    (tmp_path / "raylet.err").write_text("")
    with worker_start_watch("extract", tmp_path, stall_s=0.1, poll_s=0.05):
        time.sleep(0.5)  # slow, but no worker died
    with worker_start_watch("extract", tmp_path, stall_s=0.3, poll_s=0.05) as progressed:
        progressed()
        (tmp_path / "raylet.err").write_text(f"worker process(3) {DEAD_AT_START}\n")
        time.sleep(0.6)  # a worker died after the stage's first result: not a stage that cannot start


@pytest.mark.slow
def test_ray_data_and_ray_train_run_from_an_odd_interpreter_path(tmp_path):
    """A venv under an odd path that sees this venv's packages: the local Ray's tasks and Ray
    Train's controller and worker (which always have a runtime_env) start and finish, and a
    driver joining that Ray would quote the raylet's interpreter too."""
    venv = tmp_path / ODD_DIR / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "this_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    script = textwrap.dedent(f"""
        import shlex, sys, ray
        from ray.train import RunConfig, ScalingConfig, report
        from ray.train.torch import TorchTrainer
        from pipelines.ray_runtime import cluster_runtime_env, init_ray, worker_start_watch
        assert {ODD_DIR!r} in sys.executable and len(sys.executable) > 150, sys.executable
        init_ray(None, num_cpus=2)
        # what a second driver joining this Ray would give it: the raylet's interpreter, quoted
        gcs = ray._private.worker._global_node.gcs_address
        assert cluster_runtime_env(gcs) == {{"py_executable": shlex.quote(sys.executable)}}, gcs
        total = 0
        with worker_start_watch("data", stall_s=90) as progressed:
            for row in ray.data.range(4).iter_rows():
                progressed()
                total += row["id"]
        print("data", total)
        trainer = TorchTrainer(lambda: report({{"x": 1}}), scaling_config=ScalingConfig(num_workers=1),
                               run_config=RunConfig(storage_path={str(tmp_path / "train")!r}))
        trainer.fit()
        print("train done")
    """)
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.stdout.split("\n")[-3:] == ["data 6", "train done", ""], proc.stdout[-3000:] + proc.stderr[-3000:]
