"""`make results` (fastcifar.measure): machine names, the dirty-tree refusal, and resuming without
redoing what this commit already measured."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.benchmarks import measure
from fastcifar.env import git_commit
from fastcifar.reporting.machines import machine_name
from fastcifar.utils import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("machine, gpu, expected", [
    ({"cpu_model": "AMD EPYC", "cpu_flags": {"avx2": True, "avx512f": False}, "usable_cpus": 2}, None,
     "amd-epyc-avx2-2c"),
    ({"cpu_model": "AMD EPYC", "cpu_flags": {"avx2": True, "avx512f": True}, "usable_cpus": 2}, None,
     "amd-epyc-avx512-2c"),
    ({"cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu_flags": {"avx512f": True, "amx_tile": True},
      "usable_cpus": 2}, None, "intel-xeon-platinum-8481c-amx-2c"),
    ({"cpu_model": "AMD EPYC 9654 96-Core Processor", "cpu_flags": {"avx512f": True}, "usable_cpus": 16},
     {"name": "NVIDIA H200"}, "nvidia-h200-16c"),
])
def test_machine_names_are_short_stable_and_tell_the_instruction_sets_apart(machine, gpu, expected):
    assert machine_name({"machine": machine, "gpu": gpu}) == expected


def test_a_dirty_tree_is_refused(monkeypatch, small_data, tmp_path):
    monkeypatch.setattr("fastcifar.env.git_commit", lambda: "0123abc+dirty")
    with pytest.raises(UserError, match="uncommitted changes"):
        measure.main(["--data-dir", str(small_data), "--out", str(tmp_path), "--stages", "probe"])
    assert not any(tmp_path.iterdir())  # nothing written before the refusal


def test_spec_runs_of_another_commit_are_removed_and_this_commits_kept(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for name, commit in [("ffcv-seed0", "old"), ("ffcv-seed1", "new")]:
        (runs / f"{name}.json").write_text(json.dumps({"env": {"git_commit": commit}}))
        (runs / f"{name}.log").write_text("log")
    removed = measure.stale_runs(runs, "new")
    assert sorted(p.name for p in removed) == ["ffcv-seed0.json", "ffcv-seed0.log"]
    assert sorted(p.name for p in runs.iterdir()) == ["ffcv-seed1.json", "ffcv-seed1.log"]


@pytest.mark.skipif(git_commit() is None, reason="needs a git checkout (the commit is what makes a stage done)")
def test_a_stage_done_at_this_commit_is_kept_and_one_of_another_commit_measured_again(small_data, tmp_path):
    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastcifar.measure", "--data-dir", str(small_data), "--out",
                               str(tmp_path), "--machine", "here", "--stages", "probe", "--device", "cpu",
                               "--allow-dirty"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    probe = json.loads((tmp_path / "here" / "probe.json").read_text())
    assert probe["attainable_fp32"]["gflops"] > 0 and probe["flops_per_image"] > 0
    assert probe["env"]["git_commit"] == git_commit() and "[1/1 probe] ok" in first.stdout
    stages = json.loads((tmp_path / "here" / "measure.json").read_text())
    assert stages["commit"] == git_commit() and stages["stages"]["probe"]["rc"] == 0

    second = run()  # resumed: nothing redone
    assert second.returncode == 0 and "done at this commit" in second.stdout
    assert json.loads((tmp_path / "here" / "probe.json").read_text()) == probe

    probe["env"]["git_commit"] = "another"
    (tmp_path / "here" / "probe.json").write_text(json.dumps(probe))
    third = run()  # measured at another commit: measured again
    assert third.returncode == 0 and "[1/1 probe] ok" in third.stdout
    assert json.loads((tmp_path / "here" / "probe.json").read_text())["env"]["git_commit"] == git_commit()


def test_the_spec_stage_is_done_only_with_every_asked_seed_at_this_commit(tmp_path):
    import argparse

    runs = tmp_path / "spec" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "spec" / "summary.json").write_text("{}")
    for seed, commit in [(0, "this"), (1, "this"), (2, "other")]:
        (runs / f"ffcv-seed{seed}.json").write_text(json.dumps({"env": {"git_commit": commit}}))

    def done(seeds: int) -> bool:
        return measure.Measurement(argparse.Namespace(seeds=seeds, budget_s=0), tmp_path, "this", tmp_path).done("spec")

    assert not done(3)  # seed 2 is another commit's: measured again
    (runs / "ffcv-seed2.json").write_text(json.dumps({"env": {"git_commit": "this"}}))
    assert done(3) and not done(5)  # more seeds asked: the stage runs the missing ones


@pytest.mark.parametrize("flags, message", [
    (["--stages", ""], "unknown stage(s) (empty)"), (["--stages", "probe,"], "unknown stage(s) (empty)"),
    (["--budget-s", "nan"], "--budget-s must be"), (["--budget-s", "inf"], "--budget-s must be"),
    (["--machine", "../escape"], "--machine must be a plain file name"),
])
def test_bad_flags_are_refused_before_anything_is_written(small_data, tmp_path, flags, message):
    with pytest.raises(UserError) as err:
        measure.main(["--data-dir", str(small_data), "--out", str(tmp_path / "out"), *flags])
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_results_file_is_named_not_a_traceback(tmp_path):
    (tmp_path / "cold-start.json").write_text('{"epoch_time_s": 8')  # truncated
    m = measure.Measurement(argparse.Namespace(seeds=3, budget_s=0), tmp_path, "this", tmp_path)
    with pytest.raises(UserError, match=r"cold-start.json: not valid JSON"):
        m.estimate("spec")
    (tmp_path / "cold-start.json").write_text('{"epoch_time_s": "fast"}')
    with pytest.raises(UserError, match=r"cold-start.json: field 'epoch_time_s' must be a number"):
        m.estimate("spec")
    runs = tmp_path / "spec" / "runs"
    runs.mkdir(parents=True)
    (runs / "ffcv-seed0.json").write_bytes(b"\xff")
    with pytest.raises(UserError, match="ffcv-seed0.json: not UTF-8"):
        measure.stale_runs(runs, "this")


def test_a_re_measured_column_does_not_make_the_code_dirty(tmp_path):
    """make results rewrites tracked files under docs/results/: the code it measures stays clean; any other
    tracked change is dirty."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "docs" / "results" / "m").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "m" / "probe.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    (tmp_path / "docs" / "results" / "m" / "probe.json").write_text('{"new": 1}')
    assert not git_commit(tmp_path).endswith("+dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path).endswith("+dirty")
