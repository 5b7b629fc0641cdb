"""Packaging: pyproject.toml declares what the code imports, and the lock satisfies it."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OWN = {"asd", "pipelines"}


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _imported_modules() -> dict[str, str]:
    """Top-level third-party module -> first file importing it, over asd/ and pipelines/."""
    found: dict[str, str] = {}
    for package in sorted(OWN):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    declared = _declared()
    owners = md.packages_distributions()
    missing = {}
    for module, where in _imported_modules().items():
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"{module} (imported in {where}) is not installed: cannot tell its distribution"
        if not dists & set(declared):
            missing[module] = (where, sorted(dists))
    assert not missing, f"imports without a declared dependency in pyproject.toml: {missing}"


def test_the_lock_satisfies_the_declared_ranges():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    for name, req in _declared().items():
        if name in pins:
            assert req.specifier.contains(pins[name]), f"requirements.txt pins {name}=={pins[name]}, outside {req}"
        else:  # declared but installed as a dependency of a pinned package: the installed one must fit
            assert req.specifier.contains(md.version(name)), f"installed {name} {md.version(name)} outside {req}"
