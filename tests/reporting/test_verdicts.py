"""Verdicts judged between processes (docs/benchmarks.md's rule): a quantity needs its processes before any
verdict, a within-process interval never yields "met", and the cells read one value per process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastcifar.reporting import render, resolution
from fastcifar.reporting.loader_records import EndToEndFile
from fastcifar.reporting.stats import prediction95, smallest_difference
from fastcifar.reporting.verdicts import across_processes


@pytest.mark.parametrize("name, values, expected", [
    ("loader", [11.0], "not resolved (one process; the rule needs 3)"),  # however tight its own interval
    ("loader", [11.0, 11.1], "not resolved (2 processes; the rule needs 3)"),
    ("loader", [11.0, 11.1, 11.2], "**met**"),
    ("loader", [2.0, 2.1, 2.2], "**not met**"),
    ("loader", [3.0, 5.0, 7.0], "not resolved"),  # the prediction interval holds the bound
    ("step_limit", [1.05, 1.06, 1.05, 1.06], "not resolved (4 processes; the rule needs 5)"),
    ("step_limit", [1.05, 1.06, 1.05, 1.06, 1.05], "**met**"),
    ("end_to_end", [0.001, 0.002, 0.0015], "**met**"),
])
def test_a_target_is_judged_on_its_processes(name, values, expected):
    pi, judged = across_processes(name, values)
    assert judged == expected
    assert pi == prediction95(values)  # the interval of one more process, never the mean's


def _e2e(overhead: float, whole: bool, seconds: float = 100.0) -> SimpleNamespace:
    pipes = {"ffcv": SimpleNamespace(overhead_vs_synthetic=overhead, seconds=seconds * (1 + overhead),
                                     train_images=3840, epochs_timed=20),
             "synthetic": SimpleNamespace(overhead_vs_synthetic=0.0, seconds=seconds)}
    return SimpleNamespace(pipelines=pipes, whole_epochs=lambda: whole)


class Entry(dict):
    """A record's entry as the cells read it: by key and by attribute."""
    __getattr__ = dict.__getitem__


def column(e2e: list, ratios: list[float] | None = None) -> SimpleNamespace:
    entry = {"images_per_epoch": 45000, "epoch_seconds": [45.0, 45.0]}
    loader = SimpleNamespace(pipelines={"ffcv": Entry(images_per_s=1000.0, **entry),
                                        "torch": Entry(images_per_s=100.0, **entry)})
    return SimpleNamespace(e2e_files=lambda: e2e, loader_ratios=lambda: ratios or [], loader=loader)


def test_end_to_end_is_judged_only_on_whole_epochs_in_a_drawn_order():
    whole = column([_e2e(0.004, True), _e2e(0.006, True), _e2e(0.005, True)])
    assert render.cell_e2e(whole).endswith(": **met**") and "whole epochs" in render.cell_e2e(whole)
    slices = column([_e2e(0.004, False), _e2e(0.006, False), _e2e(0.005, False)])
    assert "not resolved (3 processes of 20 rounds of 30 steps" in render.cell_e2e(slices)
    assert "met" not in render.cell_e2e(slices).replace("not met", "")


def test_training_beats_its_floor_only_when_every_process_says_so():
    at_floor = column([_e2e(0.01, True), _e2e(-0.01, True), _e2e(0.0, True)])
    assert render.cell_floor_vs_training(at_floor).endswith("not resolved (at its floor)")
    below = column([_e2e(0.05, True), _e2e(0.06, True), _e2e(0.055, True)])
    assert render.cell_floor_vs_training(below).endswith(": below its floor")
    beats = column([_e2e(-0.05, True), _e2e(-0.06, True), _e2e(-0.055, True)])
    assert render.cell_floor_vs_training(beats).endswith("**training beats its floor**")


def test_the_loader_ratio_needs_three_processes_and_shows_digits_its_spread_supports():
    three = render.cell_loader(column([], [11.2, 11.3, 11.4]))  # one more process: ±0.5, so one decimal
    assert three.endswith(": **met**") and "11.3× `torch`" in three and "processes 11.2×, 11.3×, 11.4×" in three
    wide = render.cell_loader(column([], [9.0, 11.3, 13.6]))  # ±12: no decimal
    assert "11× `torch`" in wide and wide.endswith(": not resolved")


def test_a_files_rounds_are_every_pipeline_once():
    entry = {"seconds": 10.0, "images_per_s": 4500.0, "train_images": 45000, "data_fraction": 0.01,
             "epoch_seconds": [10.0], "epochs_timed": 1, "overhead_vs_synthetic": 0.0}
    env = {"python": "3.11", "torch": "2.13.0", "device": "cpu", "device_name": "cpu", "date": "2026-12-07"}
    data = {"ffcv": entry, "synthetic": entry, "env": env, "order": [["synthetic", "ffcv"]], "max_steps": None}
    assert EndToEndFile.model_validate(data).whole_epochs()
    with pytest.raises(ValueError, match="not every pipeline of the file once"):
        EndToEndFile.model_validate({**data, "order": [["ffcv", "ffcv"]]})
    with pytest.raises(ValueError, match="2 rounds in `order`"):
        EndToEndFile.model_validate({**data, "order": [["ffcv", "synthetic"]] * 2})
    assert not EndToEndFile.model_validate({**data, "max_steps": 30}).whole_epochs()


def test_the_resolution_is_the_smallest_difference_a_t_test_tells():
    assert smallest_difference([10.0]) is None and smallest_difference([5.0, 5.0, 5.0]) == 0.0
    # sd 1 over a mean of 100 in 3 processes: t(4) 2.776 x 1 x sqrt(2/3) / 100
    assert smallest_difference([99.0, 100.0, 101.0]) == pytest.approx(2.776 * (2 / 3) ** 0.5 / 100, rel=1e-3)
    assert resolution._cell([99.0, 100.0, 101.0], "") == ("3 processes, sd 1.0 % of the mean; smallest "
                                                          "difference told: 2.3 %")
    assert resolution._cell([10.0], "") == "one process: not measured"


def test_loader_processes_without_the_first_file_are_not_a_verdict():
    """loader-processes/ add to bench_loader.json; without it (deleted, never measured) the cell says so."""
    orphan = column([], [11.2, 11.3, 11.4])
    orphan.loader = None
    assert render.cell_loader(orphan) == "not measured"
