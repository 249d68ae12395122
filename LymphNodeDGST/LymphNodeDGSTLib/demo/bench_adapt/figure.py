"""The benchmark's figure: Dice against shots per method, and the real-label bars.
"""

from __future__ import annotations

import math
from pathlib import Path

from LymphNodeDGSTLib.demo.bench_adapt.plan import METHODS, PHANTOM_TARGET, STS_TARGET


METHOD_COLOURS = {"none": "#777777", "full": "#1f77b4", "bias": "#ff7f0e", "norm": "#2ca02c",
                  "lora": "#9467bd", "random": "#8c564b", "static": "#e377c2", "dgst": "#d62728",
                  "dgst-ema": "#17becf", "dgst-split": "#bcbd22", "dgst-budget": "#7f7f7f"}


def write_figure(phantom: list[dict], sts: list[dict], path: Path, target: str = PHANTOM_TARGET) -> Path:
    """Site-B Dice (error bars: spread over seeds) and site-A Dice retained against shots, per
    method; STS Dice per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (2 if phantom else 0) + (1 if sts else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), dpi=110, squeeze=False)
    axes = list(axes[0])
    if phantom:
        site_b = f"dice_{target}_mean"
        for axis, column, title in ((axes[0], site_b, f"held-out {target} phantoms"),
                                    (axes[1], "dice_siteA_mean", "site-A phantoms (retained)")):
            _plot_against_shots(axis, phantom, column, with_spread=column == site_b, target=target)
            axis.set_title(title, fontsize=10)
        axes[0].legend(fontsize=8, loc="best")
    if sts:
        _plot_sts_bars(axes[-1], sts)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _plot_against_shots(axis, summary: list[dict], column: str, with_spread: bool,
                        target: str = PHANTOM_TARGET) -> None:
    for method in METHODS:
        points = [r for r in summary if r["method"] == method]
        if not points:
            continue
        style = {"color": METHOD_COLOURS[method], "label": method, "linewidth": 2.6 if method == "dgst" else 1.4}
        if method == "none":
            axis.axhline(points[0][column], linestyle="--", **style)
            continue
        offset = 0.06 * (METHODS.index(method) - len(METHODS) / 2)  # keeps error bars apart
        spread = [r[f"dice_{target}_std"] if with_spread else 0.0 for r in points]
        axis.errorbar([r["shots"] + offset for r in points], [r[column] for r in points],
                      yerr=[0.0 if math.isnan(value) else value for value in spread],
                      marker="o", capsize=3, **style)
    axis.set_xlabel("site-B training cases (shots)")
    axis.set_ylabel("Dice")
    axis.grid(alpha=0.3)
    shots = sorted({r["shots"] for r in summary if r["method"] != "none"})
    if shots:
        axis.set_xticks(shots)


def _plot_sts_bars(axis, summary: list[dict]) -> None:
    methods = [r["method"] for r in summary]
    means = [r[f"dice_{STS_TARGET}_mean"] for r in summary]
    spreads = [r[f"dice_{STS_TARGET}_case_std"] for r in summary]
    axis.bar(range(len(summary)), means, yerr=spreads, capsize=3, color=[METHOD_COLOURS[m] for m in methods])
    for x, (value, spread) in enumerate(zip(means, spreads)):
        axis.text(x, value + spread + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(summary)), methods, rotation=30)
    axis.set_ylim(0, max(0.1, max(m + s for m, s in zip(means, spreads)) * 1.15))
    axis.set_ylabel("Dice (error bars: spread over test cases)")
    axis.set_title(f"real CT, sarcoma GTV ({max(r['shots'] for r in summary)} training case(s))", fontsize=10)
    axis.grid(alpha=0.3, axis="y")
