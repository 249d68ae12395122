"""What the automatic schedule chose in `lndgst bench adapt --schedule auto` runs (issue 23).

For each output folder (and method): per run the probes' held-out Dice, the chosen rate, the kept
and the last iteration, why it stopped and the share of its time the probes took; then counts
over the runs. It reads runs.jsonl only (nothing is rerun), so it says what the grid and the
stopping rule did, not what another grid would have done: a run whose chosen rate stays in a
smaller grid would have run identically (same seed, same batches), the others are unknown.

    python Testing/benchmarks/schedule_choices.py OUT_C_AUTO:dgst OUT_C_AUTO_NORM:norm ...

With `--fixed FOLDER:METHOD` (repeatable: fixed-rate runs of the same method, seeds and test
phantoms, one rate per folder) it also asks whether the probes picked well: per seed, the test
phantoms' Dice of the fixed run at the rate the probes chose against the best fixed rate of that
seed (chosen in hindsight on the test phantoms), and the regret between them. The fixed runs
train on all the site's cases for a fixed length, the automatic schedule holds one out, so this
measures the probes' ranking of the rates, not the schedule's final Dice.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def schedule_rows(folder: Path, method: str, kind: str) -> list[dict]:
    """The finished runs of `method` in a bench output folder whose schedule is `kind` (auto, fixed)."""
    path = folder / "runs.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("status") == "ok" and r["method"] == method
            and (r.get("schedule") or {}).get("kind") == kind]


def fixed_dice(arms: list[str]) -> dict[tuple[str, int], dict[float, float]]:
    """(method, seed) -> {rate: mean Dice over the target test phantoms} of fixed-rate runs."""
    found: dict[tuple[str, int], dict[float, float]] = {}
    for arm in arms:
        folder, _, method = arm.rpartition(":")
        for row in schedule_rows(Path(folder), method, "fixed"):
            found.setdefault((method, row["seed"]), {})[row["learning_rate"]] = target_dice(row)
    return found


def target_dice(row: dict) -> float:
    """Mean Dice over the shifted site's test phantoms (the key that is not site A)."""
    values = [v for key, v in row["dice_mean"].items() if key != "siteA"]
    return float(values[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="FOLDER:METHOD")
    parser.add_argument("--fixed", action="append", default=[], metavar="FOLDER:METHOD",
                        help="fixed-rate runs to judge the probes' pick against (repeatable)")
    args = parser.parse_args()
    fixed = fixed_dice(args.fixed)
    picks = []
    chosen, kept_at_probe, stops, total = Counter(), 0, Counter(), 0
    probe_share = []
    print("| folder:method | seed | probes (rate: held-out Dice) | chosen | kept / run | stop | probes' share of time |")
    print("|---|---|---|---|---|---|---|")
    for arm in args.arms:
        folder, _, method = arm.rpartition(":")
        for row in sorted(schedule_rows(Path(folder), method, "auto"), key=lambda r: r["seed"]):
            schedule = row["schedule"]
            probes = schedule["probes"]
            length = (schedule.get("settings") or {}).get("probe_iterations", 20)
            probe_seconds = sum(p["seconds"] for p in probes)
            share = probe_seconds / schedule["seconds"] if schedule["seconds"] else float("nan")
            probe_share.append(share)
            chosen[schedule["chosen_rate"]] += 1
            kept_at_probe += schedule["best_iteration"] == length
            stops[schedule["stop_reason"]] += 1
            total += 1
            text = ", ".join(f"{p['rate']:g}: {'diverged' if p['dice'] is None else format(p['dice'], '.3f')}"
                             for p in probes)
            print(f"| {Path(folder).name}:{method} | {row['seed']} | {text} | {schedule['chosen_rate']:g} | "
                  f"{schedule['best_iteration']} / {schedule['iterations_run']} | {schedule['stop_reason']} | "
                  f"{share:.0%} |")
            grid = fixed.get((method, row["seed"]))
            if grid:
                best = max(grid, key=grid.get)
                at_pick = grid.get(schedule["chosen_rate"])
                picks.append((row["seed"], schedule["chosen_rate"], best, at_pick, grid[best]))
    if not total:
        print("no automatic-schedule runs found")
        return 1
    print(f"\n{total} runs. Chosen rate: " + ", ".join(f"{rate:g} {count}x" for rate, count in sorted(chosen.items()))
          + f". Kept checkpoint = the winning probe itself: {kept_at_probe} of {total}. Stopped: "
          + ", ".join(f"{reason} {count}x" for reason, count in stops.items())
          + f". Probes' share of a run's schedule time: median {sorted(probe_share)[len(probe_share) // 2]:.0%}.")
    if picks:
        print_picks(picks)
    return 0


def print_picks(picks: list[tuple[int, float, float, float | None, float]]) -> None:
    """The probes' pick against the best fixed rate of each seed (Dice on the test phantoms)."""
    print("\n| seed | probes chose | fixed Dice at that rate | best fixed rate | its Dice | regret |")
    print("|---|---|---|---|---|---|")
    regrets = []
    for seed, chosen, best, at_pick, best_dice in picks:
        regret = None if at_pick is None else best_dice - at_pick
        if regret is not None:
            regrets.append(regret)
        shown = "not in the fixed grid" if at_pick is None else f"{at_pick:.3f}"
        print(f"| {seed} | {chosen:g} | {shown} | {best:g} | {best_dice:.3f} | "
              f"{'-' if regret is None else format(regret, '.3f')} |")
    same = sum(chosen == best for _, chosen, best, _, _ in picks)
    print(f"\nThe probes chose the seed's best fixed rate in {same} of {len(picks)} runs"
          + (f"; mean regret {sum(regrets) / len(regrets):.3f} Dice over the {len(regrets)} runs whose "
             f"chosen rate is in the fixed grid." if regrets else "."))


if __name__ == "__main__":
    sys.exit(main())
