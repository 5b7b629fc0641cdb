"""benchmarks/common.py: a result's commit id says ``-dirty`` when code differs from the commit, and
not when only result files (which a running benchmark rewrites) do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402  (benchmarks/ is not a package)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_commit_id_ignores_result_files_only(tmp_path, monkeypatch):
    repo = tmp_path / "repo with space"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "rows.json").write_text("{}\n")
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(common, "REPO", repo)
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert common.commit_id() == head
    (repo / "benchmarks" / "results" / "rows.json").write_text('{"rows": 1}\n')
    (repo / "benchmarks" / "results" / "new.json").write_text("{}\n")  # untracked: never dirty
    assert common.commit_id() == head
    (repo / "code.py").write_text("x = 2\n")
    assert common.commit_id() == f"{head}-dirty"
