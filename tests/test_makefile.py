"""Which Python the make targets run (`make -n`: printed, not run): the checkout's .venv/ by default, an
active virtual or conda environment as it is, PYTHON=... as given; `make gpu-check` sets nothing up."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def dry_run(folder: Path, target: str, **env: str) -> str:
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    outer = ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")  # as `make test` sets them
    clean = {k: v for k, v in os.environ.items() if k not in outer}
    done = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=folder, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_default_is_a_venv_in_the_checkout(tmp_path):
    out = dry_run(tmp_path, "run")
    assert "python3 -m venv .venv" in out
    assert ".venv/bin/python -m fastcifar.train --compile" in out
    assert "--break-system-packages" not in out and "PIP_BREAK_SYSTEM_PACKAGES" not in out


@pytest.mark.parametrize("var", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_an_active_environment_is_used_as_it_is(tmp_path, var):
    out = dry_run(tmp_path, "test", **{var: "/opt/env"})
    assert "/opt/env/bin/python -m pytest" in out
    assert ".venv" not in out


def test_an_explicit_python_is_used_as_it_is(tmp_path):
    out = dry_run(tmp_path, "docs", PYTHON="/usr/local/bin/mypython")
    assert "/usr/local/bin/mypython -m fastcifar.render" in out and ".venv" not in out


def test_gpu_check_sets_nothing_up(tmp_path):
    out = " ".join(dry_run(tmp_path, "gpu-check").replace("\\\n", " ").split())
    assert out == "python3 tools/gpu_check.py --out results/gpu-check"  # no venv, no pip: the GPU machine's torch
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    assert dry_run(tmp_path, "gpu-check").startswith(".venv/bin/python tools/gpu_check.py")
