"""What the automatic schedule chose in `lndgst bench adapt --schedule auto` runs (issue 23).

For each output folder (and method): per run the probes' held-out Dice, the chosen rate, the kept
and the last iteration, why it stopped and the share of its time the probes took; then counts
over the runs. It reads runs.jsonl only (nothing is rerun), so it says what the grid and the
stopping rule did, not what another grid would have done: a run whose chosen rate stays in a
smaller grid would have run identically (same seed, same batches), the others are unknown.

    python Testing/benchmarks/schedule_choices.py OUT_C_AUTO:dgst OUT_C_AUTO_NORM:norm ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def auto_rows(folder: Path, method: str) -> list[dict]:
    path = folder / "runs.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("status") == "ok" and r["method"] == method
            and (r.get("schedule") or {}).get("kind") == "auto"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="FOLDER:METHOD")
    args = parser.parse_args()
    chosen, kept_at_probe, stops, total = Counter(), 0, Counter(), 0
    probe_share = []
    print("| folder:method | seed | probes (rate: held-out Dice) | chosen | kept / run | stop | probes' share of time |")
    print("|---|---|---|---|---|---|---|")
    for arm in args.arms:
        folder, _, method = arm.rpartition(":")
        for row in sorted(auto_rows(Path(folder), method), key=lambda r: r["seed"]):
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
    if not total:
        print("no automatic-schedule runs found")
        return 1
    print(f"\n{total} runs. Chosen rate: " + ", ".join(f"{rate:g} {count}x" for rate, count in sorted(chosen.items()))
          + f". Kept checkpoint = the winning probe itself: {kept_at_probe} of {total}. Stopped: "
          + ", ".join(f"{reason} {count}x" for reason, count in stops.items())
          + f". Probes' share of a run's schedule time: median {sorted(probe_share)[len(probe_share) // 2]:.0%}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
