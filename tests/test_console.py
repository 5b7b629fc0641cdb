"""The console: the project's lines and errors on stderr, library logs only in the run's log file."""

from __future__ import annotations

import logging

import pytest

from pipelines import console


@pytest.fixture
def fresh_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, dict(console._state))
    root.handlers = []
    yield
    root.handlers, root.level = saved[0], saved[1]
    console._state.update(saved[2])


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_reach_the_file_and_only_errors_reach_the_console(fresh_logging, tmp_path, capsys, verbose):
    console.configure(verbose=verbose)
    path = console.log_to_file(tmp_path / "logs", "run")
    console.route_ray_logs()
    logging.getLogger("asd.train").info("own progress line")
    logging.getLogger("ray.data._internal.execution.streaming_executor").info("execution plan of dataset")
    logging.getLogger("ray.train").warning("a harmless library warning")
    logging.getLogger("mlflow.store.db.utils").info("creating tables")
    logging.getLogger("ray._private.worker").error("a real error")
    for handler in logging.getLogger().handlers:
        handler.flush()
    out, err = capsys.readouterr()
    assert f"logs: {path}" in out
    assert "own progress line" in err and "a real error" in err
    for line in ("execution plan of dataset", "a harmless library warning", "creating tables"):
        assert (line in err) == verbose
        assert line in path.read_text()  # always in the file


def test_a_log_file_on_a_full_disk_stops_in_one_line_and_the_console_goes_on(fresh_logging, tmp_path, capsys):
    """The kernel's own ENOSPC: the log file is a link to /dev/full, whose writes fail so."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").symlink_to("/dev/full")
    console.configure()
    path = console.log_to_file(tmp_path / "logs", "run")
    for i in range(3):
        logging.getLogger("asd.train").info("own progress line %d", i)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.splitlines() == ["own progress line 0", f"logs: {path} stopped (No space left on device); the console "
                                "goes on", "own progress line 1", "own progress line 2"]


@pytest.mark.slow  # a fresh interpreter importing MLflow and torch: ~10 s
def test_mlflow_configures_no_console_handler_of_its_own(tmp_path):
    """A subcommand module imports MLflow before the console is configured (the CLI loads it to
    build the parser): MLflow's own INFO lines (creating a SQLite store) must still stay off the
    console. Run in a fresh interpreter, where MLflow is imported for the first time."""
    import subprocess
    import sys

    code = ("from pipelines import cli, console; cli.build_parser('score'); console.configure(); "
            "import mlflow; "
            f"mlflow.set_tracking_uri('sqlite:///{tmp_path}/mlflow.db'); mlflow.search_experiments()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "database tables" not in done.stderr, done.stderr
