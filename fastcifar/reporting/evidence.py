"""The tables of the evidence beside a column, each file with its own commit: the option sweeps (step-options*/,
options/) and the start-up rounds (startup/), rendered into docs/benchmarks.md and docs/startup.md."""

from __future__ import annotations

import statistics

from . import records
from .columns import Machine
from .records import PIECES
from .tables import _piece, _settings, settings
from .verdicts import across_processes, target


def startup_before_after(ms: list[Machine]) -> str:
    """Per machine with both: start-up before a change (startup/before-compile.json) and after it
    (bench_startup.json), cold and the median of the warm runs, with each one's commit."""
    out: list[str] = []
    for m in ms:
        before = m.startup_before
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


def _typical(run: dict) -> float:
    """A step_options process's step: its median round."""
    return statistics.median(run["floor"]["step_ms_per_round"])


def _step_limit_between_processes(runs: list[dict]) -> str:
    """The defaults' step against its own limit, each process its own ratio (its floor over the limit it
    measured), judged by the 95 % prediction interval of one more process: the target's rule."""
    ratios = [r["floor"]["step_ms"] / r["limit"]["step_ms"] for r in runs]
    if not ratios:
        return "No process of the defaults: no step-against-limit verdict from this sweep."
    pi, judged = across_processes("step_limit", ratios)
    where = f"one more process, 95 %: {pi[0]:.2f}–{pi[1]:.2f}×" if pi else "one process: no interval"
    return (f"The defaults' step against its own limit, per process: {', '.join(f'{v:.2f}×' for v in ratios)} "
            f"({where}); {target('step_limit')}: {judged}.")


def _by_settings(runs: list[dict]) -> dict[str, list[dict]]:
    """A sweep's processes by their settings, less the settings every process of it shares (the sweep's own
    defaults, labelled '(defaults)')."""
    common = dict(set.intersection(*(set(settings(r).items()) for r in runs)))
    by: dict[str, list[dict]] = {}
    for run in runs:
        by.setdefault(_settings(run, common), []).append(run)
    return by


def sweep_limit_ratios(m: Machine) -> tuple[list[float], str]:
    """The step over its own limit in the defaults' processes of the column's sweep that has most of them."""
    best: tuple[list[float], str] = ([], "")
    for folder, sweep in m.option_sweeps:
        runs = _by_settings([r for _, r in sweep]).get("(defaults)", []) if sweep else []
        ratios = [r["floor"]["step_ms"] / r["limit"]["step_ms"] for r in runs]
        if len(ratios) > len(best[0]):
            best = ratios, f" (the defaults of {folder.name}/)"
    return best


def step_options(ms: list[Machine]) -> str:
    """Per machine, per step-options*/ folder (one sweep each, its own baseline): each option's compiled step
    (step_breakdown's floor) in every process, against the defaults'. A process is judged by its median
    round (a single stalled round, seen with and without an option, moves a mean of 5 by 25 %); an option
    is kept only where every process of it beats every process of the defaults."""
    out: list[str] = []
    for m, folder, sweep in ((col, f, sweep) for col in ms for f, sweep in col.option_sweeps):
        runs = [r for _, r in sweep]
        if not runs:
            continue
        by = _by_settings(runs)
        base = [_typical(r) for r in by.get("(defaults)", [])]
        commits = sorted({(r["env"].get("git_commit") or "?")[:7] for r in runs})
        out += [f"`{m.name}` ({m.label()}), commit {', '.join(commits)}: the compute-only step "
                f"(`step_breakdown`'s floor, ms) in each process ([results/{m.name}/{folder.name}/]"
                f"(results/{m.name}/{folder.name}/)), each process's median round and, in brackets, the mean "
                "of its rounds; the step's limit in the same runs for scale.", "",
                "| settings | step ms per process: median round (mean) | mean of the medians | vs defaults | "
                "limit ms (mean) | kept? |", "|---|---:|---:|---:|---:|---|"]
        for name, group in sorted(by.items(), key=lambda kv: (kv[0] != "(defaults)", kv[0])):
            steps = [_typical(r) for r in group]
            mean = statistics.fmean(steps)
            limit = statistics.fmean(r["limit"]["step_ms"] for r in group)
            if name == "(defaults)" or not base:
                vs, kept = "", "the baseline" if name == "(defaults)" else "no baseline"
            else:
                vs = f"{100 * (mean / statistics.fmean(base) - 1):+.1f} %"
                kept = ("**yes**: every process faster than every one of the defaults" if max(steps) < min(base) else
                        "no: slower in every process" if min(steps) > max(base) else
                        "no: within the spread of the baseline's processes")
            each = " / ".join(f"{_typical(r):.1f} ({r['floor']['step_ms']:.1f})" for r in group)
            out.append(f"| {name} | {each} | {mean:.1f} | {vs} | {limit:.1f} | {kept} |")
        out += ["", _step_limit_between_processes(by.get("(defaults)", []))]
    return "\n".join(out).rstrip() or "No machine has step options measured yet."


# options/: bench_loader's compute-only floor, one process per file, a setting fixed per process (before
# step_breakdown existed); the label of each setting, and what its figures alone cannot say.
BENCH_OPTIONS = {
    "default": ("defaults (`--compile`, 2 torch threads)", ""),
    "omp-active": ("`OMP_WAIT_POLICY=ACTIVE` (OpenMP threads spin instead of sleeping)", ""),
    "max-autotune": ("`TORCHINDUCTOR_MAX_AUTOTUNE=1` (Inductor's CPU autotuning)", "; a longer cold compile"),
    "cpp-wrapper": ("`TORCHINDUCTOR_CPP_WRAPPER=1` (C++ wrapper, no Python between kernels)", ""),
    "eager": ("eager (`--no-compile`)", ""),
    "threads-1": ("one torch thread (`OMP_NUM_THREADS=1`)", "; half the cores idle"),
}


def _process_order(path) -> tuple[str, int]:
    """'default-2' -> ('default', 2); 'default' (and 'threads-1', an option's own name) is process 1."""
    if path.stem in BENCH_OPTIONS:
        return path.stem, 1
    stem, _, k = path.stem.rpartition("-")
    return (stem, int(k)) if k.isdigit() and stem else (path.stem, 1)


def bench_options(ms: list[Machine]) -> str:
    """Per machine with options/: each setting's compute-only floor in each of its processes, against the
    defaults' processes (kept only where every process beats every process of the defaults)."""
    out: list[str] = []
    for m in (m for m in ms if m.options):
        groups: dict[str, list] = {}
        for path, run in sorted(m.options, key=lambda pr: _process_order(pr[0])):
            groups.setdefault(_process_order(path)[0], []).append(run)
        base = [r.compute_only.images_per_s for r in groups.get("default", [])]
        commits = sorted({(r.env.git_commit or "?")[:7] for _, r in m.options})
        out += [f"`{m.name}` ({m.label()}), commit {', '.join(commits)}: `bench_loader`'s compute-only floor, "
                f"one process per file ([results/{m.name}/options/](results/{m.name}/options/)).", "",
                "| option | images/s per process | GFLOP/s per process | kept? |", "|---|---:|---:|---|"]
        order = list(BENCH_OPTIONS)
        for key in sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), k)):
            label, note = BENCH_OPTIONS.get(key, (f"`{key}`", ""))
            rates = [r.compute_only.images_per_s for r in groups[key]]
            gflops = " / ".join(f"{r.compute_only.gflops:.0f}" if r.compute_only.gflops else "–" for r in groups[key])
            if key == "default":
                kept = "the baseline"
            elif key == "eager":
                kept = "not the spec; shown for scale"
            elif not base:
                kept = "no baseline"
            else:
                kept = ("**yes**: every process faster than every one of the defaults" if min(rates) > max(base) else
                        "**rejected**: slower in every process" if max(rates) < min(base) else
                        "no: within the spread between processes of the defaults")
            out.append(f"| {label} | {' / '.join(f'{v:.0f}' for v in rates)} | {gflops} | {kept}{note} |")
        out.append("")
    return "\n".join(out).rstrip() or "No machine has options/ measured."


# startup/ of a column measured before and after a round of start-up cuts: (heading, file) per column; a run's
# own `startup` where the file is a trainer run (the spec's batch sizes).
FIRST_ROUND = [("`--compile` before", "before-compile.json"), ("after", "../bench_startup.json"),
               ("eager before", "before-eager.json"), ("after", "after-eager.json"),
               ("spec sizes before", "../spec/runs/ffcv-seed1.json"), ("after", "spec-seed1-1-epoch.json")]


def _cells(m: Machine, name: str) -> tuple[list, list | None] | None:
    """The warm runs' pieces (a list of runs) and the cold run of one column of FIRST_ROUND."""
    if name == "../bench_startup.json":
        return (list(m.startup["warm"]), m.startup["cold"]) if m.startup else None
    if name == "../spec/runs/ffcv-seed1.json":
        run = next((r for r in m.runs if r.config.seed == 1), None)
        return ([run.startup], None) if run is not None and run.startup is not None else None
    record = m.startup_files.get(name)
    if record is None:
        return None
    if isinstance(record, records.StartupFile):
        return list(record.warm), record.cold
    return ([record.startup], None) if getattr(record, "startup", None) is not None else None


def startup_first_round(ms: list[Machine]) -> str:
    """The first round of start-up cuts, per machine that kept all six of its files: each piece, the median of
    the warm runs (one run for the spec's sizes), before and after."""
    out: list[str] = []
    for m in ms:
        cols = [(head, _cells(m, name)) for head, name in FIRST_ROUND]
        if any(c is None for _, c in cols):
            continue
        out += ["| piece (s) | " + " | ".join(head for head, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
        for key in [*PIECES, "data_pipeline_s"]:
            cells = []
            for _, (warm, _cold) in cols:
                values = [v for v in (_piece(run, key) for run in warm) if v is not None]
                cells.append(f"{statistics.median(values):.2f}" if values else "—")
            out.append(f"| {'data pipeline' if key == 'data_pipeline_s' else f'`{key}`'} | " + " | ".join(cells) + " |")
        colds = [f"{cold['startup_s']:.2f}" if cold else "" for _, (_, cold) in cols]
        out.append("| cold `startup_s` | " + " | ".join(colds) + " |")
    return "\n".join(out) or "No machine kept the files of a first round."
