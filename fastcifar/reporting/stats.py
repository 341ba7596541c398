"""The statistics every results table quotes: mean, sample sd, min, max and the 95 % interval of the mean;
and, for a quantity that varies between processes, the 95 % prediction interval of one more process."""

from __future__ import annotations

import math
import statistics

# Student t, two-sided 95 %: t(0.975, df) for df = 1..30; beyond, the normal 1.96 is within 4 %.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def _t975(n: int) -> float:
    """Student t(0.975) for a sample of n (n - 1 degrees of freedom)."""
    return T975[n - 2] if n - 1 <= len(T975) else 1.96


def describe(values: list[float]) -> dict:
    """n, mean, sample sd, min, max and the 95 % confidence interval of the mean (Student t)."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = _t975(n) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values),
            "ci95": [mean - half, mean + half]}


def prediction95(values: list[float]) -> list[float] | None:
    """Where one more sample (one more process) lands 95 % of the time, from `values` (Student t,
    mean ± t·sd·√(1 + 1/n)); None with fewer than 2. Why not the interval of the mean: that narrows as
    processes are added, while each new process (a training run's) still varies as much as any one did."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = _t975(n) * sd * math.sqrt(1 + 1 / n)
    return [mean - half, mean + half]


def percent_interval(ci: list[float] | None) -> str:
    """A relative 95 % interval (e.g. an overhead) in percent, "-" when there is none (one round)."""
    return "-" if not ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] %"


def ratio95(before: list[float], after: list[float]) -> dict:
    """How many times faster `after` is than `before` (times, e.g. seconds per epoch, each from its own
    processes): the ratio of their geometric means, and its 95 % interval between processes — Welch's t on
    the logarithms (unequal spreads, Welch-Satterthwaite degrees of freedom); None with fewer than 2 each.
    `resolved`: the interval excludes 1 (a difference the processes can tell)."""
    la, lb = [math.log(v) for v in before], [math.log(v) for v in after]
    diff = statistics.fmean(la) - statistics.fmean(lb)
    out = {"ratio": math.exp(diff), "ci95": None, "resolved": False}
    if len(la) < 2 or len(lb) < 2:
        return out
    va, vb = statistics.variance(la) / len(la), statistics.variance(lb) / len(lb)
    se = math.sqrt(va + vb)
    if se == 0:
        return {**out, "ci95": [out["ratio"], out["ratio"]], "resolved": diff != 0}
    df = (va + vb) ** 2 / (va ** 2 / (len(la) - 1) + vb ** 2 / (len(lb) - 1))
    t = T975[max(1, min(len(T975), int(df))) - 1] if df <= len(T975) else 1.96  # rounded down: wider
    low, high = math.exp(diff - t * se), math.exp(diff + t * se)
    return {**out, "ci95": [low, high], "resolved": low > 1 or high < 1}


def decimals(low: float, high: float) -> int:
    """No more digits than the spread supports: the last one shown at the order of the interval's half-width."""
    half = (high - low) / 2
    return max(0, min(3, -math.floor(math.log10(half)))) if half > 0 else 2


def smallest_difference(values: list[float]) -> float | None:
    """The smallest relative difference between two configurations, each measured in as many processes as
    `values` and spread as they are, that a 95 % two-sided t-test tells apart: t(2n - 2) · sd · √(2/n) / mean
    (the resolution of a column for that quantity). None with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    return _t975(2 * n - 1) * statistics.stdev(values) * math.sqrt(2 / n) / abs(statistics.fmean(values))
