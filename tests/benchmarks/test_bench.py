"""python -m fastcifar.bench: runs, resumes, shards, refuses to mix recipes, and its summary, plots and
'wat' export agree with the run JSONs."""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WAT_KEYS = {"model_name", "framework_name", "dataset", "task", "total_training_time", "average_epoch_training_time",
            "average_batch_inference_time", "final_training_loss", "final_evaluation_accuracy", "final_test_accuracy"}


def bench(root: Path, small_data: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastcifar.bench", "--root", str(root), "--name", "t", "--seeds", "2",
         "--loaders", "memory,torch", *args, "--data-dir", str(small_data), "--device", "cpu", "--epochs", "2",
         "--max-steps-per-epoch", "2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def ran(result: subprocess.CompletedProcess) -> list[str]:
    return sorted(line.split(":")[0].strip() for line in result.stdout.splitlines()
                  if line.startswith("  ") and "seed" in line)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_data) -> Path:
    """Two shards of one 2-loader x 2-seed benchmark, run one after the other; the second as task 2 of
    a SLURM array --array=1-2 (--shard auto)."""
    root = tmp_path_factory.mktemp("bench")
    first = bench(root, small_data, "--shard", "0/2")
    slurm = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"}
    second = bench(root, small_data, "--shard", "auto", "--export", "wat", env=slurm)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    # positions 0..3 are (memory, 0), (memory, 1), (torch, 0), (torch, 1): each shard ran its own, once
    assert ran(first) == ["memory-seed0", "torch-seed0"] and ran(second) == ["memory-seed1", "torch-seed1"]
    return root / "t"


def test_summary_equals_the_statistics_of_the_run_jsons(finished):
    runs = {p.stem: json.loads(p.read_text()) for p in (finished / "runs").glob("*.json")}
    assert sorted(runs) == ["memory-seed0", "memory-seed1", "torch-seed0", "torch-seed1"]
    summary = json.loads((finished / "summary.json").read_text())["loaders"]
    for loader in ("memory", "torch"):
        mine = [r for r in runs.values() if r["config"]["loader"] == loader]
        for key in ("test_accuracy", "epoch_time_s", "total_training_time_s", "last_epoch_train_loss"):
            values = [r[key] for r in mine]
            stats = summary[loader]["metrics"][key]
            assert stats["n"] == 2 and stats["mean"] == pytest.approx(statistics.fmean(values))
            assert stats["sd"] == pytest.approx(statistics.stdev(values))
            assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
        losses = [[r["epochs"][e]["train_loss"] for r in mine] for e in range(2)]
        means = summary[loader]["per_epoch"]["train_loss"]["mean"]
        assert means == pytest.approx([statistics.fmean(v) for v in losses])
    report = (finished / "report.md").read_text()
    assert "loader `memory`: 2 runs" in report and "![loss_accuracy](loss_accuracy.png)" in report


def test_plots_are_pngs_of_the_stated_size(finished):
    for name in ("loss_accuracy", "epoch_time", "data_compute", "test_accuracy"):
        head = (finished / f"{name}.png").read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (800, 450)


def test_wat_export_is_read_by_the_benchmarks_notebook_as_it_reads_its_own(finished):
    """The notebook globs `output/*.json` and parses each file's first line only: every file must be one
    line of JSON, named apart from the benchmark's own `m2-<framework>-...` files and from each other."""
    paths = sorted((finished / "export" / "wat").glob("*.json"))
    assert [p.name for p in paths] == [f"m2-fastcifar-t-{loader}-seed{seed}.json"
                                       for loader in ("memory", "torch") for seed in (0, 1)]
    results: dict[str, list] = {}
    for path in paths:
        with open(path) as f:
            record = json.loads(f.readline())
            assert f.read() == ""  # nothing after the first line
        for k, v in record.items():
            results.setdefault(k, []).append(v)
        run = json.loads((finished / "runs" / f"{record_loader(path)}.json").read_text())
        assert set(record) == WAT_KEYS and record["model_name"] == "ResNetV2-20" and record["dataset"] == "CIFAR-10"
        assert record["final_test_accuracy"] == run["test_accuracy"]
        assert record["average_epoch_training_time"] == run["epoch_time_s"]
        assert record["total_training_time"] == run["total_training_time_s"]
        # the benchmark times inference as wall clock over a loader: ours measured the same way
        assert record["average_batch_inference_time"] == run["inference_time_per_batch_incl_data_ms"]
        assert "(fastcifar)" in record["framework_name"]
    assert {k: len(v) for k, v in results.items()} == {k: 4 for k in WAT_KEYS}  # the notebook's columns line up


def record_loader(path: Path) -> str:
    """m2-fastcifar-t-memory-seed0.json -> memory-seed0 (the run's own name)."""
    return path.stem.removeprefix("m2-fastcifar-t-")


def test_a_re_export_replaces_an_earlier_exports_files(finished):
    from fastcifar.reporting.bench_report import export_wat_files, load_runs

    stale = finished / "export" / "wat" / "memory-seed0.json"  # an earlier export's name
    stale.write_text("{}\n")
    written = export_wat_files(finished, load_runs(finished / "runs"))
    assert not stale.exists() and sorted(written) == sorted((finished / "export" / "wat").glob("*.json"))


def test_resume_runs_only_what_is_missing_and_other_recipes_are_refused(finished, small_data):
    root = finished.parent
    again = bench(root, small_data)
    assert again.returncode == 0 and ran(again) == [] and "0 to run" in again.stdout
    (finished / "runs" / "torch-seed1.json").unlink()
    resumed = bench(root, small_data)
    assert resumed.returncode == 0 and ran(resumed) == ["torch-seed1"]
    other = bench(root, small_data, "--lr", "0.01")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and "another recipe (differing: lr)" in lines[0]


def test_shard_auto_reads_a_slurm_array_and_refuses_without_one():
    from fastcifar.benchmarks.bench import shard_from_env
    from fastcifar.utils import UserError

    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) == "0/4"
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4",
                           "SLURM_ARRAY_TASK_MIN": "4"}) == "3/4"
    for env, message in [({}, "needs a SLURM job array"), ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"},
                                                           "must be integers"),
                         ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_STEP": "2"},
                          "consecutive")]:
        with pytest.raises(UserError, match=message):
            shard_from_env(env)
    result = subprocess.run([sys.executable, "-m", "fastcifar.bench", "--shard", "auto"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "fastcifar.bench: error: --shard auto needs a SLURM job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT "
        "not set): run it under sbatch --array, or pass --shard I/N"]
