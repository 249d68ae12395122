"""The benchmark's rows turned into tables: summaries per method and shots, paired differences
with bootstrap intervals, attribution and tuning tables, and the written reports.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
import numpy as np

from LymphNodeDGSTLib.demo.bench_adapt.figure import write_figure
from LymphNodeDGSTLib.demo.bench_adapt.plan import (BenchConfig, BenchOutputs, FIGURE_FILE, METHODS, RESULTS_FILE, SPARSE, STS_TARGET, STS_TEST, STS_TRAIN, TABLE_FILE, TUNE_POOL_SEED, VALIDATION_SEED, phantom_target)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
    return rows


def describe_row(row: dict) -> str:
    what = f"{row['part']} {row['method']} shots={row['shots']} seed={row['seed']}"
    if row.get("status") != "ok":
        return f"{what}: FAILED ({row.get('error')}); see {row.get('log')}"
    dice = ", ".join(f"{name} Dice {value:.3f}" for name, value in row["dice_mean"].items())
    if row["method"] == "none":
        return f"{what}: {dice}"
    return (f"{what}: {dice}; {100 * row['weights_changed_share']:.2f} % of weights changed, "
            f"{row['seconds']:.0f} s, peak {row['peak_rss_mb']:.0f} MB")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def summarise(rows: list[dict], part: str, target: str) -> list[dict]:
    """One row per (method, shots): means over runs, and two spreads of the target Dice: over
    runs (seeds) and over test cases (pooled)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row.get("part") == part and row.get("status") == "ok":
            groups.setdefault((row["method"], row["shots"]), []).append(row)
    order = {method: index for index, method in enumerate(METHODS)}
    summary = []
    for (method, shots), group in sorted(groups.items(), key=lambda item: (item[0][1], order[item[0][0]])):
        means = [r["dice_mean"][target] for r in group]
        cases = [d for r in group for d in r["dice"][target]]
        adapted = method != "none"
        summary.append({
            "method": method,
            "shots": shots,
            "runs": len(group),
            f"dice_{target}_mean": float(np.mean(means)),
            f"dice_{target}_std": float(np.std(means, ddof=1)) if len(means) > 1 else float("nan"),
            f"dice_{target}_case_std": float(np.std(cases)),
            "dice_siteA_mean": float(np.mean([r["dice_mean"]["siteA"] for r in group])),
            "weights_changed_share": float(np.mean([r["weights_changed_share"] for r in group])),
            "seconds": float(np.mean([r["seconds"] for r in group])) if adapted else 0.0,
            "peak_rss_mb": float(np.mean([r["peak_rss_mb"] for r in group])) if adapted else float("nan"),
        })
    return summary


def table_columns(target: str) -> list[str]:
    return ["method", "shots", "runs", f"dice_{target}_mean", f"dice_{target}_std", f"dice_{target}_case_std",
            "dice_siteA_mean", "weights_changed_share", "seconds", "peak_rss_mb"]


def markdown_table(summary: list[dict], target: str) -> str:
    columns = table_columns(target)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in columns) + " |")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if column == "weights_changed_share":
        return f"{100 * value:.3g} %"
    if column == "seconds":
        return f"{value:.1f}"
    if column == "peak_rss_mb":
        return f"{value:.0f}"
    if column.startswith("dice"):
        return f"{value:.3f}"
    return str(value)


PAIRED_REFERENCES = ("norm", "random", "dgst")


def paired_table(rows: list[dict], part: str, target: str) -> str:
    """Per adapting method and shot count: paired Dice differences against norm, random and dgst
    (mean [95 % interval] over seeds x test cases), and the site-A Dice kept relative to none."""
    from LymphNodeDGSTLib.demo.bench_paired import format_interval, mean_interval, paired_differences

    ok = [r for r in rows if r.get("part") == part and r.get("status") == "ok"]
    baseline = [r["dice_mean"]["siteA"] for r in ok if r["method"] == "none" and "siteA" in r["dice_mean"]]
    present = {r["method"] for r in ok}
    references = [m for m in PAIRED_REFERENCES if m in present]
    lines = ["| method | shots | pairs | " + " | ".join(f"vs {m}" for m in references) + " | siteA kept |",
             "|---|---|---|" + "---|" * len(references) + "---|"]
    for shots in sorted({r["shots"] for r in ok if r["method"] != "none"}):
        for method in [m for m in METHODS if m in present and m != "none"]:
            group = [r for r in ok if r["method"] == method and r["shots"] == shots]
            if not group:
                continue
            cells = []
            pairs = 0
            for reference in references:
                differences = [] if reference == method else paired_differences(ok, part, target, method,
                                                                                 reference, shots)
                pairs = max(pairs, len(differences))
                cells.append(format_interval(*mean_interval(differences)) if differences else "-")
            kept = (float(np.mean([r["dice_mean"]["siteA"] for r in group])) / baseline[0]
                    if baseline and baseline[0] > 0 else float("nan"))
            lines.append(f"| {method} | {shots} | {pairs} | " + " | ".join(cells)
                         + f" | {'-' if math.isnan(kept) else f'{100 * kept:.1f} %'} |")
    return "\n".join(lines)


def attribution_table(rows: list[dict], part: str, target: str) -> str:
    """Per sparse method and shots (means over runs): Dice, Dice with the convolution changes
    undone, with the always-trained changes undone; share of the squared weight change per part;
    re-selection rate and picks per entry."""
    from LymphNodeDGSTLib.adaptation.weight_attribution import PARTS

    ok = [r for r in rows if r.get("part") == part and r.get("status") == "ok" and r.get("change_share")]
    lines = ["| method | shots | runs | Dice | conv undone | always-trained undone | "
             + " | ".join(f"{p} share" for p in PARTS) + " | re-selected | picks/entry |",
             "|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|"]

    def mean_of(values) -> str:
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.3f}" if values else "-"

    for shots in sorted({r["shots"] for r in ok}):
        for method in [m for m in METHODS if m in SPARSE]:
            group = [r for r in ok if r["method"] == method and r["shots"] == shots]
            if not group:
                continue
            cells = [mean_of(r["dice_mean"].get(target) for r in group),
                     mean_of(r["dice_mean"].get(f"{target}_conv_reset") for r in group),
                     mean_of(r["dice_mean"].get(f"{target}_always_reset") for r in group)]
            cells += [f"{100 * np.mean([r['change_share'][p] for r in group]):.1f} %" for p in PARTS]
            cells += [mean_of(r.get("reselection_rate") for r in group),
                      mean_of(r.get("picks_per_entry") for r in group)]
            lines.append(f"| {method} | {shots} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(rows: list[dict], chosen: dict[str, float]) -> str:
    """Validation Dice per method (rows) and learning rate (columns); the chosen rate in bold."""
    tune = [r for r in rows if r.get("part") == "tune" and r.get("status") == "ok"]
    rates = sorted({r["learning_rate"] for r in tune})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for method in [m for m in METHODS if any(r["method"] == m for r in tune)]:
        cells = []
        for lr in rates:
            found = [r["dice_mean"]["validation"] for r in tune if r["method"] == method and r["learning_rate"] == lr]
            text = f"{found[0]:.3f}" if found else "-"
            cells.append(f"**{text}**" if chosen.get(method) == lr else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(rows: list[dict], config: BenchConfig, output: Path, sts_skipped: str | None,
                  learning_rates: dict[str, float] | None = None) -> BenchOutputs:
    target = phantom_target(config.shift)
    phantom = summarise(rows, "phantom", target)
    sts = summarise(rows, "sts", STS_TARGET)
    failed = [row["run_id"] for row in rows if row.get("status") != "ok"]
    run_seconds = sum(row.get("process_seconds") or 0.0 for row in rows)
    text = [
        "# Adaptation benchmark",
        "",
        f"Machine: {machine_description(config.device)}. Date: {time.strftime('%Y-%m-%d %H:%M')}.",
        "Protocol: " + ("the automatic schedule (iterations and rate chosen per run)" if config.schedule == "auto"
                        else f"{config.iterations} iterations per fine-tune")
        + f", learning rate {config.learning_rate_wording()}, gamma {config.gamma}; "
        + (f"{config.seeds} seed(s) for the phantom part; " if config.phantoms else "")
        + "evaluation without mirroring"
        + (f"; images centre-cropped to {config.crop_zyx} (z, y, x) voxels" if config.crop_zyx else "") + ".",
        f"Run time: {len(rows)} run{'' if len(rows) == 1 else 's'}, {_minutes(run_seconds)} in all "
        "(sum over the runs' processes, setup excluded).",
        "",
        f"## Phantoms: site-A demo model adapted to site {config.shift} ({config.site_b_tests} site-{config.shift} "
        f"and {config.site_a_tests} site-A test phantoms)"
        + ("; sparse methods selection-only (norms, biases and head frozen)" if config.selection_only else ""),
        "",
        markdown_table(phantom, target) if phantom
        else ("phantom part skipped (--skip-phantoms)" if not config.phantoms else "(no phantom runs)"),
        "",
    ]
    if learning_rates is not None:
        text += ["### Learning rates chosen on held-out training-site cases",
                 "", f"Each method adapted on site-{config.shift} phantoms {TUNE_POOL_SEED}.. "
                 f"({config.tune_shots} cases) and was scored on validation phantoms {VALIDATION_SEED}.. "
                 f"({config.validation_cases}); never on the test phantoms.", "",
                 tuning_table(rows, learning_rates), ""]
    if phantom:
        text += ["### Paired differences in site-" + config.shift + " test Dice",
                 "", "Mean [95 % t-interval] of Dice(method) - Dice(reference) over (seed, test case) pairs; "
                 "siteA kept: mean site-A Dice relative to the unadapted model.", "",
                 paired_table(rows, "phantom", target), ""]
        if any(r.get("change_share") for r in rows if r.get("part") == "phantom"):
            text += ["### Attribution and selection persistence (sparse methods)", "",
                     attribution_table(rows, "phantom", target), ""]
    text += [
        "## Real labels: soft-tissue sarcoma CT (adapt on "
        + (", ".join(STS_TRAIN[:config.sts_train_cases]) + "; test on " + ", ".join(STS_TEST[:config.sts_test_cases]) + ")"),
        "",
        markdown_table(sts, STS_TARGET) if sts else (sts_skipped or "(no real-label runs)"),
        "",
        "dice_*_std: spread over seeds of each run's mean (sample standard deviation; '-' with one run); "
        "dice_*_case_std: spread over the test cases of all runs; dice_siteA_mean: Dice retained on "
        "unseen site-A phantoms (forgetting); weights_changed_share: share of the weights that differ "
        "bitwise from the foundation; seconds: fine-tune wall time; peak_rss_mb: peak resident memory of "
        "the fine-tuning process (fresh process per run).",
    ]
    if failed:
        text += ["", f"Failed runs (left out): {', '.join(failed)}"]
    table = output / TABLE_FILE
    table.write_text("\n".join(text) + "\n")
    figure = write_figure(phantom, sts, output / FIGURE_FILE, target) if phantom or sts else None
    results = output / RESULTS_FILE
    results.write_text(json.dumps({"config": asdict(config), "machine": machine_description(config.device),
                                   "phantom": phantom, "sts": sts, "sts_skipped": sts_skipped,
                                   "learning_rates": learning_rates, "failed": failed}, indent=1))
    return BenchOutputs(output, rows, table, figure, results, sts_skipped, failed)


def machine_description(device: str) -> str:
    cores = os.cpu_count() or 0
    text = f"{platform.machine()} {platform.system()}, {cores} CPU cores, device {device}"
    if device.startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            text += f" ({torch.cuda.get_device_name(0)})"
    return text
