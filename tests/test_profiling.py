"""Data/compute split, --profile traces, and torch-tb-profiler reading them through TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port
from torch.autograd.profiler import record_function

from fastcifar.augment import RandomCropFlip
from fastcifar.data import make_loader
from fastcifar.model import resnetv2_20
from fastcifar.profiling import DATA_RANGE, FORWARD_RANGE, StepTimer, rewrite_trace
from fastcifar.train import train_epoch

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


class SlowAugment(torch.nn.Module):
    """Test-only delay in the data path: the real augmentation, then a sleep per batch."""

    def __init__(self, seconds: float):
        super().__init__()
        self.inner, self.seconds = RandomCropFlip(0, CPU), seconds

    def forward(self, images):
        time.sleep(self.seconds)
        return self.inner(images)


def _epoch_stats(small_data: Path, augment=None) -> dict:
    torch.manual_seed(0)
    model = resnetv2_20().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_loader(small_data / "train.beton", CPU, batch_size=32, workers=2, train=True, augment=augment)
    train_epoch(model, loader, optimizer, CPU, StepTimer(CPU), max_steps=2)  # FFCV's first-epoch JIT: untimed
    return train_epoch(model, loader, optimizer, CPU, StepTimer(CPU), max_steps=6)


def test_data_plus_compute_adds_up_to_the_epoch(small_data):
    stats = _epoch_stats(small_data)
    measured = stats["data_time_s"] + stats["compute_time_s"]
    # everything outside the two phases (progress bar, loss sums) is bookkeeping: under 5 %
    assert 0.95 * stats["seconds"] <= measured <= stats["seconds"]
    assert stats["data_fraction"] == pytest.approx(stats["data_time_s"] / measured)


def test_slow_loader_raises_the_data_fraction(small_data):
    """A data path slower than the step must show as data time. The delay is sized from this
    machine's own step time (4 steps + 0.1 s per batch), not fixed: FFCV prefetches, so a fixed
    delay that a step outlasts (a loaded machine) hides entirely behind compute. With a delay d > c,
    the step time, each step waits about d - c, so the fraction stays above 0.5 even if steps
    get twice as slow between the two epochs."""
    normal = _epoch_stats(small_data)
    step_s = normal["compute_time_s"] / normal["train_images"] * 32  # batches of 32
    slow = _epoch_stats(small_data, augment=SlowAugment(4 * step_s + 0.1))
    assert slow["data_fraction"] > 0.5, (slow, step_s)
    assert normal["data_fraction"] < slow["data_fraction"]
    assert normal["data_fraction"] < 0.5


def test_rewrite_keeps_every_event_and_relabels_annotations(tmp_path):
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(str(tmp_path))) as p:
        for _ in range(2):
            with record_function(DATA_RANGE):
                x = torch.randn(64, 64)
            with record_function(FORWARD_RANGE):
                x @ x
            p.step()
    (path,) = tmp_path.glob("*.pt.trace.json")
    original = json.loads(path.read_text())["traceEvents"]
    n_events, changed = rewrite_trace(path)
    rewritten = json.loads(path.read_text())["traceEvents"]  # still valid JSON
    assert n_events == len(original) == len(rewritten) and changed > 0
    for old, new in zip(original, rewritten, strict=True):
        if old.get("cat") == "user_annotation" and not old["name"].startswith("ProfilerStep#"):
            assert new["cat"] == "cpu_op" and {**new, "cat": old["cat"]} == old
        else:
            assert new == old
    names = {e["name"]: e.get("cat") for e in rewritten}
    assert names[DATA_RANGE] == "cpu_op" and names[FORWARD_RANGE] == "cpu_op"


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def profiled_run(small_data, tmp_path_factory):
    out, profiles = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("profiles")
    result = subprocess.run(
        [sys.executable, "-m", "fastcifar.train", "--data-dir", str(small_data), "--epochs", "2", "--device", "cpu",
         "--max-steps-per-epoch", "6", "--profile", "--profile-steps", "1,1,3", "--profile-dir", str(profiles),
         "--out", str(out), "--run-name", "prof"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "where the 3 profiled steps went" in result.stdout and "breakdown.png" in result.stdout
    return json.loads((out / "prof.json").read_text()), profiles


def test_profile_run_writes_trace_scalars_and_split(profiled_run):
    metrics, profiles = profiled_run
    run_dir = profiles / "prof"
    (trace,) = run_dir.glob("*.pt.trace.json")
    assert metrics["profile"]["traces"] == [str(trace)] and metrics["profile"]["epoch"] == 2
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = json.loads(trace.read_text())["traceEvents"]
    cats = {e["name"]: e.get("cat") for e in events if "name" in e}
    assert cats[DATA_RANGE] == "cpu_op" and cats[FORWARD_RANGE] == "cpu_op"
    assert sum(1 for name in cats if name.startswith("ProfilerStep#")) >= 1
    # where the steps went: read from that trace, written beside it and into the run's JSON
    breakdown = json.loads((run_dir / "breakdown.json").read_text())
    assert breakdown == metrics["profile"]["breakdown"] and breakdown["trace"] == trace.name
    assert breakdown["steps"] == 3 and breakdown["categories_ms"]["convolution backward"] > 0
    assert (run_dir / "breakdown.png").read_bytes()[:4] == b"\x89PNG"
    # run totals are the sums of the epochs
    for key in ("data_time_s", "compute_time_s"):
        assert metrics[key] == pytest.approx(sum(e[key] for e in metrics["epochs"]))
    assert metrics["data_fraction"] == pytest.approx(
        metrics["data_time_s"] / (metrics["data_time_s"] + metrics["compute_time_s"]))


def test_tensorboard_profiler_plugin_shows_dataloader_time(profiled_run):
    _, profiles = profiled_run
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(profiles), "--host", "127.0.0.1",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"
    try:
        deadline, runs = time.time() + 120, {}
        while time.time() < deadline:
            try:
                runs = _get(f"{base}/runs")
                if "prof" in runs["runs"] and not runs["loading"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert "prof" in runs.get("runs", []), runs
        assert "Overview" in _get(f"{base}/views?run=prof")
        workers = _get(f"{base}/workers?run=prof&view=Overview")
        assert workers == ["fastcifar"]
        spans = _get(f"{base}/spans?run=prof&worker=fastcifar")
        overview = _get(f"{base}/overview?run=prof&worker=fastcifar&span={spans[0]}")
        parts = {c["name"]: c["value"] for c in overview["performance"][0]["children"]}
        assert parts["DataLoader"] > 0, parts
        assert parts["CPU Exec"] > 0, parts
        assert any(c["name"] == "DataLoader" for c in overview["steps"]["columns"])
    finally:
        server.terminate()
        server.wait(timeout=30)
