"""Paired comparisons for the adaptation benchmark: Dice differences between two methods over the
same seeds (training cases and training seed) and the same test cases, with a 95 % interval."""

from __future__ import annotations

import math

import numpy as np


def paired_differences(rows: list[dict], part: str, target: str, method: str, reference: str,
                       shots: int) -> list[float]:
    """Dice(method) - Dice(reference) for every (seed, test case) both measured."""
    by_key: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if row.get("part") == part and row.get("status") == "ok" and row["shots"] == shots \
                and row["method"] in (method, reference):
            by_key[(row["method"], row["seed"])] = row["dice"][target]
    differences = []
    for (name, seed), scores in by_key.items():
        if name != method or (reference, seed) not in by_key:
            continue
        differences.extend(a - b for a, b in zip(scores, by_key[(reference, seed)]))
    return differences


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean; (mean, nan, nan) with under 2 values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def format_interval(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(low):
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
