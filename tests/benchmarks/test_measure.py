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
    ({"cpu_model": "AMD EPYC", "cpu_family": "26", "cpu_model_number": "2",
      "cpu_flags": {"avx2": True, "avx512f": True}, "usable_cpus": 2}, None, "amd-epyc-f26m2-avx512-2c"),
    ({"cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu_flags": {"avx512f": True, "amx_tile": True},
      "usable_cpus": 2}, None, "intel-xeon-platinum-8481c-amx-2c"),
    ({"cpu_model": "AMD EPYC 9654 96-Core Processor", "cpu_flags": {"avx512f": True}, "usable_cpus": 16},
     {"name": "NVIDIA H200"}, "nvidia-h200-16c"),
])
def test_machine_names_are_short_stable_and_tell_the_instruction_sets_apart(machine, gpu, expected):
    assert machine_name({"machine": machine, "gpu": gpu}) == expected


def test_two_cpus_that_differ_only_in_family_and_model_get_two_folders():
    """A Zen 4 and a Zen 5 both call themselves "AMD EPYC", with the same flags and cores: 2x apart in speed."""
    zen = {"cpu_model": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_flags": {"avx2": True, "avx512f": True},
           "usable_cpus": 2}
    zen4 = machine_name({"machine": {**zen, "cpu_family": "25", "cpu_model_number": "17"}})
    zen5 = machine_name({"machine": {**zen, "cpu_family": "26", "cpu_model_number": "2"}})
    assert zen4 == "amd-epyc-f25m17-avx512-2c" and zen5 == "amd-epyc-f26m2-avx512-2c"


def test_measure_refuses_another_machines_column(monkeypatch, small_data, tmp_path):
    monkeypatch.setattr("fastcifar.env.git_commit", lambda: None)
    with pytest.raises(UserError, match="this machine's column is"):
        measure.main(["--data-dir", str(small_data), "--out", str(tmp_path), "--stages", "probe",
                      "--machine", "amd-epyc-avx2-2c"])
    assert not (tmp_path / "amd-epyc-avx2-2c").exists()


def test_a_dirty_tree_is_refused(monkeypatch, small_data, tmp_path):
    monkeypatch.setattr("fastcifar.env.git_commit", lambda: "0123abc+dirty")
    with pytest.raises(UserError, match="uncommitted changes"):
        measure.main(["--data-dir", str(small_data), "--out", str(tmp_path), "--stages", "probe"])
    assert not any(tmp_path.iterdir())  # nothing written before the refusal


COLUMN = ROOT / "docs" / "results" / "amd-epyc-f26m2-avx512-2c"


def committed(path: str, commit: str) -> dict:
    """A committed results file of the column, as if measured at `commit`."""
    data = json.loads((COLUMN / path).read_text())
    data["env"]["git_commit"] = commit
    return data


def measurement(folder: Path, commit: str | None, seeds: int = 3) -> measure.Measurement:
    return measure.Measurement(argparse.Namespace(seeds=seeds, budget_s=0), folder, commit, folder)


def test_spec_runs_of_another_commit_or_that_fail_the_checks_are_removed(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, commit in [(0, "old"), (1, "new"), (2, "new")]:
        (runs / f"ffcv-seed{seed}.json").write_text(json.dumps(committed(f"spec/runs/ffcv-seed{seed}.json", commit)))
        (runs / f"ffcv-seed{seed}.log").write_text("log")
    (runs / "ffcv-seed2.json").write_text(json.dumps({"env": {"git_commit": "new"}}))  # the commit, nothing else
    removed = measure.stale_runs(runs, lambda env: env.git_commit == "new")
    assert sorted(p.name for p in removed) == ["ffcv-seed0.json", "ffcv-seed0.log", "ffcv-seed2.json",
                                               "ffcv-seed2.log"]
    assert sorted(p.name for p in runs.iterdir()) == ["ffcv-seed1.json", "ffcv-seed1.log"]


def test_a_stage_counts_as_done_only_when_its_file_passes_the_renderers_checks(tmp_path, capsys):
    folder = tmp_path / "amd-epyc-f26m2-avx512-2c"
    folder.mkdir()
    (folder / "probe.json").write_text(json.dumps({"env": {"git_commit": "this"}}))  # only the commit
    assert measurement(folder, "this").done("probe") is None
    assert "measuring probe again" in capsys.readouterr().out
    (folder / "probe.json").write_text(json.dumps(committed("probe.json", "this")))
    assert measurement(folder, "this").done("probe")
    assert measurement(folder, "another").done("probe") is None  # another commit: measured again
    other = tmp_path / "amd-epyc-f25m17-avx512-2c"  # the same file in another machine's folder
    other.mkdir()
    (other / "probe.json").write_text(json.dumps(committed("probe.json", "this")))
    assert measurement(other, "this").done("probe") is None


def test_outside_git_a_stage_is_identified_by_the_version_and_the_run_id(tmp_path):
    folder = tmp_path / "amd-epyc-f26m2-avx512-2c"
    folder.mkdir()
    first = measurement(folder, None)
    first.report({})
    probe = committed("probe.json", None)
    probe["env"] |= {"run_id": first.run_id, "fastcifar": "0.1.0"}
    (folder / "probe.json").write_text(json.dumps(probe))
    resumed = measurement(folder, None)  # a later make results: the same run id, from measure.json
    assert resumed.run_id == first.run_id and resumed.done("probe")
    probe["env"]["run_id"] = "another-run"
    (folder / "probe.json").write_text(json.dumps(probe))
    assert measurement(folder, None).done("probe") is None


@pytest.mark.skipif(git_commit() is None, reason="needs a git checkout (the commit is what makes a stage done)")
def test_a_stage_done_at_this_commit_is_kept_and_one_of_another_commit_measured_again(small_data, tmp_path):
    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastcifar.measure", "--data-dir", str(small_data), "--out",
                               str(tmp_path), "--stages", "probe", "--device", "cpu",
                               "--allow-dirty"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    (folder,) = [p.parent for p in tmp_path.glob("*/probe.json")]  # the machine's own folder, derived
    probe = json.loads((folder / "probe.json").read_text())
    assert probe["attainable_fp32"]["gflops"] > 0 and probe["flops_per_image"] > 0
    assert probe["env"]["git_commit"] == git_commit() and "[1/1 probe] ok" in first.stdout
    assert probe["env"]["run_id"]  # every stage's process records the measurement's run id
    stages = json.loads((folder / "measure.json").read_text())
    assert stages["commit"] == git_commit() and stages["stages"]["probe"]["rc"] == 0
    assert stages["run_id"] == probe["env"]["run_id"]

    second = run()  # resumed: nothing redone
    assert second.returncode == 0 and "done by this code" in second.stdout
    assert json.loads((folder / "probe.json").read_text()) == probe

    probe["env"]["git_commit"] = "another"
    (folder / "probe.json").write_text(json.dumps(probe))
    third = run()  # measured at another commit: measured again
    assert third.returncode == 0 and "[1/1 probe] ok" in third.stdout
    assert json.loads((folder / "probe.json").read_text())["env"]["git_commit"] == git_commit()


def test_the_spec_stage_is_done_only_with_every_asked_seed_at_this_commit(tmp_path):
    runs = tmp_path / "spec" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "spec" / "summary.json").write_text("{}")
    for seed, commit in [(0, "this"), (1, "this"), (2, "other")]:
        (runs / f"ffcv-seed{seed}.json").write_text(json.dumps(committed(f"spec/runs/ffcv-seed{seed}.json", commit)))

    assert not measurement(tmp_path, "this", 3).done("spec")  # seed 2 is another commit's: measured again
    (runs / "ffcv-seed2.json").write_text(json.dumps(committed("spec/runs/ffcv-seed2.json", "this")))
    assert measurement(tmp_path, "this", 3).done("spec") and not measurement(tmp_path, "this", 5).done("spec")


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


def test_a_damaged_results_file_is_measured_again_with_its_reason(tmp_path, capsys):
    (tmp_path / "cold-start.json").write_text('{"epoch_time_s": 8')  # truncated
    m = measurement(tmp_path, "this")
    assert m.done("warm-up") is None and m.estimate("spec") == measure.ESTIMATE_S["spec"]
    assert "cold-start.json: not valid JSON" in capsys.readouterr().out
    runs = tmp_path / "spec" / "runs"
    runs.mkdir(parents=True)
    (runs / "ffcv-seed0.json").write_bytes(b"\xff")
    assert [p.name for p in measure.stale_runs(runs, lambda env: True)] == ["ffcv-seed0.json"]


def test_every_compared_quantity_runs_in_three_processes_whole_epochs_in_a_drawn_order(tmp_path):
    """The loader alone and end to end each in three stages (separate processes), end to end on whole epochs
    with each process's own order seed; the forced variants in the first process only; the floor's processes
    each measure their own limit."""
    args = argparse.Namespace(data_dir=Path("data"), device="cpu", e2e_repeats=1, e2e_steps=None, floor_processes=5)
    loaders = [measure.commands(n, args, tmp_path) for n in ("loader", "loader-2", "loader-3")]
    assert [c[c.index("--out") + 1] for c in loaders] == [str(tmp_path / measure.OUTPUT[n])
                                                          for n in ("loader", "loader-2", "loader-3")]
    e2e = {n: measure.commands(n, args, tmp_path) for n in ("end-to-end", "end-to-end-2", "end-to-end-3")}
    assert all("--max-steps" not in c for c in e2e.values())  # whole epochs
    assert [c[c.index("--order-seed") + 1] for c in e2e.values()] == ["1", "2", "3"]
    chosen = {n: c[c.index("--loaders") + 1].split(",") for n, c in e2e.items()}
    assert "ffcv-inline" in chosen["end-to-end"] and "ffcv-inline" not in chosen["end-to-end-2"]
    assert {"ffcv", "memory", "torch"} <= set(chosen["end-to-end-3"])
    assert "--floor-only" not in measure.commands("floor", args, tmp_path)
    args.e2e_steps = 30  # a smoke run's slices
    assert measure.commands("end-to-end", args, tmp_path)[-3:-2] == ["30"]
