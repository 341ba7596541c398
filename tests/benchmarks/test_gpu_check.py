"""fastcifar.gpu_check's contract on the CPU: the budget skips what does not fit (and says so), a
command killed mid-stage leaves the report of every stage that ran, and without --data it makes a
full-size synthetic CIFAR. CI's `make gpu-check SMOKE=1` runs every stage end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastcifar.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def gpu_check_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastcifar.gpu_check", "--smoke", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs)


def test_stages_that_do_not_fit_the_budget_are_skipped_and_named(tmp_path):
    proc = gpu_check_cli("--out", str(tmp_path), "--budget-s", "1")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]  # skipped is not failed
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert list(stages) == ["data", *gpu_check.STAGES]  # in the order of value: the spec run first
    assert stages["data"]["rc"] == 0  # the data every stage needs runs whatever the budget
    for name in gpu_check.STAGES:
        assert stages[name]["rc"] == "skipped" and stages[name]["last_line"].startswith("budget:"), stages[name]
    summary = (tmp_path / "summary.md").read_text()
    assert "| spec | skipped |" in summary and "| timer-overhead | skipped | 0.0 | budget:" in summary
    assert f"1/{len(stages)} stages ok, {len(gpu_check.STAGES)} skipped" in output


def test_a_check_killed_mid_stage_has_reported_every_stage_that_ran(tmp_path):
    """Killed (as a rented GPU's time limit would) once the second chosen stage has started: stages.json and
    summary.md already hold the data stage and the first chosen one."""
    proc = gpu_check_cli("--out", str(tmp_path), "--stages", "timer-overhead,cuda-tests")
    try:
        deadline = time.time() + 300
        while not (tmp_path / "logs" / "timer-overhead.log").exists() and proc.poll() is None:
            assert time.time() < deadline, "the second stage never started"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its running stage
        proc.communicate(timeout=60)
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert list(stages) == ["data", "cuda-tests"]  # cuda-tests before timer-overhead: the order of value
    summary = (tmp_path / "summary.md").read_text()
    assert "| data | ok |" in summary and "| cuda-tests |" in summary and "timer-overhead" not in summary


def test_without_data_it_makes_a_full_size_synthetic_cifar(tmp_path):
    check = gpu_check.Check(tmp_path, None, smoke=False, device="cpu", synthetic=True)
    (tmp_path / "logs").mkdir()
    data_dir = gpu_check.prepare_data(None, check)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 45_000, "val": 5_000, "test": 10_000}
    assert manifest["splits"]["val"]["per_class"] == [500] * 10
    assert check.stages["data"]["rc"] == 0
    assert "accuracies are chance" in (tmp_path / "summary.md").read_text()


def test_unknown_stage_is_one_line():
    result = subprocess.run([sys.executable, "-m", "fastcifar.gpu_check", "--smoke", "--stages", "spec,warp"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"gpu_check: error: --stages: unknown stage(s) warp; choose from {', '.join(gpu_check.STAGES)}"]
