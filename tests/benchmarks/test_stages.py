"""The stage runner's failure behaviour, once, through both commands that use it (`make results`,
`make gpu-check`): the parent interrupted while a stage runs leaves no child running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastcifar.benchmarks.stages import check_budget, parse_stages
from fastcifar.utils import UserError

HANG = Path(__file__).resolve().parents[1] / "helpers" / "hang"


def commands(small_data: Path, out: Path) -> dict[str, list[str]]:
    return {"measure": [sys.executable, "-m", "fastcifar.measure", "--data-dir", str(small_data), "--out", str(out),
                        "--allow-dirty", "--device", "cpu"],
            "gpu_check": [sys.executable, "-m", "fastcifar.gpu_check", "--smoke", "--out", str(out)]}


@pytest.mark.parametrize("command", ["measure", "gpu_check"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_command_leaves_no_stage_running(small_data, tmp_path, command, sig):
    flag = tmp_path / "child"
    env = {**os.environ, "FASTCIFAR_TEST_HANG": str(flag),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HANG), os.environ.get("PYTHONPATH")]))}
    # SIGINT's default action restored: a shell's background job starts with it ignored, and so would the parent
    parent = subprocess.Popen(commands(small_data, tmp_path / "out")[command], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (announced := list(tmp_path.glob("child.[0-9]*"))):
            assert parent.poll() is None, parent.stdout.read()
            assert time.monotonic() < deadline, "no stage started within 120 s"
            time.sleep(0.05)
        child = int(announced[0].name.split(".")[1])
        assert Path(f"/proc/{child}").exists()  # the stage runs now (it sleeps until it is ended)
        parent.send_signal(sig)
        output, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 130, output
    assert "interrupted" in output
    assert not Path(f"/proc/{child}").exists(), f"stage {child} outlived {command}"


@pytest.mark.parametrize("text", ["", ",", "spec,", "warp"])
def test_stage_lists_name_known_stages(text):
    with pytest.raises(UserError, match="--stages: unknown stage"):
        parse_stages(text, ["spec", "probe"])
    assert parse_stages("probe, spec", ["spec", "probe"]) == ["spec", "probe"]  # the runner's order


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0])
def test_a_budget_is_finite_seconds(budget):
    with pytest.raises(UserError, match="--budget-s"):
        check_budget(budget)
