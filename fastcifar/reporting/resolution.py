"""docs/benchmarks.md's resolution table: per measured quantity and committed machine, how much it moves between
separate processes, and so the smallest effect that column can tell (a verdict finer than that is noise)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from .columns import Machine
from .evidence import sweep_limit_ratios
from .stats import smallest_difference


def _ladder(m: Machine) -> tuple[list[float], str]:
    """The ladder's rung whose processes spread most (its resolution bounds every gain the ladder claims)."""
    if m.ladder is None:
        return [], ""
    rung = max(m.ladder.rungs, key=lambda r: smallest_difference([p.epoch_s for p in r.processes]) or 0)
    return [p.epoch_s for p in rung.processes], f" (its widest rung, `{rung.name}`)"


def _e2e(m: Machine) -> tuple[list[float], str]:
    files = m.e2e_files()
    whole = all(f.whole_epochs() for f in files)
    return ([1 + f.pipelines["ffcv"].overhead_vs_synthetic for f in files],
            "" if whole or not files else " (slices of epochs, before the rule)")


def _step_limit(m: Machine) -> tuple[list[float], str]:
    """The floor's processes where each measured its own limit, else the sweep with most default processes."""
    ratios = m.step_limit_ratios()
    return (ratios, " (the floor's processes)") if ratios else sweep_limit_ratios(m)


# (quantity, where it is measured, its values: one per separate process, and a note)
QUANTITIES: list[tuple[str, Callable[[Machine], tuple[list[float], str]]]] = [
    ("spec epoch time (s; each seed a process)", lambda m: ([r.epoch_time_s for r in m.runs], "")),
    ("compute-only step (ms; the floor's processes)",
     lambda m: (list(m.floor.floor.step_ms_per_process or []) if m.floor else [], "")),
    ("compute-only step over its own limit (each process its own)", _step_limit),
    ("loader alone: `ffcv` / `torch` images/s", lambda m: (m.loader_ratios(), "")),
    ("end to end: `ffcv`'s epoch / `synthetic`'s, same process", _e2e),
    ("start-up, `--compile`, warm (s; each run a process)",
     lambda m: ([r.startup_s for r in m.startup.warm] if m.startup else [], "")),
    ("the ladder: a rung's epoch (s)", _ladder),
]


def _cell(values: list[float], note: str) -> str:
    if len(values) < 2:
        return "not measured" if not values else "one process: not measured"
    sd = statistics.stdev(values) / abs(statistics.fmean(values))
    told = 100 * smallest_difference(values)
    return (f"{len(values)} processes, sd {100 * sd:.1f} % of the mean; smallest difference told: "
            f"{told:.{1 if told < 10 else 0}f} %{note}")


def table(ms: list[Machine]) -> str:
    lines = ["| quantity | " + " | ".join(f"`{m.name}`" for m in ms) + " |", "|---|" + "---|" * len(ms)]
    lines += [f"| {name} | " + " | ".join(_cell(*values(m)) for m in ms) + " |" for name, values in QUANTITIES]
    return "\n".join(lines)
