"""`.ci/install`: what it installs on a fresh Debian or Ubuntu machine (its --dry-run, which changes nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = "python%d.%d" % sys.version_info[:2]


def missing(path: str) -> list[str]:
    proc = subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "install"), "--dry-run"],
                          env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def bare_path(tmp_path: Path) -> str:
    """A PATH with only the tools the script itself runs: a machine with none of the packages."""
    bin_dir = tmp_path / "bare"
    bin_dir.mkdir()
    for tool in ("ls", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


def test_a_machine_without_python_gets_python_its_venv_module_and_its_headers(tmp_path):
    assert {"python3", "python3-venv", "python3-dev"} <= set(missing(bare_path(tmp_path)))


def test_a_machine_without_git_gets_git(tmp_path):
    assert "git" in missing(bare_path(tmp_path))


def test_a_python_without_ensurepip_gets_its_venv_package(tmp_path):
    """Debian's python3 lacks ensurepip until pythonX.Y-venv is installed, and `python3 -m venv` fails."""
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ensurepip is in the venv package')\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "shadow"} exec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    listed = missing(f"{bin_dir}:{os.environ['PATH']}")
    assert f"{PYTHON}-venv" in listed and f"{PYTHON}-dev" not in listed


def test_the_python_running_the_tests_needs_nothing_more():
    listed = missing(f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert not [name for name in listed if name.startswith("python")]
