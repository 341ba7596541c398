"""fastcifar.bench_loader (tools/bench_loader.py in a checkout): the isolated and the end-to-end tables,
from `make_loaders` alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.reporting import records

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench_loader.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_isolated_and_end_to_end(small_data, tmp_path):
    out = tmp_path / "bench.json"
    result = bench("--data-dir", str(small_data), "--device", "cpu", "--epochs", "1", "--batch-size", "64",
                   "--no-compile", "--loaders", "ffcv,torch,memory", "--compute-steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    compute = data["compute_only"]
    assert compute["steps"] == 2 and compute["images_per_s"] > 0
    for name in ("ffcv", "torch", "memory"):
        assert data[name]["images_per_s"] > 0 and data[name]["images_per_epoch"] == 450
        assert name in result.stdout
        # headroom: what the pipeline delivers over what the model consumes, on the same device
        assert data[name]["headroom"] == pytest.approx(data[name]["images_per_s"] / compute["images_per_s"])
    assert "headroom" in result.stdout
    assert data["torch"]["ratio_to_torch"] == 1.0 and data["mode"] == "isolated" and "vs torch" in result.stdout
    # the compute-only floor's utilisation of the probe's fp32 rate, and the FLOPs behind it
    probe = data["env"]["attainable_fp32"]
    assert data["flops_per_image"] == data["flops"]["train_step_flops"] / 64
    assert compute["gflops"] == pytest.approx(compute["images_per_s"] * data["flops_per_image"] / 1e9)
    assert 0 < compute["utilisation"] <= 1
    assert compute["utilisation"] == pytest.approx(compute["gflops"] / probe["gflops"])
    assert "compute-only" in result.stdout and "util." in result.stdout

    out = tmp_path / "e2e.json"
    result = bench("--data-dir", str(small_data), "--device", "cpu", "--end-to-end", "--max-steps", "2",
                   "--repeats", "3", "--no-compile", "--loaders", "memory,ffcv-inline", "--out", str(out),
                   "--order-seed", "5", "--warm-up-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    from fastcifar.benchmarks.bench_loader import drawn_order

    # the order drawn from --order-seed, recorded with what a reader needs to tell slices from whole epochs
    assert data["order"] == drawn_order(["memory", "ffcv-inline", "synthetic"], 3, 5) and data["order_seed"] == 5
    assert data["max_steps"] == 2 and data["warm_up_steps"] == 1
    assert not records.read_record(out, records.EndToEndFile).whole_epochs()
    assert set(data) >= {"memory", "ffcv-inline", "synthetic"} and data["mode"] == "end_to_end"  # the floor always
    assert data["ffcv-inline"]["epochs_timed"] == 3 and "ffcv-inline" in result.stdout  # a forced variant of ffcv
    assert data["synthetic"]["overhead_vs_synthetic"] == 0.0 and data["memory"]["ratio_to_memory"] == 1.0
    assert data["memory"]["train_images"] == 256  # 2 steps of 128
    assert 0 < data["memory"]["utilisation"] <= 1 and 0 < data["synthetic"]["utilisation"] <= 1
    seconds = data["memory"]["epoch_seconds"]  # 3 rounds; the median epoch is reported
    assert data["memory"]["epochs_timed"] == 3 and data["memory"]["seconds"] == sorted(seconds)[1]
    # The overhead is paired by round: the mean of each round's ratio, with its interval around it.
    per_round = [m / s - 1 for m, s in zip(seconds, data["synthetic"]["epoch_seconds"], strict=True)]
    assert data["memory"]["overhead_vs_synthetic_per_round"] == pytest.approx(per_round)
    assert data["memory"]["overhead_vs_synthetic"] == pytest.approx(sum(per_round) / 3)
    low, high = data["memory"]["overhead_vs_synthetic_ci95"]
    assert low < data["memory"]["overhead_vs_synthetic"] < high and "95 % CI" in result.stdout
    cpu = data["memory"]["epoch_cpu_s"]  # the process's CPU seconds per epoch, paired the same way
    assert len(cpu) == 3 and all(c > 0 for c in cpu) and data["memory"]["cpu_s"] == sorted(cpu)[1]
    assert data["memory"]["cpu_overhead_vs_synthetic"] == pytest.approx(
        sum(c / s for c, s in zip(cpu, data["synthetic"]["epoch_cpu_s"], strict=True)) / 3 - 1)


def test_rounds_are_drawn_and_pair():
    """Each round's order is drawn from the seed (the same seed, the same order; another process's seed, another
    order), every pipeline once a round, no fixed successor; ratios are taken within a round."""
    from fastcifar.benchmarks.bench_loader import drawn_order, paired

    names = ["ffcv", "memory", "synthetic", "torch"]
    orders = drawn_order(names, 20, seed=1)
    assert all(sorted(o) == sorted(names) for o in orders) and orders == drawn_order(names, 20, seed=1)
    assert drawn_order(names, 20, seed=2) != orders
    after_memory = {o[o.index("memory") + 1] for o in orders if o[-1] != "memory"}
    assert len(after_memory) > 1  # a rotation would always put the same pipeline after memory
    # A machine twice as fast in round 2 cancels out of the ratio taken within each round.
    out = paired([11.0, 5.5, 11.0], [10.0, 5.0, 10.0], "x", -1)
    assert out["x"] == pytest.approx(0.1) and out["x_per_round"] == pytest.approx([0.1] * 3)
    assert out["x_ci95"] == pytest.approx([0.1, 0.1]) and paired([2.0], [1.0], "y")["y_ci95"] is None


@pytest.mark.parametrize("flags, message", [
    (["--end-to-end", "--max-steps", "0"], "--max-steps"),
    (["--out", "/dev/null/bench.json"], "cannot write to the output folder /dev/null"),
])
def test_bad_flags_and_outputs_are_refused_before_the_work(small_data, flags, message):
    result = bench("--data-dir", str(small_data), "--device", "cpu", "--no-compile", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_missing_output_folder_is_made(small_data, tmp_path):
    out = tmp_path / "new" / "folder" / "bench.json"
    result = bench("--data-dir", str(small_data), "--device", "cpu", "--epochs", "1", "--no-compile",
                   "--loaders", "memory", "--compute-steps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["memory"]["images_per_s"] > 0
