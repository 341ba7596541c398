"""Results that refuse a bad file instead of publishing it: every hostile case is one line naming the file
(and the field), exit 2, and no document touched — rendering is all or none."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fastcifar.reporting import render
from fastcifar.reporting.render import END, START

ROOT = Path(__file__).resolve().parents[2]
NEW = "amd-epyc-f26m2-avx512-2c"  # a column measured by make results at one commit
OLD = "amd-epyc-avx2-2c"  # a column from before it: three commits, described by machine.json


@pytest.fixture
def checkout(tmp_path) -> Path:
    """README and docs/ with the committed results, README's headline made stale (so that a document written
    before another fails would show)."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = tmp_path / "README.md"
    text = readme.read_text()
    start = text.index(START.format("summary"))
    readme.write_text(text[:start] + text[start:].replace("|---|", "|-stale-|", 1))
    return tmp_path


def results(root: Path, *parts: str) -> Path:
    return root.joinpath("docs", "results", *parts)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data) or data))


def run_render(root: Path, capsys) -> tuple[int, str]:
    docs = {p: p.read_bytes() for p in [root / "README.md", *(root / "docs").glob("*.md")]}
    with pytest.raises(SystemExit) as exit_:
        render.run_cli(lambda _: render.main(["--root", str(root)]), "fastcifar.render")
    err = capsys.readouterr().err
    assert {p: p.read_bytes() for p in docs} == docs, "a document was written although rendering failed"
    return exit_.value.code, err


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def setitem(key: str, value: object) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        target = d
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return change


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a spec run truncated": (lambda r: truncate(results(r, NEW, "spec", "runs", "ffcv-seed2.json")),
                             "ffcv-seed2.json: not valid JSON"),
    "a spec run not UTF-8": (lambda r: results(r, NEW, "spec", "runs", "ffcv-seed1.json").write_bytes(b"\xff\xfe{"),
                             "ffcv-seed1.json: not UTF-8"),
    "a run without test_accuracy": (lambda r: edit_json(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                                        lambda d: d.pop("test_accuracy") and None),
                                    "field 'test_accuracy': Field required"),
    "seed 0 twice": (lambda r: shutil.copy(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                           results(r, NEW, "spec", "runs", "ffcv-seed3.json")),
                     "not what its name says"),
    "one run of three": (lambda r: [results(r, NEW, "spec", "runs", f"ffcv-seed{s}.json").unlink() for s in (1, 2)],
                         "its summary.json aggregated 0, 1, 2"),
    "a gap in the seeds": (lambda r: results(r, NEW, "spec", "runs", "ffcv-seed1.json").unlink(), "a run is missing"),
    "true as an accuracy": (lambda r: edit_json(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                                setitem("val_accuracy", True)), "'val_accuracy': Input should be"),
    "a negative epoch": (lambda r: edit_json(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                             setitem("epoch_time_s", -3.0)), "'epoch_time_s': Input should be greater"),
    "1e308 s": (lambda r: edit_json(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                    setitem("total_training_time_s", 1e308)), "'total_training_time_s'"),
    "an accuracy of 7": (lambda r: edit_json(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                             setitem("test_accuracy", 7)), "less than or equal to 1, got 7"),
    "a run at another commit": (lambda r: edit_json(results(r, NEW, "spec", "runs", "ffcv-seed0.json"),
                                                    setitem("env.git_commit", "0" * 40)), "measured at 0000000"),
    "bench_loader truncated": (lambda r: truncate(results(r, NEW, "bench_loader.json")), "bench_loader.json: not"),
    "bench_startup unreadable": (lambda r: results(r, NEW, "bench_startup.json").write_bytes(b"\x80"),
                                 "bench_startup.json: not UTF-8"),
    "end to end truncated": (lambda r: truncate(results(r, NEW, "bench_end_to_end.json")), "bench_end_to_end.json"),
    "a JSON list": (lambda r: results(r, NEW, "probe.json").write_text("[1, 2]"), "must be a JSON object, got list"),
    "a string": (lambda r: results(r, NEW, "probe.json").write_text('"probe"'), "must be a JSON object, got str"),
    "null": (lambda r: results(r, NEW, "probe.json").write_text("null"), "must be a JSON object, got null"),
    "NaN": (lambda r: edit_json(results(r, NEW, "bench_loader.json"), setitem("ffcv.images_per_s", float("nan"))),
            "NaN is not a number JSON allows"),
    "Infinity": (lambda r: edit_json(results(r, NEW, "bench_end_to_end.json"),
                                     setitem("ffcv.seconds", float("inf"))), "Infinity is not a number JSON allows"),
    "a missing key": (lambda r: edit_json(results(r, NEW, "bench_end_to_end.json"),
                                          lambda d: d["ffcv"].pop("epoch_seconds") and None),
                      "'pipelines.ffcv.epoch_seconds'"),
    "a pooled floor of one process": (lambda r: edit_json(results(r, NEW, "step_breakdown.json"), setitem(
        "floor.processes", 1)) or shutil.copy(results(r, NEW, "step_breakdown.json"), results(r, NEW, "floor.json")),
        "step_breakdown.json: field 'floor.processes'"),
    "deep nesting": (lambda r: results(r, NEW, "probe.json").write_text("[" * 100_000 + "]" * 100_000),
                     "nested too deeply"),
    "no machine.json": (lambda r: results(r, OLD, "machine.json").unlink(), "records no machine (it predates"),
    "a duplicated headline block": (lambda r: (r / "docs" / "benchmarks.md").write_text(
        (r / "docs" / "benchmarks.md").read_text() + f"\n{START.format('headline')}\nold\n{END.format('headline')}\n"),
        "needs its start marker once"),
    "markers in reverse order": (lambda r: (r / "docs" / "startup.md").write_text(
        (r / "docs" / "startup.md").read_text().replace(START.format("before-after"), "@@").replace(
            END.format("before-after"), START.format("before-after")).replace("@@", END.format("before-after"))),
        "in reverse order"),
    "a README not UTF-8": (lambda r: (r / "README.md").write_bytes(b"\xff" + (r / "README.md").read_bytes()),
                           "README.md: not UTF-8"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_results_file_is_refused_in_one_line_and_nothing_is_published(checkout, capsys, case):
    damage, message = CASES[case]
    damage(checkout)
    code, err = run_render(checkout, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastcifar.render: error: "), err
    assert message in err


def test_the_intact_checkout_renders(checkout, capsys):
    """The control: the same copy, undamaged, renders (the stale headline is rewritten)."""
    assert render.main(["--root", str(checkout)]) == 0
    assert (checkout / "README.md").read_text() == (ROOT / "README.md").read_text()
