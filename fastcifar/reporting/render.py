"""The published results tables, rendered from the committed JSONs, never typed: `python -m fastcifar.render`
(`make docs`) rewrites what lies between the markers in README.md and docs/benchmarks.md.

One column per machine folder under docs/results/ (newest first); a machine keeps its column, with its
date and commits, until it is measured again; a new machine adds one. Every verdict follows the rule of
docs/benchmarks.md: a target is met only when the whole 95 % interval lies on its side of the bound,
not met when the whole interval lies on the other side, and otherwise not resolved. `--check` writes
nothing and exits 1 when a document differs from what the JSONs give (tests/test_docs.py does the same).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..utils import ArgumentParser, UserError, atomic_path, run_cli
from . import schema
from .columns import Machine, machines
from .machines import machine_line as env_machine_line
from .schema import DATA_PIPELINE, PIECES
from .stats import describe

# name -> (comparison, bound, unit): the targets docs/benchmarks.md defines; labels and verdicts derive from them.
TARGETS = {
    "loader": (">=", 5.0, "×"),  # isolated `ffcv` / `torch` images/s
    "end_to_end": ("<=", 0.03, "%"),  # `ffcv`'s epoch over `synthetic`'s
    "startup": ("<=", 10.0, "s"),  # start-up with `--compile`, warm
    "data_pipeline": ("<=", 3.0, "s"),  # its data pipeline
    "utilisation": (">=", 0.65, "%"),  # compute-only floor / attainable fp32 rate
}
START, END = "<!-- rendered from docs/results/ by `make docs`: {} -->", "<!-- end of rendered: {} -->"


def verdict(ci: Sequence[float] | None, comparison: str, bound: float) -> str:
    """met / not met / not resolved, by where the 95 % interval lies against the bound."""
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "not resolved (no interval)"
    lo, hi = ci
    if comparison == ">=":
        return "**met**" if lo >= bound else "**not met**" if hi < bound else "not resolved"
    return "**met**" if hi <= bound else "**not met**" if lo > bound else "not resolved"


def target(name: str) -> str:
    """'target ≥ 65 %': a target's bound as the docs write it."""
    comparison, bound, unit = TARGETS[name]
    shown = {"%": f"{100 * bound:g} %", "×": f"{bound:g}×"}.get(unit, f"{bound:g} {unit}")
    return f"target {'≥' if comparison == '>=' else '≤'} {shown}"


def target_verdict(name: str, ci: Sequence[float] | None) -> str:
    comparison, bound, _ = TARGETS[name]
    return verdict(ci, comparison, bound)


def _pm(stats: dict, fmt: str, scale: float = 1.0) -> str:
    """'mean ± sd'; one value alone is said to be one ('± 0' would claim a spread that was never measured)."""
    if stats["n"] == 1:
        return f"{format(scale * stats['mean'], fmt)} (1 run)"
    return f"{format(scale * stats['mean'], fmt)} ± {format(scale * stats['sd'], fmt)}"


def _ci(ci: Sequence[float] | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    if not ci or any(math.isnan(v) for v in ci):
        return "–"
    return f"{format(scale * ci[0], fmt)} … {format(scale * ci[1], fmt)}{unit}"


def spec_stats(m: Machine, key: str) -> dict | None:
    values = [r[key] for r in m.runs if key in r]
    return describe(values) if values else None


def _spec_cell(key: str, fmt: str, unit: str, scale: float = 1.0) -> Callable[[Machine], str]:
    def cell(m: Machine) -> str:
        stats = spec_stats(m, key)
        if stats is None:
            return "not measured"
        cold = sum(1 for r in m.runs if (r.get("startup") or {}).get("compile_cache_warm") is False)
        note = f" ({cold} of {len(m.runs)} runs with a cold compile cache)" if cold and key.startswith("total") else ""
        return f"{_pm(stats, fmt, scale)}{unit}{note}"
    return cell


def loader_ratio(m: Machine) -> tuple[float, list[float] | None] | None:
    """ffcv / torch images/s and a conservative 95 % interval: the ratio of the per-epoch rates'
    interval ends (ffcv's low end over torch's high end, and the reverse)."""
    if not m.loader or "ffcv" not in m.loader or "torch" not in m.loader:
        return None

    def rates(r: dict) -> dict:
        return describe([r["images_per_epoch"] / s for s in r["epoch_seconds"]])

    f, t = rates(m.loader["ffcv"]), rates(m.loader["torch"])
    ratio = m.loader["ffcv"]["images_per_s"] / m.loader["torch"]["images_per_s"]
    if f["n"] < 2 or t["n"] < 2:
        return ratio, None
    return ratio, [f["ci95"][0] / t["ci95"][1], f["ci95"][1] / t["ci95"][0]]


def cell_loader(m: Machine) -> str:
    got = loader_ratio(m)
    if got is None:
        return "not measured"
    ratio, ci = got
    return (f"{m.loader['ffcv']['images_per_s']:,.0f} images/s, {ratio:.2f}× `torch` "
            f"({_ci(ci, '.2f', unit='×')}): {target_verdict('loader', ci)}")


def cell_e2e(m: Machine) -> str:
    if not m.e2e or "ffcv" not in m.e2e:
        return "not measured"
    r, rounds = m.e2e["ffcv"], m.e2e["ffcv"].get("epochs_timed")
    ci = r.get("overhead_vs_synthetic_ci95")
    return (f"{100 * r['overhead_vs_synthetic']:+.1f} % ({_ci(ci, '+.1f', 100, ' %')}; {rounds} rounds of "
            f"{r['train_images'] // 128 + bool(r['train_images'] % 128)} steps): {target_verdict('end_to_end', ci)}")


def startup_stats(m: Machine, key: str) -> dict | None:
    if not m.startup:
        return None
    return describe([_piece(run, key) for run in m.startup["warm"]])


def _cell_startup(key: str, name: str) -> Callable[[Machine], str]:
    def cell(m: Machine) -> str:
        stats = startup_stats(m, key)
        if stats is None:
            return "not measured"
        spec = spec_stats(m, "startup_s") if key == "startup_s" else None
        own = f"; the spec runs' own, which also compile the last partial batch: {_pm(spec, '.1f')} s" if spec else ""
        return (f"{_pm(stats, '.2f')} s ({_ci(stats['ci95'], '.2f', unit=' s')}, {stats['n']} warm runs of one step"
                f"{own}): {target_verdict(name, stats['ci95'] if stats['n'] > 1 else None)}")
    return cell


def cell_cold(m: Machine) -> str:
    """Start-up with empty compile caches, one step (bench_startup's cold run): one definition in every column."""
    cold = ((m.startup or {}).get("cold") or {}).get("startup_s")
    return f"{cold:.1f} s (one step)" if cold else "not measured"


def cell_utilisation(m: Machine) -> str:
    compute = (m.loader or {}).get("compute_only") or {}
    if "utilisation" not in compute:
        return "not measured (no probe at that commit)"
    probe = m.loader["env"]["attainable_fp32"]
    ci = compute.get("utilisation_ci95")
    return (f"{100 * compute['utilisation']:.1f} % ({_ci(ci, '.1f', 100, ' %')}) of {probe['gflops']:.0f} GFLOP/s, "
            f"{compute['images_per_s']:.0f} images/s: {target_verdict('utilisation', ci)}")


def cell_epoch_utilisation(m: Machine) -> str:
    values = [r["utilisation"]["mean_epoch"]["utilisation"] for r in m.runs if "utilisation" in r]
    if not values:
        return "not measured"
    gflops = describe([r["utilisation"]["mean_epoch"]["gflops"] for r in m.runs if "utilisation" in r])
    return f"{_pm(describe(values), '.1f', 100)} % ({gflops['mean']:.0f} GFLOP/s)"


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


def _summary_cells(m: Machine) -> list[str]:
    """The README's column: a few figures, each in a unit a newcomer reads without the docs."""
    def mean(key: str) -> float | None:
        stats = spec_stats(m, key)
        return stats["mean"] if stats else None

    total, epoch, test = mean("total_training_time_s"), mean("epoch_time_s"), mean("test_accuracy")
    util = [r["utilisation"]["mean_epoch"] for r in m.runs if "utilisation" in r]
    limit = [r["utilisation"]["attainable_gflops"] for r in m.runs if "utilisation" in r]
    warm = startup_stats(m, "startup_s")
    ratio = loader_ratio(m)
    e2e = (m.e2e or {}).get("ffcv")
    stages = ((schema.read_json(m.folder / "measure.json") or {}).get("stages") or {})
    took = sum(s.get("seconds", 0) for s in stages.values() if isinstance(s, dict))
    na = "not measured"
    return [
        f"{total / 60:.1f} min ({len(m.runs)} seeds)" if total else na,
        f"{epoch:.1f} s" if epoch else na,
        f"{100 * test:.1f} %" if test else na,
        (f"{describe([u['gflops'] for u in util])['mean']:.0f} of {describe(limit)['mean']:.0f} GFLOP/s "
         f"({100 * describe([u['utilisation'] for u in util])['mean']:.0f} %)") if util else na,
        (f"{warm['mean']:.1f} s warm, {cell_cold(m)} cold" if warm else na).replace(" (one step) cold", " cold"),
        f"{ratio[0]:.1f}× the DataLoader's images/s" if ratio else na,
        f"{100 * e2e['overhead_vs_synthetic']:+.1f} % epoch time" if e2e else na,
        f"{took / 60:.0f} min" if took else "– (measured before `make results`)",
    ]


SUMMARY = ["a spec run: 10 epochs, process start → last validation", "one epoch (45,000 images)",
           "test accuracy (10,000 images)", "training speed: of the CPU's measured limit",
           "start-up to the first step, `--compile`", "`ffcv` loader alone, vs PyTorch's DataLoader",
           "`ffcv` in training, vs no loading at all (`synthetic`)", "`make results` took"]


def summary(ms: list[Machine]) -> str:
    """The README's table: every column's few figures (mean over the seeds or runs)."""
    cells = [_summary_cells(m) for m in ms]
    lines = ["| | " + " | ".join(m.heading() for m in ms) + " |", "|---|" + "---:|" * len(ms)]
    lines += [f"| {label} | " + " | ".join(c[i] for c in cells) + " |" for i, label in enumerate(SUMMARY)]
    return "\n".join(lines)


def machine_line(m: Machine) -> str:
    note = m.note.get("note", "no record")
    return env_machine_line(m.env) or f"{m.label()}, {m.note.get('memory_gib', '?')} GiB ({note})"


def spec_table(m: Machine) -> list[str]:
    if not m.runs:
        return []
    rows = [("total training time (s)", "total_training_time_s", ".1f", 1),
            ("mean epoch time (s)", "epoch_time_s", ".1f", 1),
            ("inference per batch, forward alone (ms)", "inference_time_per_batch_ms", ".1f", 1),
            ("inference per batch, forward + wait for data (ms)", "inference_time_per_batch_incl_data_ms", ".1f", 1),
            ("last-epoch train loss", "last_epoch_train_loss", ".4f", 1),
            ("validation accuracy (%)", "val_accuracy", ".2f", 100),
            ("test accuracy (%)", "test_accuracy", ".2f", 100), ("data fraction", "data_fraction", ".4f", 1),
            ("start-up (s)", "startup_s", ".1f", 1), ("compile warm-up, all graphs (s)", "warm_up_s", ".1f", 1)]
    runs = sorted(m.runs, key=lambda r: r["config"]["seed"])
    out = [f"The spec, {len(runs)} seeds (`python -m fastcifar.bench --seeds {len(runs)} --name spec --compile "
           f"--export wat`; [results/{m.name}/spec/](results/{m.name}/spec/)):", "",
           f"| metric | mean ± sd | 95 % CI | per seed ({', '.join(str(r['config']['seed']) for r in runs)}) |",
           "|---|---:|---:|---:|"]
    for label, key, fmt, scale in rows:
        if not all(key in r for r in runs):
            continue
        stats = describe([r[key] for r in runs])
        out.append(f"| {label} | {_pm(stats, fmt, scale)} | {_ci(stats['ci95'], fmt, scale)} | "
                   + " / ".join(format(scale * r[key], fmt) for r in runs) + " |")
    ops = [r.get("device_op") for r in runs]
    if any(ops):
        out += ["", "Device op kept per seed: " + "; ".join(_op_text(op) for op in ops if op) + "."]
    return out + [""]


def _op_text(op: dict) -> str:
    times = ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in op.items() if k.endswith("_ms"))
    return f"{op['op']} ({times})"


def loader_table(m: Machine) -> list[str]:
    if not m.loader:
        return []
    rows = {k: v for k, v in m.loader.items() if isinstance(v, dict) and "images_per_s" in v and k != "compute_only"}
    base = rows.get("torch", {}).get("images_per_s")
    out = [f"Loaders, isolated (`python -m fastcifar.bench_loader`; [results/{m.name}/bench_loader.json]"
           f"(results/{m.name}/bench_loader.json)):", "",
           "| pipeline | images/s | vs `torch` | s / epoch (45,000) | headroom | device op kept |",
           "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        op = r.get("device_op")
        out.append(f"| {name} | {r['images_per_s']:,.0f} | {r['images_per_s'] / base:.2f}× | "
                   f"{r['seconds_per_epoch']:.2f} | "
                   f"{r.get('headroom', float('nan')):.0f}× | {_op_text(op) if op else '–'} |" if base else
                   f"| {name} | {r['images_per_s']:,.0f} | – | {r['seconds_per_epoch']:.2f} | – | – |")
    compute = m.loader.get("compute_only") or {}
    if compute:
        out += ["", f"Compute-only floor: {compute['images_per_s']:.0f} images/s"
                    + (f" ({_ci(compute.get('images_per_s_ci95'), '.0f')}), {compute['gflops']:.1f} GFLOP/s = "
                       f"{100 * compute['utilisation']:.1f} % of the attainable fp32 rate "
                       f"({_probe_text(m.loader['env']['attainable_fp32'])})" if "utilisation" in compute else "")
                + f"; {compute['steps']} steps x {compute.get('rounds', 1)} round(s)."]
    return out + [""]


def _probe_text(probe: dict) -> str:
    """'449 GFLOP/s, the conv probe (matmul 176, conv 449 GFLOP/s): <method>'."""
    return (f"{probe['gflops']:.0f} GFLOP/s, the {probe['kernel']} probe; matmul {probe['matmul']['gflops']:.0f}, "
            f"conv {probe['conv']['gflops']:.0f} GFLOP/s: {probe['method']}")


def e2e_table(m: Machine) -> list[str]:
    if not m.e2e:
        return []
    out = [f"Loaders, end to end (`python -m fastcifar.bench_loader --end-to-end`; "
           f"[results/{m.name}/bench_end_to_end.json]"
           f"(results/{m.name}/bench_end_to_end.json)):", "",
           "| pipeline | median epoch s | images/s | data fraction | vs synthetic (95 % CI) | vs memory (95 % CI) |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, r in m.e2e.items():
        if not (isinstance(r, dict) and "seconds" in r):
            continue
        memory = (f"{r['ratio_to_memory']:.3f}× ({_ci(r.get('ratio_to_memory_ci95'), '.3f')})"
                  if "ratio_to_memory" in r else "–")
        median = statistics.median(r["epoch_seconds"])  # of every round's epoch
        out.append(f"| {name} | {median:.2f} | {r['train_images'] / median:,.0f} | {r['data_fraction']:.3f} | "
                   f"{100 * r['overhead_vs_synthetic']:+.1f} % "
                   f"({_ci(r.get('overhead_vs_synthetic_ci95'), '+.1f', 100)})"
                   f" | {memory} |")
    return out + [""]


def startup_table(m: Machine) -> list[str]:
    if not m.startup:
        return []
    warm, cold = m.startup["warm"], m.startup["cold"]
    out = [f"Start-up (`python -m fastcifar.bench_startup -- {' '.join(m.startup['env'].get('trainer') or [])}`; "
           f"[results/{m.name}/bench_startup.json](results/{m.name}/bench_startup.json)): one step, seconds", "",
           f"| piece | cold | warm, median of {len(warm)} |", "|---|---:|---:|"]
    out += [f"| {k} | {cold[k]:.2f} | {statistics.median(run[k] for run in warm):.2f} |" for k in PIECES if k in cold]
    return out + [""]


def details(ms: list[Machine]) -> str:
    out: list[str] = []
    for m in ms:
        commits = m.commits()
        out += [f"### {m.label()} (`{m.name}`)", "",
                f"{machine_line(m)}. Measured {m.date()} at commit{'s' if len(commits) > 1 else ''} "
                f"{', '.join(commits)}.",
                ""]
        out += spec_table(m) + loader_table(m) + e2e_table(m) + startup_table(m)
    return "\n".join(out).rstrip()


def _piece(run: dict, key: str) -> float | None:
    """A start-up piece of one run; the data pipeline derived from its three pieces where a file predates it."""
    if key in run:
        return run[key]
    return sum(run[k] for k in DATA_PIPELINE) if key == "data_pipeline_s" else None


def startup_before_after(ms: list[Machine]) -> str:
    """Per machine with both: start-up before a change (startup/before-compile.json) and after it
    (bench_startup.json), cold and the median of the warm runs, with each one's commit."""
    out: list[str] = []
    for m in ms:
        before = schema.read_checked(m.folder / "startup" / "before-compile.json", schema.check_startup)
        if not (before and m.startup):
            continue
        cols = [("before", before), ("after", m.startup)]
        commits = [(b["env"].get("git_commit") or "?")[:7] for _, b in cols]
        out += [f"`{m.name}` ({m.label()}): `bench_startup -- --compile`, one step; before at {commits[0]}, after at "
                f"{commits[1]} ([before](results/{m.name}/startup/before-compile.json), "
                f"[after](results/{m.name}/bench_startup.json)).", "",
                f"| piece (s) | before, cold | before, warm median of {len(before['warm'])} | after, cold | "
                f"after, warm median of {len(m.startup['warm'])} |", "|---|---:|---:|---:|---:|"]
        for k in [*PIECES, "data_pipeline_s"]:
            cells = []
            for _, b in cols:
                cold, warm = _piece(b["cold"], k), [v for v in (_piece(r, k) for r in b["warm"]) if v is not None]
                cells += [f"{cold:.2f}" if cold is not None else "—",
                          f"{statistics.median(warm):.2f}" if warm else "—"]
            out.append(f"| `{k}` | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() or "No machine has a before/after pair yet."


SECTIONS = {"README.md": {"summary": summary}, "docs/benchmarks.md": {"headline": headline, "details": details},
            "docs/startup.md": {"before-after": startup_before_after}}


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


def render(root: Path, results: Path, check: bool = False) -> list[Path]:
    """Re-render the documents under root from results/; returns those that changed (check: would change).
    All or none: every document is rendered before any is written."""
    ms = machines(results)
    changed: dict[Path, str] = {}
    for name, sections in SECTIONS.items():
        path = root / name
        try:
            old = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise UserError(f"{path} not found: run from a checkout (or pass --root)") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        new = render_text(old, ms, sections, str(path))
        if new != old:
            changed[path] = new
    if not check:
        for path, new in changed.items():
            with atomic_path(path) as tmp:
                tmp.write_text(new, encoding="utf-8")
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
