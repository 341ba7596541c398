"""The targets docs/benchmarks.md defines and the one rule every rendered verdict follows."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .stats import prediction95

# name -> (comparison, bound, unit): the targets docs/benchmarks.md defines; labels and verdicts derive from them.
TARGETS = {
    "loader": (">=", 5.0, "×"),  # isolated `ffcv` / `torch` images/s
    "end_to_end": ("<=", 0.03, "%"),  # `ffcv`'s epoch over `synthetic`'s
    "startup": ("<=", 10.0, "s"),  # start-up with `--compile`, warm
    "data_pipeline": ("<=", 3.0, "s"),  # its data pipeline
    "utilisation": (">=", 0.65, "%"),  # compute-only floor / attainable fp32 rate
    "step_limit": ("<=", 1.15, "×"),  # the compute-only step / its own limit, per process (>= 5 processes)
}
# Separate processes a target's quantity needs before it is judged (the step's limit: 5; every other: 3).
PROCESSES_NEEDED = {"step_limit": 5}


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


def across_processes(name: str, values: Sequence[float]) -> tuple[list[float] | None, str]:
    """A target judged between processes, each value one process's: (the 95 % prediction interval of one more
    process — a user's run is one more —, the verdict). With fewer processes than the rule needs the verdict
    is "not resolved", whatever an interval within one process says."""
    need, n = PROCESSES_NEEDED.get(name, 3), len(values)
    pi = prediction95(list(values))
    if n < need:
        return pi, f"not resolved ({'one process' if n == 1 else f'{n} processes'}; the rule needs {need})"
    return pi, target_verdict(name, pi)
