"""The published results tables, rendered from the committed JSONs, never typed: `python -m fastcifar.render`
(`make docs`) rewrites what lies between the markers in README.md and docs/benchmarks.md.

One column per machine folder under docs/results/ (newest first); a machine keeps its column, with its
date and commits, until it is measured again; a new machine adds one. Every verdict follows the rule of
docs/benchmarks.md: a target is met only when the whole 95 % interval lies on its side of the bound,
not met when the whole interval lies on the other side, and otherwise not resolved. `--check` writes
nothing and exits 1 when a document differs from what the JSONs give (tests/test_docs.py does the same).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..utils import ArgumentParser, UserError, read_bounded, run_cli, signals_held
from . import ladder, resolution
from .columns import Machine, machines
from .evidence import bench_options, startup_before_after, startup_first_round, step_options
from .stats import decimals, describe, prediction95
from .tables import _piece, ci95, details, pm, spec_stats, startup_stats
from .verdicts import TARGETS, across_processes, target, target_verdict, verdict  # noqa: F401 (tests' verdict)

MAX_DOCUMENT_BYTES = 4 << 20
START, END = "<!-- rendered from docs/results/ by `make docs`: {} -->", "<!-- end of rendered: {} -->"


def _spec_cell(key: str, fmt: str, unit: str, scale: float = 1.0) -> Callable[[Machine], str]:
    def cell(m: Machine) -> str:
        stats = spec_stats(m, key)
        if stats is None:
            return "not measured"
        cold = sum(1 for r in m.runs if (r.get("startup") or {}).get("compile_cache_warm") is False)
        note = f" ({cold} of {len(m.runs)} runs with a cold compile cache)" if cold and key.startswith("total") else ""
        return f"{pm(stats, fmt, scale)}{unit}{note}"
    return cell


def loader_ratio(m: Machine) -> tuple[float, list[float] | None] | None:
    """ffcv / torch images/s of the column's first loader process, and a conservative 95 % interval within it:
    the ratio of the per-epoch rates' interval ends (ffcv's low end over torch's high end, and the reverse)."""
    if not m.loader or "ffcv" not in m.loader.pipelines or "torch" not in m.loader.pipelines:
        return None
    pipelines = m.loader.pipelines

    def rates(r: dict) -> dict:
        return describe([r["images_per_epoch"] / s for s in r["epoch_seconds"]])

    f, t = rates(pipelines["ffcv"]), rates(pipelines["torch"])
    ratio = pipelines["ffcv"]["images_per_s"] / pipelines["torch"]["images_per_s"]
    if f["n"] < 2 or t["n"] < 2:
        return ratio, None
    return ratio, [f["ci95"][0] / t["ci95"][1], f["ci95"][1] / t["ci95"][0]]


def _processes(values: list[float], pi: list[float] | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """'processes a, b, c; one more process, 95 %: lo to hi', in `unit` after `scale`, with no more digits than
    that interval supports."""
    d = decimals(scale * pi[0], scale * pi[1]) if pi else 2

    def show(v: float) -> str:
        return f"{scale * v:{fmt}.{d}f}{unit}"

    where = f"; one more process, 95 %: {show(pi[0])} to {show(pi[1])}" if pi else ""
    return f"processes {', '.join(show(v) for v in values)}{where}"


def _mean(values: list[float], pi: list[float] | None, fmt: str = "", scale: float = 1.0, unit: str = "") -> str:
    """The mean over processes, with the digits one more process's interval supports (one process: one decimal)."""
    d = decimals(scale * pi[0], scale * pi[1]) if pi else 1
    return f"{scale * statistics.fmean(values):{fmt}.{d}f}{unit}"


def cell_loader(m: Machine) -> str:
    """ffcv over torch, isolated, judged between the column's loader processes."""
    ratios, first = m.loader_ratios(), loader_ratio(m)
    if not ratios or first is None:  # the first process is bench_loader.json; the others only add to it
        return "not measured"
    pi, judged = across_processes("loader", ratios)
    rate = m.loader.pipelines["ffcv"].images_per_s
    if len(ratios) == 1:  # measured before the rule: the within-process interval is shown, never judged
        _, ci = first
        return (f"{rate:,.0f} images/s, {ratios[0]:.2f}× `torch` (within one process: {ci95(ci, '.2f', unit='×')})"
                f": {judged}")
    return (f"{rate:,.0f} images/s (first process), {_mean(ratios, pi, unit='×')} `torch` "
            f"({_processes(ratios, pi, '', unit='×')}): {judged}")


def _before_the_rule(files: list) -> str:
    r = files[0].pipelines["ffcv"]
    steps = r.train_images // 128 + bool(r.train_images % 128)
    n = "one process" if len(files) == 1 else f"{len(files)} processes"
    return (f"not resolved ({n} of {r.epochs_timed} rounds of {steps} steps in a rotated order: not whole epochs "
            "in a drawn order, measured before the rule)")


def cell_e2e(m: Machine) -> str:
    """ffcv's epoch over synthetic's in the same process and round, judged between the column's processes; a
    column of slices of epochs in a rotated order (before the rule) shows its figures, never a verdict."""
    files = m.e2e_files()
    if not files:
        return "not measured"
    values = [f.pipelines["ffcv"].overhead_vs_synthetic for f in files]
    if not all(f.whole_epochs() for f in files):
        return f"{100 * statistics.fmean(values):+.1f} % (mean over processes): {_before_the_rule(files)}"
    pi, judged = across_processes("end_to_end", values)
    return (f"{_mean(values, pi, '+', 100, ' %')} (whole epochs; {_processes(values, pi, '+', 100, ' %')}): "
            f"{judged}")


def _cell_startup(key: str, name: str) -> Callable[[Machine], str]:
    def cell(m: Machine) -> str:
        stats = startup_stats(m, key)
        if stats is None:
            return "not measured"
        spec = spec_stats(m, "startup_s") if key == "startup_s" else None
        own = f"; the spec runs' own, which also compile the last partial batch: {pm(spec, '.1f')} s" if spec else ""
        values = [_piece(run, key) for run in m.startup["warm"]]  # startup_stats' values, one per process
        pi, judged = across_processes(name, values)  # each warm run its own process: a user's next start is one more
        return (f"{pm(stats, '.2f')} s ({stats['n']} warm runs of one step, each a process; one more, 95 %: "
                f"{ci95(pi, '.2f', unit=' s')}{own}): {judged}")
    return cell


def cell_cold(m: Machine) -> str:
    """Start-up with empty compile caches, one step (bench_startup's cold run): one definition in every column."""
    cold = ((m.startup or {}).get("cold") or {}).get("startup_s")
    return f"{cold:.1f} s (one step)" if cold else "not measured"


def cell_utilisation(m: Machine) -> str:
    """The compute-only floor (Machine.compute_floor) over the column's one rate."""
    rate, floor = m.rate(), m.compute_floor()
    if not (rate and floor and floor["flops_per_image"]):
        return "not measured (no probe at that commit)"
    images, per_image, ci = floor["images_per_s"], floor["flops_per_image"], floor["ci"]
    util_ci = [v * per_image / 1e9 / rate for v in ci] if ci else None
    one = floor["of"].startswith("one process")  # rounds of one process: shown, never judged
    judged = "not resolved (one process; the rule needs 3)" if one else target_verdict("utilisation", util_ci)
    return (f"{100 * images * per_image / 1e9 / rate:.1f} % ({'within one process: ' if one else ''}"
            f"{ci95(util_ci, '.1f', 100, ' %')}; {floor['of']}) of {rate:.0f} GFLOP/s, {images:.0f} images/s: {judged}")


def cell_epoch_utilisation(m: Machine) -> str:
    rate = m.rate()
    gflops = [r.utilisation.mean_epoch.gflops for r in m.runs if r.utilisation is not None]
    if not (gflops and rate):
        return "not measured"
    return f"{pm(describe([g / rate for g in gflops]), '.1f', 100)} % ({describe(gflops)['mean']:.0f} GFLOP/s)"


def cell_floor_vs_training(m: Machine) -> str:
    """Training (the trainer's loop on `ffcv`) against its floor (`synthetic`: the same loop, graphs and process,
    no loading): its rate over the floor's, one ratio per end-to-end process, judged between them. Training
    beats its floor only where the whole interval lies above 1."""
    files = m.e2e_files()
    if not files:
        return "not measured"
    ratios = [f.pipelines["synthetic"].seconds / f.pipelines["ffcv"].seconds for f in files]
    if not all(f.whole_epochs() for f in files):
        return f"{100 * statistics.fmean(ratios):.0f} % of the floor's rate: {_before_the_rule(files)}"
    pi = prediction95(ratios)
    judged = ("not resolved (fewer than 3 processes)" if len(ratios) < 3 or not pi else
              "**training beats its floor**" if pi[0] > 1 else "below its floor" if pi[1] < 1 else
              "not resolved (at its floor)")
    return (f"training at {_mean(ratios, pi, '', 100, ' %')} of its floor's rate (`ffcv` against `synthetic`, "
            f"whole epochs, the same process and graphs; {_processes(ratios, pi, '', 100, ' %')}): {judged}")


def cell_step_limit(m: Machine) -> str:
    """The compute-only step over its own limit, a ratio per floor process (each over its own limit), judged
    by the prediction interval of one more process; a column without those shows its one process, unjudged."""
    ratios = m.step_limit_ratios()
    if ratios:
        pi, judged = across_processes("step_limit", ratios)
        return f"{_mean(ratios, pi, unit='×')} its own limit ({_processes(ratios, pi, '', unit='×')}): {judged}"
    if not m.breakdown:
        return "not measured"
    floor, limit = m.breakdown["floor"], m.breakdown["limit"]
    ci = [v / limit["step_ms"] for v in floor["step_ms_ci95"]] if floor.get("step_ms_ci95") else None
    # one process's rounds: an interval within the process, which a verdict between processes never rests on
    return (f"{floor['step_ms']:.0f} ms = {floor['step_ms'] / limit['step_ms']:.2f}× its limit of "
            f"{limit['step_ms']:.0f} ms (within one process: {ci95(ci, '.2f', unit='×')}): not resolved (one "
            "process; between processes: the step-options sweeps below)")


HEADLINE: list[tuple[str, Callable[[Machine], str]]] = [
    ("total training time (process start → last validation)", _spec_cell("total_training_time_s", ".0f", " s")),
    ("mean epoch time", _spec_cell("epoch_time_s", ".1f", " s")),
    ("inference per batch of 128: forward pass alone", _spec_cell("inference_time_per_batch_ms", ".1f", " ms")),
    ("inference per batch of 128: forward + wait for the batch",
     _spec_cell("inference_time_per_batch_incl_data_ms", ".1f", " ms")),
    ("last-epoch train loss", _spec_cell("last_epoch_train_loss", ".4f", "")),
    ("validation accuracy (5,000)", _spec_cell("val_accuracy", ".2f", " %", 100)),
    ("test accuracy (10,000)", _spec_cell("test_accuracy", ".2f", " %", 100)),
    (f"utilisation: compute-only floor ({target('utilisation')})", cell_utilisation),
    ("utilisation: the spec's mean epoch", cell_epoch_utilisation),
    ("training (`ffcv`) against its compute-only floor (`synthetic`, in the same processes)", cell_floor_vs_training),
    (f"compute-only step against its own limit ({target('step_limit')})", cell_step_limit),
    (f"start-up, `--compile`, compile caches warm ({target('startup')})", _cell_startup("startup_s", "startup")),
    (f"… of which the data pipeline ({target('data_pipeline')})", _cell_startup("data_pipeline_s", "data_pipeline")),
    ("start-up, `--compile`, caches cold", cell_cold),
    (f"loader, isolated: `ffcv` ({target('loader')} `torch`)", cell_loader),
    (f"loader, end to end: `ffcv` over `synthetic` ({target('end_to_end')})", cell_e2e),
]


def headline(ms: list[Machine]) -> str:
    lines = ["| metric | " + " | ".join(m.heading() for m in ms) + " |", "|---|" + "---:|" * len(ms)]
    lines += [f"| {label} | " + " | ".join(cell(m) for m in ms) + " |" for label, cell in HEADLINE]
    return "\n".join(lines)


def _step_vs_limit(m: Machine) -> str:
    step, limit = m.breakdown["floor"]["step_ms"], m.breakdown["limit"]["step_ms"]
    return f"{step:.0f} ms, {step / limit:.2f}× its own limit"


def _one(values: list[float]) -> str:
    return f" ({len(values)} process{'es' if len(values) > 1 else ''})"


def _summary_cells(m: Machine) -> list[str]:
    """The README's column: a few figures, each in a unit a newcomer reads without the docs."""
    def mean(key: str) -> float | None:
        stats = spec_stats(m, key)
        return stats["mean"] if stats else None

    total, epoch, test = mean("total_training_time_s"), mean("epoch_time_s"), mean("test_accuracy")
    gflops = [r.utilisation.mean_epoch.gflops for r in m.runs if r.utilisation is not None]
    rate = m.rate()
    warm = startup_stats(m, "startup_s")
    ratios = m.loader_ratios()
    e2e = [f.pipelines["ffcv"].overhead_vs_synthetic for f in m.e2e_files()]
    took = sum(s.seconds or 0 for s in m.measure.stages.values()) if m.measure else 0
    na = "not measured"
    return [
        f"{total / 60:.1f} min ({len(m.runs)} seeds)" if total else na,
        f"{epoch:.1f} s" if epoch else na,
        f"{100 * test:.1f} %" if test else na,
        (f"{describe(gflops)['mean']:.0f} of {rate:.0f} GFLOP/s ({100 * describe(gflops)['mean'] / rate:.0f} %)"
         if gflops and rate else na),
        (f"{warm['mean']:.1f} s warm, {cell_cold(m)} cold" if warm else na).replace(" (one step) cold", " cold"),
        f"{_mean(ratios, prediction95(ratios), unit='×')} the DataLoader's images/s{_one(ratios)}" if ratios else na,
        f"{_mean(e2e, prediction95(e2e), '+', 100, ' %')} epoch time{_one(e2e)}" if e2e else na,
        f"{took / 60:.0f} min" if took else "– (measured before `make results`)",
        _setup_cell(m),
        _step_vs_limit(m) if m.breakdown else na,
        ladder.readme_cell(m.ladder),
    ]


def _setup_cell(m: Machine) -> str:
    """`make setup` from a fresh clone (setup.json, its own commit): time, the .venv's size, torch's build, and
    whether apt's packages were already there (their download and install are not in the time then)."""
    s = m.setup
    if s is None:
        return "not measured"
    apt = "apt's packages present" if all(s.apt_packages_present_before.values()) else "apt included"
    return (f"{s.seconds / 60:.1f} min, `.venv/` {s.venv_bytes / 2**30:.1f} GiB, torch {s.torch_build} "
            f"({apt}; {(s.env.git_commit or '?')[:7]})")


SUMMARY = ["a spec run: 10 epochs, process start → last validation", "one epoch (45,000 images)",
           "test accuracy (10,000 images)", "training speed: of the CPU's measured limit",
           "start-up to the first step, `--compile`", "`ffcv` loader alone, vs PyTorch's DataLoader",
           "`ffcv` in training, vs no loading at all (`synthetic`)", "`make results` took",
           "`make setup`, a fresh clone (its own commit)",
           "a compiled training step (batch 128), vs its own limit",
           "fastcifar vs plain PyTorch, same model, this machine"]


def summary(ms: list[Machine]) -> str:
    """The README's table: every column's few figures (mean over the seeds or runs)."""
    cells = [_summary_cells(m) for m in ms]
    lines = ["| | " + " | ".join(m.heading() for m in ms) + " |", "|---|" + "---:|" * len(ms)]
    lines += [f"| {label} | " + " | ".join(c[i] for c in cells) + " |" for i, label in enumerate(SUMMARY)]
    return "\n".join(lines)


def ladder_section(ms: list[Machine]) -> str:
    return ladder.section([(m.name, m.label(), m.ladder) for m in ms])


SECTIONS = {"README.md": {"summary": summary},
            "docs/benchmarks.md": {"headline": headline, "resolution": resolution.table, "ladder": ladder_section,
                                   "step-options": step_options,
                                   "bench-options": bench_options, "details": details},
            "docs/startup.md": {"before-after": startup_before_after, "first-round": startup_first_round}}


def render_text(text: str, ms: list[Machine], sections: dict[str, Callable[[list[Machine]], str]], where: str) -> str:
    """text with every marked section replaced by its rendering: each section's markers exactly once, in order
    (a second, stale copy of a table would otherwise pass the check)."""
    for key, fn in sections.items():
        start, end = START.format(key), END.format(key)
        counts = (text.count(start), text.count(end))
        if counts != (1, 1) or text.index(start) > text.index(end):
            raise UserError(f"{where}: section {key!r} needs its start marker once, then its end marker once "
                            f"(found {counts[0]} and {counts[1]}{', in reverse order' if counts == (1, 1) else ''})")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{fn(ms)}\n{end}{tail}"
    return text


def _replaceable(path: Path) -> None:
    """Refuse, before any document is written, one that could not be replaced: the document itself must be
    writable (an immutable or read-only file refuses to be opened so). Its folder's taking a new file is
    proven by `write_all` creating every temporary before the first rename."""
    try:
        with open(path, "r+b"):
            pass
    except OSError as err:
        raise UserError(f"{path}: cannot be replaced ({err.strerror or err}); no document was written") from None


def write_all(changed: dict[Path, str]) -> None:
    """All or none: every document checked replaceable, then written to a temporary beside it, then, with
    SIGINT and SIGTERM held, all renamed over their documents; any failure before the renames removes every
    temporary and leaves every document as it was."""
    for path in changed:
        _replaceable(path)
    temps: dict[Path, Path] = {}
    try:
        for path, text in changed.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = Path(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        with signals_held(signal.SIGINT, signal.SIGTERM):  # swapped in all together, never some of them
            for path, tmp in temps.items():
                os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write the documents ({err.strerror or err}: {err.filename}); "
                        "none was replaced") from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(root: Path) -> None:
    """The temporaries a killed render left (SIGKILL cannot be held): the render lock is ours, so none is live."""
    for name in SECTIONS:
        path = root / name
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _render_lock(root: Path):
    """One render of a checkout at a time (a second one's temporaries would otherwise be taken for stale)."""
    import fcntl

    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another render is writing the documents of {root}; wait for it") from None
        yield
    finally:
        os.close(fd)


def render(root: Path, results: Path, check: bool = False) -> list[Path]:
    """Re-render the documents under root from results/; returns those that changed (check: would change).
    All or none: every document is rendered, and checked replaceable, before any is written (`write_all`)."""
    ms = machines(results)
    changed: dict[Path, str] = {}
    for name, sections in SECTIONS.items():
        path = root / name
        if not os.path.lexists(path):
            raise UserError(f"{path} not found: run from a checkout (or pass --root)")
        raw = read_bounded(path, MAX_DOCUMENT_BYTES, "one of fastcifar's documents")
        try:
            old = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        new = render_text(old, ms, sections, str(path))
        if new != old:
            changed[path] = new
    if not check:
        with _render_lock(root):
            _remove_stale_temporaries(root)
            write_all(changed)
    return list(changed)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("."), help="the checkout holding README.md and docs/")
    p.add_argument("--results", type=Path, default=None, help="machine folders (default ROOT/docs/results)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a document is not current")
    args = p.parse_args(argv)
    changed = render(args.root, args.results or args.root / "docs" / "results", args.check)
    if args.check:
        for path in changed:
            print(f"{path}: its rendered tables differ from docs/results/ (run make docs)", file=sys.stderr)
        return 1 if changed else 0
    print(f"rendered: {', '.join(map(str, changed)) or 'nothing changed'}")
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.render")


if __name__ == "__main__":
    cli()
