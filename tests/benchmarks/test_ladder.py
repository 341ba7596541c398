"""The ladder on tiny data: each rung a trainer process with its own settings, the rounds in a seeded random
order (recorded), each rung's timed epoch the last one whole, the gains with intervals between processes; and
the ratio's statistics on fixtures."""

from __future__ import annotations

import json
import random

import pytest

from fastcifar.benchmarks import ladder
from fastcifar.reporting.stats import ratio95
from fastcifar.utils import run_cli


def test_two_rungs_in_two_rounds(small_data, tmp_path, capsys):
    out = tmp_path / "ladder"
    assert ladder.main(["--out", str(out), "--data-dir", str(small_data), "--device", "cpu", "--rungs",
                        "plain,channels-last", "--processes", "2", "--max-steps-per-epoch", "2", "--seed", "7",
                        "--warm-up-steps", "2"]) == 0
    result = json.loads((out / "ladder.json").read_text())
    rng = random.Random(7)
    assert result["order"] == [rng.sample(["plain", "channels-last"], 2) for _ in range(2)]  # drawn, recorded
    plain, last = result["rungs"]
    assert [p["round"] for p in plain["processes"]] == [1, 2] and plain["epoch_s"]["n"] == 2
    run = json.loads((out / plain["processes"][0]["file"]).read_text())
    assert run["config"]["memory_format"] == "contiguous" and run["config"]["workers"] == 0
    assert run["config"]["loader"] == "torch" and run["config"]["compile"] is False
    assert run["env"]["optimizer"]["implementation"] == "torch-default"  # torch's own AdamW
    assert run["env"]["environment_variables"]["THP_MEM_ALLOC_ENABLE"] == "0"
    assert run["config"]["warm_up_steps"] == 2 and len(run["epochs"]) == 1  # untimed steps, then one epoch
    assert plain["processes"][0]["epoch_s"] == run["epochs"][0]["seconds"]
    cl = json.loads((out / last["processes"][1]["file"]).read_text())
    assert cl["config"]["memory_format"] == "channels-last" and cl["config"]["workers"] >= 1
    assert last["gain"]["ci95"] is not None and result["speedup"] == last["gain"]
    assert (out / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert "plain -> fastcifar" in capsys.readouterr().out


def test_an_unknown_rung_is_one_error(small_data, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda _: ladder.main(["--out", str(tmp_path), "--data-dir", str(small_data), "--rungs", "fast"]),
                "fastcifar.ladder")
    assert exit_.value.code == 2


@pytest.mark.parametrize("before, after, resolved", [
    ([10.0, 10.2, 9.8], [5.0, 5.1, 4.9], True),  # twice as fast, processes close together
    ([10.0, 12.0, 8.0], [9.0, 11.5, 8.5], False),  # within the spread: not resolved
])
def test_the_ratio_and_its_interval_between_processes(before, after, resolved):
    r = ratio95(before, after)
    assert r["ci95"][0] < r["ratio"] < r["ci95"][1] and r["resolved"] is resolved
    assert ratio95([10.0], [5.0])["ci95"] is None  # one process each: no interval, never resolved
