"""Typed records: the renderer reads only what records.py declares and checks, a column is one machine, reading is
bounded, and documents change all or none. One checkout copy per module; each case changes one file, renders,
and puts the file back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from fastcifar.reporting import records, render
from fastcifar.reporting.columns import Machine
from fastcifar.reporting.ladder import LadderFile

ROOT = Path(__file__).resolve().parents[2]
NEW = "amd-epyc-f26m2-avx512-2c"
DOCS = ("README.md", "docs/benchmarks.md", "docs/startup.md")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copytree(ROOT / "docs", root / "docs")
    return root


def col(root: Path, *parts: str) -> Path:
    return root.joinpath("docs", "results", NEW, *parts)


def render_once(root: Path, capsys) -> tuple[int, str]:
    """Render the checkout; the exit code and stderr. A refusal must leave every document as it was."""
    before = {name: (root / name).read_bytes() for name in DOCS}
    with pytest.raises(SystemExit) as exit_:
        render.run_cli(lambda _: render.main(["--root", str(root)]), "fastcifar.render")
    err = capsys.readouterr().err
    after = {name: (root / name).read_bytes() for name in DOCS}
    if exit_.value.code != 0:
        assert after == before, "a document was written although rendering failed"
    for name, data in before.items():  # a render that succeeded on a changed file: back to the committed text
        if after[name] != data:
            (root / name).write_bytes(data)
    return exit_.value.code, err


class changed:
    """A file changed for one case (text, or a function of its parsed JSON), restored afterwards."""

    def __init__(self, path: Path, change):
        self.path, self.change = path, change

    def __enter__(self):
        self.saved = self.path.read_bytes()
        new = self.change(json.loads(self.saved)) if callable(self.change) else self.change
        self.path.write_text(new if isinstance(new, str) else json.dumps(new))

    def __exit__(self, *exc):
        self.path.write_bytes(self.saved)


def refused(root: Path, capsys, path: Path, change, message: str, named: str | None = None) -> None:
    with changed(path, change):
        code, err = render_once(root, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("fastcifar.render: error: "), err
    assert (named or path.name) in err and message in err, err


def locate(data: object, key: str) -> tuple[object, object]:
    """The container holding a dotted key's last part (list items by index), and that part as it indexes it."""
    *parents, last = key.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data, int(last) if isinstance(data, list) else last


def at(key: str, value):
    def change(d: dict) -> dict:
        target, last = locate(d, key)
        target[last] = value
        return d
    return change


def scaled(key: str, factor: float):
    def change(d: dict) -> dict:
        target, last = locate(d, key)
        target[last] *= factor
        return d
    return change


# The examples of the issue that went wrong before typed records, and cases found beside them.
EXAMPLES = {
    "a reversed interval": ("step_breakdown.json", at("floor.step_ms_ci95", [140, 130]), "low end first"),
    "an infinite interval": ("step_breakdown.json", lambda d: json.dumps(d).replace(
        json.dumps(d["floor"]["step_ms_ci95"]), "[-1e999, 1e999]"), "-1e999 is not a finite number"),
    "a category times 10": ("step_breakdown.json", scaled("profiled.categories.convolution forward.ms", 10),
                            "the categories sum to"),
    "5 processes holding 3": ("floor.json", lambda d: at("floor.step_ms_per_process", d["floor"][
        "step_ms_per_process"][:3])(d), "processes 5 with 3 values"),
    "every process at 200 ms": ("floor.json", at("floor.step_ms_per_process", [200.0] * 5), "is not the mean"),
    "a pooled file that is not its process": ("floor-processes/process-2.json", lambda d: col(
        ROOT, "floor-processes/process-1.json").read_text(), "field 'floor.step_ms_per_process.1'", "floor.json"),
    "a torch run in the ffcv spec": ("spec/runs/ffcv-seed1.json", at("config.loader", "torch"),
                                     "config.loader 'torch'"),
    "a run that says 5 epochs": ("spec/runs/ffcv-seed0.json", at("config.epochs", 5),
                                 "10 epoch times in a run of config.epochs 5"),
    "11 epoch times in 10 epochs": ("spec/runs/ffcv-seed0.json", lambda d: at(
        "epoch_times_s", d["epoch_times_s"] + [d["epoch_times_s"][-1]])(d), "11 epoch times"),
    "a duplicated key": ("probe.json", lambda d: json.dumps(d)[:-1] + ', "env": {}}', "'env' appears twice"),
    "a negative stage": ("measure.json", at("stages.spec.seconds", -1440.0), "stages.spec.seconds"),
    "a limit of 0 ms": ("step_breakdown.json", at("limit.step_ms", 0), "'limit.step_ms'"),
    "a batch of 0": ("floor.json", at("batch", 0), "'batch'"),
    "an epoch of 0 s": ("spec/runs/ffcv-seed2.json", at("epoch_time_s", 0), "'epoch_time_s'"),
    "floor.rounds missing": ("floor.json", lambda d: (d["floor"].pop("rounds"), d)[1],
                             "'floor.rounds': Field required"),
    "a probe without its kernel": ("probe.json", lambda d: (d["attainable_fp32"].pop("kernel"), d)[1],
                                   "'attainable_fp32.kernel': Field required"),
    "warm runs without compile_s": ("bench_startup.json", lambda d: ([w.pop("compile_s") for w in d["warm"]], d)[1],
                                    "lacks compile_s"),
    "a 401-digit integer": ("bench_loader.json", lambda d: json.dumps(d).replace(
        '"steps": 50', '"steps": ' + "9" * 401), "more than 19 digits"),
    "a string where a number is formatted": ("bench_loader.json", at("ffcv.images_per_s", "322633"),
                                             "'pipelines.ffcv.images_per_s'"),
    "a probe from another machine": ("probe.json", lambda d: at("env.machine.cpu_model", "Intel(R) Xeon(R) Platinum")(
        at("attainable_fp32.gflops", 9000.0)(d)), "not on this column's machine"),
    "an end-to-end process at another commit": ("end-to-end-processes/process-2.json",
                                                at("env.git_commit", "1" * 40), "measured at 1111111"),
    "a run whose name says another seed": ("spec/runs/ffcv-seed2.json", at("config.seed", 5), "not what its name says"),
}


@pytest.mark.parametrize("case", EXAMPLES)
def test_a_file_that_lies_is_refused_in_one_line(checkout, capsys, case):
    name, change, message, *named = EXAMPLES[case]
    refused(checkout, capsys, col(checkout, name), change, message, *named)


def test_the_committed_columns_render_as_they_are(checkout, capsys):
    assert render_once(checkout, capsys)[0] == 0
    for name in DOCS:
        assert (checkout / name).read_bytes() == (ROOT / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Generated: every declared field of each kind of committed JSON, made missing, of the wrong type, zero,
# negative, huge or reversed. Where the field's own declaration refuses the value, the render must refuse it
# in one line naming the file and the field; where it allows it, the render may still refuse it (a rule
# between fields), in one line; never a traceback, never a document changed.

FILES = {"spec/runs/ffcv-seed0.json": records.Run, "bench_loader.json": records.LoaderFile,
         "bench_end_to_end.json": records.EndToEndFile, "bench_startup.json": records.StartupFile,
         "probe.json": records.ProbeFile, "step_breakdown.json": records.BreakdownFile,
         "floor.json": records.FloorFile, "measure.json": records.MeasureFile, "machine.json": records.MachineNote,
         "setup.json": records.SetupFile, "ladder/ladder.json": LadderFile}
PIPELINES = {records.LoaderFile, records.EndToEndFile}


def _record_type(annotation) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _fields(model: type[BaseModel], data: dict, prefix: str = ""):
    """(dotted key in the file, dotted key in the record, the field's annotation, required) for every declared
    field present in `data`, recursing into records, maps of records and the first of a list of records."""
    if model in PIPELINES and not prefix:
        entry = typing.get_args(model.model_fields["pipelines"].annotation)[1]
        for name in [k for k, v in data.items() if isinstance(v, dict) and k in typing.get_args(records.Pipeline)]:
            yield from _fields(entry, data[name], f"{name}.")
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in data or name == "pipelines":
            continue
        annotation = info.rebuild_annotation()
        yield prefix + key, annotation, info.is_required()
        value, sub = data[key], _record_type(info.annotation)
        if isinstance(value, dict) and sub is not None:
            yield from _fields(sub, value, f"{prefix}{key}.")
        elif isinstance(value, dict) and typing.get_origin(info.annotation) is dict:
            inner = _record_type(typing.get_args(info.annotation)[1])
            for k, v in value.items():
                if inner is not None and isinstance(v, dict):
                    yield from _fields(inner, v, f"{prefix}{key}.{k}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            inner = _record_type(typing.get_args(info.annotation)[0]) if typing.get_args(info.annotation) else None
            if inner is not None:
                yield from _fields(inner, value[0], f"{prefix}{key}.0.")


def _mutations(value, annotation, required):
    if required:
        yield "missing", None
    yield "wrong type", "x" if not isinstance(value, str) else 7
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield "zero", 0
        yield "negative", -abs(value) - 1
        yield "huge", 1e300
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value) and \
            value[0] < value[1]:
        yield "reversed", [value[1], value[0]]


def _declared_refuses(annotation, value) -> bool:
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        return True
    return False


def _cases():
    for name, model in FILES.items():
        data = json.loads(col(ROOT, name).read_text())
        for key, annotation, required in _fields(model, data):
            parent, last = locate(data, key)
            for kind, value in _mutations(parent[last], annotation, required):
                refuses = kind == "missing" or _declared_refuses(annotation, value)
                yield pytest.param(name, key, kind, value, refuses, id=f"{name}:{key}:{kind}")


def _mutate(key: str, kind: str, value):
    if kind != "missing":
        return at(key, value)

    def change(d: dict) -> dict:
        target, last = locate(d, key)
        del target[last]
        return d
    return change


CASES = list(_cases())


def test_the_generated_cases_cover_every_kind_of_file():
    kinds = {p.values[0] for p in CASES}
    assert kinds == set(FILES) and len(CASES) > 300, (kinds, len(CASES))


@pytest.mark.parametrize("name, key, kind, value, refuses", CASES)
def test_every_declared_field_made_wrong(checkout, capsys, name, key, kind, value, refuses):
    path = col(checkout, name)
    with changed(path, _mutate(key, kind, value)):
        code, err = render_once(checkout, capsys)
    assert code in (0, 2), err  # never a traceback
    if refuses:
        assert code == 2, f"{name}: {key} {kind} ({value!r}) was rendered"
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and path.name in err, err


# ---------------------------------------------------------------------------------------------
# Bounded reading, and all or none


def render_with_probe_as(checkout: Path, capsys, make) -> tuple[int, str]:
    """Render with probe.json replaced by what `make(path)` puts there (a FIFO, a link), then put it back."""
    probe = col(checkout, "probe.json")
    saved = probe.read_bytes()
    probe.unlink()
    make(probe)
    try:
        return render_once(checkout, capsys)
    finally:
        probe.unlink()
        probe.write_bytes(saved)


def test_a_fifo_is_refused_by_name_and_never_opened(checkout, capsys):
    code, err = render_with_probe_as(checkout, capsys, os.mkfifo)
    assert code == 2 and "probe.json: not a regular file" in err, err


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_link_to_a_device_or_out_of_the_results_is_refused(checkout, capsys, tmp_path, target):
    if target == "outside":
        shutil.copy(col(checkout, "probe.json"), tmp_path / "probe.json")
        target = str(tmp_path / "probe.json")
    code, err = render_with_probe_as(checkout, capsys, lambda probe: probe.symlink_to(target))
    assert code == 2 and ("not a regular file" in err or "a link leading out of" in err), err


def test_an_oversized_file_is_refused_before_it_is_read(checkout, capsys):
    refused(checkout, capsys, col(checkout, "probe.json"), " " * (records.MAX_FILE_BYTES + 1) + "{}",
            "larger than a results file")


@pytest.fixture
def stale_readme(checkout):
    """README's table made stale, so that rendering must write README.md and docs/benchmarks.md alike."""
    readme, benchmarks = checkout / "README.md", checkout / "docs" / "benchmarks.md"
    saved = readme.read_bytes(), benchmarks.read_bytes()
    for path, section in ((readme, "summary"), (benchmarks, "headline")):
        start = render.START.format(section)
        path.write_text(path.read_text().replace(start + "\n", start + "\nstale\n"))
    yield readme, benchmarks
    readme.write_bytes(saved[0])
    benchmarks.write_bytes(saved[1])


def test_a_document_that_cannot_be_replaced_is_found_before_any_is(checkout, capsys, stale_readme):
    startup = checkout / "docs" / "startup.md"
    start = render.START.format("before-after")
    startup.write_text(startup.read_text().replace(start + "\n", start + "\nstale\n"))
    if subprocess.run(["chattr", "+i", str(startup)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        stale = [p.read_bytes() for p in stale_readme]
        code, err = render_once(checkout, capsys)
        assert code == 2 and "startup.md: cannot be replaced" in err, err
        assert [p.read_bytes() for p in stale_readme] == stale  # README and benchmarks.md not replaced either
    finally:
        subprocess.run(["chattr", "-i", str(startup)], check=True)
        startup.write_bytes((ROOT / "docs" / "startup.md").read_bytes())


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt in this process, as in a terminal, and afterwards what it was."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_during_the_swap_is_held_until_every_document_is_in(checkout, monkeypatch, stale_readme, sigint_raises):
    """The first rename sends this process SIGINT: it arrives only after the last rename. (SIGINT raises here
    whatever this process inherited: started in the background by a shell without job control, it was ignored.)"""
    real, calls = os.replace, []

    def replace(src, dst):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(render.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        render.render(checkout, checkout / "docs" / "results")
    assert len(calls) == 2
    assert render.render(checkout, checkout / "docs" / "results", check=True) == []  # both documents are current


def test_temporaries_a_killed_render_left_are_removed(checkout, stale_readme):
    stale = checkout / "docs" / ".benchmarks.md.abc123.tmp"
    stale.write_text("left by a SIGKILLed render")
    render.render(checkout, checkout / "docs" / "results")
    assert not stale.exists() and not list(checkout.glob(".README.md.*.tmp"))


def test_a_column_reads_records_never_raw_dicts():
    m = Machine(ROOT / "docs" / "results" / NEW)
    files = [*m.runs, m.loader, m.e2e, m.startup, m.cold, m.probe, m.breakdown, m.floor, m.measure, m.summary]
    assert all(isinstance(f, records.Record) for f in files)
    with pytest.raises(KeyError):
        m.loader.pipelines["ffcv"]["ratio_to_torch"]  # in the file, not declared: no table can read it


def graphs(sizes: list[int], dynamic: bool = False):
    return at("graphs", {"dynamic": dynamic, "batch_sizes": sizes, "unique_graphs": 3, "frames_compiled": 3})


@pytest.mark.parametrize("run_sizes, floor_dynamic, message", [
    ([128, 72], False, None), ([64, 8], False, "training and its floor ran different graphs"),
    ([128, 72], True, "static and with dynamic shapes in one column")])
def test_training_and_its_floor_ran_the_same_graphs(checkout, capsys, run_sizes, floor_dynamic, message):
    with changed(col(checkout, "step_breakdown.json"), graphs([128], floor_dynamic)):
        if message is None:
            with changed(col(checkout, "spec/runs/ffcv-seed0.json"), graphs(run_sizes)):
                assert render_once(checkout, capsys)[0] == 0
        else:
            refused(checkout, capsys, col(checkout, "spec/runs/ffcv-seed0.json"), graphs(run_sizes), message,
                    named="amd-epyc")
