"""The ladder (`fastcifar.ladder`: plain PyTorch to fastcifar, one change per rung) as a typed record, and its
table: docs/benchmarks.md's section and the README's row read it through here only."""

from __future__ import annotations

import math
import statistics
from typing import Annotated

from pydantic import Field, model_validator

from .fields import Count, Fraction, Interval, Record, Recorded, Seconds, close
from .stats import decimals


class Ratio(Record):
    ratio: Annotated[float, Field(allow_inf_nan=False, gt=0, le=1e6)]
    ci95: Interval | None = None
    resolved: bool

    @model_validator(mode="after")
    def _agrees(self) -> Ratio:
        if self.ci95 is not None and not self.ci95[0] * (1 - 1e-9) <= self.ratio <= self.ci95[1] * (1 + 1e-9):
            raise ValueError(f"ratio {self.ratio:g} lies outside its own interval {self.ci95}")
        if self.resolved != bool(self.ci95 and (self.ci95[0] > 1 or self.ci95[1] < 1)):
            raise ValueError("resolved does not say whether the interval excludes 1")
        return self


class Described(Record):
    n: Count
    mean: Seconds
    ci95: Interval | None = None  # none from one process


class Process(Record):
    round: Count
    file: str
    epoch_s: Seconds
    images: Count
    data_fraction: Fraction


class Rung(Record):
    name: str
    adds: str
    flags: list[str]
    env: dict[str, str]
    processes: Annotated[list[Process], Field(min_length=1)]
    epoch_s: Described
    gain: Ratio | None = None

    @model_validator(mode="after")
    def _agrees(self) -> Rung:
        times = [p.epoch_s for p in self.processes]
        if self.epoch_s.n != len(times) or not close(statistics.fmean(times), self.epoch_s.mean):
            raise ValueError(f"rung {self.name}: epoch_s is not the mean of its {len(times)} processes")
        if len({p.images for p in self.processes}) != 1:
            raise ValueError(f"rung {self.name}: its processes timed epochs of different sizes")
        return self


def _log_ratio(before: Rung, after: Rung) -> float:
    mean = statistics.fmean
    return math.exp(mean(math.log(p.epoch_s) for p in before.processes)
                    - mean(math.log(p.epoch_s) for p in after.processes))


class LadderFile(Recorded):
    rungs: Annotated[list[Rung], Field(min_length=2)]
    speedup: Ratio
    order: Annotated[list[list[str]], Field(min_length=1)]
    seed: int
    warm_up_steps: Count
    processes: Count

    @model_validator(mode="after")
    def _agrees(self) -> LadderFile:
        names = [r.name for r in self.rungs]
        if len(self.order) != self.processes or any(sorted(o) != sorted(names) for o in self.order):
            raise ValueError("order: not one permutation of the rungs per round")
        for r in self.rungs:
            if [p.round for p in r.processes] != list(range(1, self.processes + 1)):
                raise ValueError(f"rung {r.name}: not one process per round")
        for before, after in zip(self.rungs, self.rungs[1:], strict=False):
            if after.gain is None or not close(after.gain.ratio, _log_ratio(before, after)):
                raise ValueError(f"rung {after.name}: gain is not its epochs' ratio to {before.name}'s")
        if not close(self.speedup.ratio, _log_ratio(self.rungs[0], self.rungs[-1])):
            raise ValueError("speedup is not the last rung's epochs' ratio to the first's")
        return self


def _interval(r: Ratio) -> str:
    if not r.ci95:
        return f"{r.ratio:.2f}× (one process)"
    d = decimals(*r.ci95)
    return f"{r.ratio:.{d}f}× ({r.ci95[0]:.{d}f}–{r.ci95[1]:.{d}f})"


def readme_cell(lad: LadderFile | None) -> str:
    """The README's row: plain PyTorch -> fastcifar per epoch, its interval between processes and commit."""
    if lad is None:
        return "not measured"
    verdict = "" if lad.speedup.resolved else ", not resolved"
    return f"{_interval(lad.speedup)} per epoch{verdict}, {lad.processes} processes ({(lad.env.git_commit or '?')[:7]})"


def section(columns: list[tuple[str, str, LadderFile | None]]) -> str:
    """docs/benchmarks.md: each machine's ladder (its folder, its label, its record), one row per rung."""
    parts = []
    for name, label, lad in columns:
        if lad is None:
            parts.append(f"**{label}**: not measured (`make results STAGES=ladder`).")
            continue
        rows = [f"**{label}** ([ladder/ladder.json](results/{name}/ladder/ladder.json), "
                f"[picture](results/{name}/ladder/ladder.png); commit {(lad.env.git_commit or '?')[:7]}, "
                f"{lad.processes} processes per rung, rounds in a random order from seed {lad.seed}, one epoch "
                f"timed whole after {lad.warm_up_steps} untimed steps, {lad.rungs[0].processes[0].images:,} "
                "images):", "",
                "| rung | adds | s per epoch (95 % interval of the mean; digits as its spread allows) | "
                "gain over the rung before (95 %) |",
                "|---|---|---:|---:|"]
        for r in lad.rungs:
            e = r.epoch_s
            d = decimals(*e.ci95) if e.ci95 else 1
            ci = f" ({e.ci95[0]:.{d}f}–{e.ci95[1]:.{d}f})" if e.ci95 else " (one process)"
            gain = "–" if r.gain is None else _interval(r.gain) + ("" if r.gain.resolved else ", not resolved")
            rows.append(f"| {r.name} | {r.adds} | {e.mean:.{d}f}{ci} | {gain} |")
        s = lad.speedup
        rows += ["", f"Plain PyTorch → fastcifar, same model, this machine: **{_interval(s)} per epoch**"
                 + ("" if s.resolved else " — not resolved") + "."]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)
