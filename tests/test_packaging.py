"""The sdist and the wheel, built as a fresh clone builds them: every runtime file of flux/, nothing else;
and the dependencies, which name every distribution that flux/ and tests/ import.

The build runs setuptools' PEP 517 backend in this environment (the test extra brings a recent
enough setuptools), on a copy of the repository's tracked files, so it needs no network and
writes nothing into the checkout.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bytecode a developer's tree holds after running things; never part of a distribution.
STRAYS = ("flux/scaffold/stubs/__pycache__/payments.cpython-311.pyc", "flux/runtime/__pycache__/isolate.cpython-311.pyc")

BUILD = """
import json, sys, warnings
import setuptools.build_meta as backend
out = sys.argv[1]  # read first: the backend rewrites sys.argv
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sdist = backend.build_sdist(out)
    wheel = backend.build_wheel(out)
print(json.dumps({"sdist": sdist, "wheel": wheel,
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


@dataclass(frozen=True)
class Built:
    sdist: set[str]  # paths inside the sdist, without its top directory
    wheel: set[str]
    warnings: list[str]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [path for path in out.decode().split("\0") if path and (REPO / path).is_file()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    assert int(version("setuptools").split(".")[0]) >= 77, "the build needs the test extra's setuptools: pip install -e '.[test]'"
    source = tmp_path_factory.mktemp("source")
    for rel in tracked_files():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes((REPO / rel).read_bytes())
    for rel in STRAYS:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(b"bytecode")
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-c", BUILD, str(dist)], cwd=source, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with tarfile.open(dist / result["sdist"]) as tar:
        sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name and tar.getmember(name).isfile()}
    with zipfile.ZipFile(dist / result["wheel"]) as whl:
        wheel = {name for name in whl.namelist() if not name.endswith("/")}
    return Built(sdist=sdist, wheel=wheel, warnings=result["warnings"])


def package_files() -> set[str]:
    return {rel for rel in tracked_files() if rel.startswith("flux/")}


def test_wheel_holds_every_file_of_the_package_and_nothing_else(built):
    shipped = {name for name in built.wheel if ".dist-info/" not in name}
    assert shipped == package_files()


def test_wheel_ships_the_runtime_js_the_scaffold_and_py_typed(built):
    assert {"flux/py.typed", "flux/runtime/prelude.js", "flux/scaffold/gitignore", "flux/scaffold/stubs/payments.py"} <= built.wheel


def test_wheel_carries_the_license_its_metadata_names(built):
    """pyproject declares Apache-2.0; the wheel's metadata carries its text (PEP 639 license files)."""
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in built.wheel)


def test_sdist_holds_the_package_and_what_builds_it_but_no_tests_or_benchmarks(built):
    metadata = {"PKG-INFO", "setup.cfg"} | {name for name in built.sdist if name.startswith("flux.egg-info/")}
    assert built.sdist - metadata == package_files() | {"README.md", "LICENSE", "pyproject.toml", "MANIFEST.in"}


def test_build_raises_no_setuptools_deprecation(built):
    """`license = {text = ...}` was deprecated, with builds refused from 2027-02-18."""
    assert [w for w in built.warnings if w.startswith("SetuptoolsDeprecationWarning")] == []


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(*extras: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def undeclared_imports(directory: str, allowed: set[str]) -> list[str]:
    """Top-level modules imported under `directory` that no allowed distribution provides."""
    modules: set[str] = set()
    for path in (REPO / directory).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"__future__", "flux", "tests"}
    providers = packages_distributions()
    return sorted(m for m in modules if not {_canonical(d) for d in providers.get(m, [m])} & allowed)


def test_every_distribution_flux_imports_is_a_dependency():
    """Not one that only comes along with another (rich with typer, werkzeug with Quart)."""
    assert undeclared_imports("flux", declared()) == []


def test_every_distribution_the_tests_import_is_a_dependency_or_in_the_test_extra():
    assert undeclared_imports("tests", declared("test")) == []
