"""Issue 23's goals: the default path (automatic schedule) against fixed settings, seed by seed.

Each ARM is one `lndgst bench adapt` output folder (and a method in it), run on the same seeds,
shift, shots and test phantoms. The seed is the unit: per seed, an arm's score is its mean Dice
over the test phantoms; the difference between two arms is taken per seed, and the 95 % interval
is Student's t over the seeds (test phantoms that share one training run are not independent).
A "best of" arm takes, per seed, the fixed folder whose *mean over all seeds* is best (the grid's
best setting, chosen on the test phantoms: an optimistic reference, which is the hard one to match).

    python Testing/benchmarks/compare_schedules.py --shots 3 --target siteB \
        --arm auto=OUT_AUTO:dgst --arm old=OUT_OLD:dgst-ema \
        --grid OUT_LR3e-3:dgst --grid OUT_LR1e-2:dgst --grid OUT_LR3e-2:dgst --grid OUT_LR1e-1:dgst \
        --reference auto

Section 2 (methods under the automatic schedule): one arm per method, `--reference` once per
method the others are compared with (dgst, norm, random). The table gives the mean share of
weights changed and the site adapter's size estimated from it (`adapter_megabytes`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "LymphNodeDGST"))

from LymphNodeDGSTLib.demo.bench_paired import format_interval, mean_interval  # noqa: E402

# The demo network's floating-point entries, each counted once (nnU-Net's aliases shared), as
# `weight_change_summary` counts them: the denominator of a run's `weights_changed_share`.
DEMO_NETWORK_ENTRIES = 1_116_006


def adapter_megabytes(changed_share: float, entries: int) -> float:
    """The site adapter's size estimated from the share of entries changed: per changed entry a
    uint16 index gap and a float32 value (6 bytes), at most the dense tensors (4 bytes per entry).
    An estimate: the real file chooses sparse or dense per tensor (engine/store/adapters.py)."""
    return min(6 * changed_share * entries, 4 * entries) / 1e6


def per_seed(folder: Path, method: str, shots: int, target: str) -> dict[int, dict]:
    """seed -> {"dice": mean target Dice over the test cases, "siteA": ..., "seconds": ...}."""
    rows = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()]
    found = {}
    for row in rows:
        if row.get("part") == "phantom" and row.get("status") == "ok" and row["method"] == method \
                and row["shots"] == shots:
            found[row["seed"]] = {"dice": float(np.mean(row["dice"][target])),
                                  "siteA": float(np.mean(row["dice"]["siteA"])),
                                  "seconds": row["seconds"], "rate": row.get("learning_rate"),
                                  "iterations": row.get("iterations"),
                                  "changed": row.get("weights_changed_share")}
    return found


def parse_arm(text: str) -> tuple[str, Path, str]:
    label, _, rest = text.partition("=")
    folder, _, method = rest.rpartition(":")
    return label, Path(folder), method


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", action="append", default=[], help="LABEL=FOLDER:METHOD")
    parser.add_argument("--grid", action="append", default=[], help="FOLDER:METHOD of one fixed setting "
                        "(together: the 'best fixed' arm)")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--target", default="siteB")
    parser.add_argument("--reference", action="append", default=[],
                        help="label of an arm every other is compared with (may repeat)")
    parser.add_argument("--entries", type=int, default=DEMO_NETWORK_ENTRIES,
                        help="floating-point entries of the network (adapter size estimate; default: "
                             "the demo network's)")
    parser.add_argument("--none", type=Path, help="a folder holding the unadapted run (site-A retention)")
    args = parser.parse_args()

    arms: dict[str, dict[int, dict]] = {}
    for text in args.arm:
        label, folder, method = parse_arm(text)
        if not (folder / "runs.jsonl").is_file():
            print(f"arm {label}: {folder} holds no runs yet; left out")
            continue
        arms[label] = per_seed(folder, method, args.shots, args.target)
    if args.grid:
        candidates = {}
        for text in args.grid:
            folder, _, method = text.rpartition(":")
            candidates[f"{Path(folder).name}:{method}"] = per_seed(Path(folder), method, args.shots, args.target)
        means = {name: np.mean([v["dice"] for v in runs.values()]) for name, runs in candidates.items() if runs}
        for name, mean in sorted(means.items(), key=lambda item: -item[1]):
            print(f"grid {name}: mean {args.target} Dice {mean:.4f} over {len(candidates[name])} seeds")
        best = max(means, key=means.get)
        arms[f"best fixed ({best})"] = candidates[best]
    seeds = sorted(set.intersection(*(set(runs) for runs in arms.values())))
    print(f"\nseeds measured by every arm: {seeds} ({args.shots} shots, target {args.target})\n")
    unadapted_a = None
    if args.none:
        rows = [json.loads(line) for line in (args.none / "runs.jsonl").read_text().splitlines() if line.strip()]
        unadapted_a = next(float(np.mean(r["dice"]["siteA"])) for r in rows if r["method"] == "none")
    print("| arm | mean Dice | per seed | site-A Dice | training s (median) | weights changed | "
          "adapter MB (est.) | rate; iterations (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in arms.items():
        dice = [runs[s]["dice"] for s in seeds]
        site_a = np.mean([runs[s]["siteA"] for s in seeds])
        kept = f" ({site_a / unadapted_a:.1%} of unadapted)" if unadapted_a else ""
        print(f"| {label} | {np.mean(dice):.4f} | {', '.join(f'{d:.3f}' for d in dice)} | {site_a:.4f}{kept} | "
              f"{np.median([runs[s]['seconds'] for s in seeds]):.0f} | {changed_text(runs, seeds, args.entries)} | "
              + ", ".join(f"{runs[s]['rate']:g}; {runs[s]['iterations']}" for s in seeds) + " |")
    for reference_label in args.reference:
        reference = arms[reference_label]
        print(f"\nPaired over seeds, {reference_label} minus each arm (mean [95 % t interval]):\n")
        for label, runs in arms.items():
            if label == reference_label:
                continue
            differences = [reference[s]["dice"] - runs[s]["dice"] for s in seeds]
            mean, low, high = mean_interval(differences)
            ratio = np.median([reference[s]["seconds"] for s in seeds]) / max(
                np.median([runs[s]["seconds"] for s in seeds]), 1e-9)
            print(f"- vs {label}: {format_interval(mean, low, high)}; wall time ratio {ratio:.2f}"
                  + ("" if not math.isnan(low) else " (one seed: no interval)"))
    return 0


def changed_text(runs: dict[int, dict], seeds: list[int], entries: int) -> str:
    """`0.83 % | 0.056` (mean share of weights changed | adapter MB), or `- | -` when not recorded."""
    shares = [runs[s]["changed"] for s in seeds if runs[s].get("changed") is not None]
    if not shares:
        return "- | -"
    share = float(np.mean(shares))
    return f"{100 * share:.2f} % | {adapter_megabytes(share, entries):.3f}"


if __name__ == "__main__":
    sys.exit(main())
