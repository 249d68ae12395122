"""Does choosing the cases to correct by the ranking help? (`lndgst bench select`)

Protocol (docs/benchmarks.md gives the figures):
- Foundation: the bundled demo model (site A). Pool: `pool` site-B phantoms (seeds 2000, 2001,
  ...), scored once by `adaptation.ranking.rank_folder` (the uncertainty pass of `segment`
  without --fast, diversity-aware order; the scores are cached in OUTPUT/rank_cache).
- For each shot count k, the k adaptation cases are chosen by (a) the ranking (its first k),
  (b) `draws` random draws (seeded, without replacement), (c) the lowest uncertainty (the k
  lowest scores). Each choice is adapted with the default adaptation of `bench adapt` (DGST,
  gamma 2, 40 iterations, lr 1e-2, training seed 0 for every run, so only the cases differ) and
  tested without mirroring on the same unseen site-B phantoms (3000, 3001, ...).
- Paired comparison per test phantom: ranked minus the mean of the random draws (and lowest
  minus random). 95 % intervals: a bootstrap that resamples both the test phantoms and the
  random draws (10,000 resamples, fixed seed), and a t interval over test phantoms.
- Each run is a fresh process (bench_adapt.run_in_child); finished runs go to runs.jsonl at once,
  and `resume` keeps them. Random-draw runs start while the pool is being scored.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from LymphNodeDGSTLib.demo.bench_adapt.plan import (PHANTOM_TARGET, SITE_B_POOL_SEED, SITE_B_TEST_SEED, CaseFile, RunSpec, write_phantom_case)
from LymphNodeDGSTLib.demo.bench_adapt import benchmark_foundation, open_output
from LymphNodeDGSTLib.demo.bench_adapt.tables import read_rows
from LymphNodeDGSTLib.demo.bench_adapt.runs import run_in_child
from LymphNodeDGSTLib.errors import UserInputError

TABLE_FILE, RESULTS_FILE = "results.md", "results.json"   # runs.jsonl and config.json: bench_adapt.open_output
Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class SelectConfig:
    pool: int = 20
    shots: tuple[int, ...] = (1, 3, 5)
    draws: int = 3
    site_b_tests: int = 4
    iterations: int = 40
    learning_rate: float = 1e-2
    gamma: int = 2
    method: str = "dgst"
    workers: int = 3                     # processes at a time (the pool's scoring is one of them)
    device: str = "cpu"
    crop_zyx: tuple[int, int, int] | None = None
    run_timeout_s: float = 3600.0

    def validate(self) -> "SelectConfig":
        if self.pool < 2 or self.draws < 1 or self.site_b_tests < 1 or self.iterations < 1 or self.workers < 1:
            raise UserInputError("bench select: --pool >= 2, --draws, --test-b, --iterations, --workers >= 1")
        if not self.shots or min(self.shots) < 1 or max(self.shots) >= self.pool:
            raise UserInputError(f"--shots: counts from 1 to {self.pool - 1} (the pool has {self.pool})")
        return self


def choose(strategy: str, k: int, order: list[str], scores: dict[str, float], draw: int,
           pool: list[str]) -> list[str]:
    """The k case ids a strategy picks: 'ranked' (ranking order), 'lowest' (lowest scores),
    'random' (draw `draw`, seeded by k and draw)."""
    if strategy == "ranked":
        return order[:k]
    if strategy == "lowest":
        return sorted(scores, key=lambda case: (scores[case], case))[:k]
    return random.Random(1000 * k + draw).sample(sorted(pool), k)


# Settings that only add or drop runs (each run's id names its shots and draw) or schedule them:
# a resumed benchmark may change these and keeps every run it already has.
EXTENSIBLE_SETTINGS = ("shots", "draws", "workers", "run_timeout_s")


def run_benchmark(config: SelectConfig, output: Path, resume: bool = False, say: Say = _say) -> dict:
    from LymphNodeDGSTLib.adaptation.cases.ranking import rank_folder
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    config.validate()
    archive = benchmark_foundation()
    output = Path(output).resolve()
    work = output / "work"
    runs_path = open_output(output, {"config": asdict(config)}, resume, EXTENSIBLE_SETTINGS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()

    store = ModelStore(work / "store")
    foundation = (store.resolve("foundation") if "foundation" in store.names()
                  else store.install(archive, name="foundation", show_progress=False)).path
    phantoms, pool_folder = work / "phantoms", work / "pool"
    pool_cases = {c.case_id: c for c in (write_phantom_case(phantoms, "B", SITE_B_POOL_SEED + j, config.crop_zyx)
                                         for j in range(config.pool))}
    tests = [write_phantom_case(phantoms, "B", SITE_B_TEST_SEED + i, config.crop_zyx)
             for i in range(config.site_b_tests)]
    pool_folder.mkdir(parents=True, exist_ok=True)
    for case in pool_cases.values():
        link = pool_folder / Path(case.image).name
        if not link.exists():
            link.symlink_to(case.image)

    done = {row["run_id"]: row for row in read_rows(runs_path) if row.get("status") == "ok"} if resume else {}
    rows: list[dict] = list(done.values())
    lock = threading.Lock()

    def spec(strategy: str, k: int, draw: int, train: list[str]) -> RunSpec:
        run_id = f"select-{strategy}-k{k}-d{draw}" if strategy != "none" else "select-none"
        settings = {"method": config.method, "gamma": config.gamma, "iterations": config.iterations,
                    "iterations_per_epoch": config.iterations, "val_iterations_per_epoch": 1,
                    "learning_rate": config.learning_rate, "seed": 0}
        return RunSpec(run_id, "select", "none" if strategy == "none" else config.method, k, draw,
                       str(foundation), [pool_cases[c] for c in train], {PHANTOM_TARGET: tests}, settings,
                       str(work / "runs" / run_id), str(work / "runs" / f"{run_id}.result.json"), config.device)

    def execute(strategy: str, k: int, draw: int, train: list[str]) -> None:
        run = spec(strategy, k, draw, train)
        previous = done.get(run.run_id)
        if previous and previous.get("train_cases") == train:
            return
        row = run_in_child(run, config.run_timeout_s)
        row.update(strategy=strategy, draw=draw, train_cases=train)
        with lock:
            with open(runs_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            rows.append(row)
        dice = row.get("dice_mean", {}).get(PHANTOM_TARGET)
        say(f"{run.run_id} {train}: " + (f"site-B Dice {dice:.3f}" if dice is not None else
                                         f"FAILED {row.get('error')}")
            + f" ({row.get('process_seconds', 0):.0f} s; {(time.perf_counter() - started) / 60:.1f} min in all)")

    ranking: dict = {}

    def score_pool() -> None:
        import torch
        torch.set_num_threads(1)
        segmenter = Segmenter.for_results_folder(foundation, device=config.device, name="foundation")
        results = rank_folder(pool_folder, segmenter, None, output / "rank_cache",
                              log=lambda line: say(f"score {line}"))
        ranking["results"] = results

    # Order: the smallest shot count complete first (its random draws run while the pool is scored),
    # so a benchmark cut short still has whole comparisons; the unadapted baseline last.
    with ThreadPoolExecutor(max_workers=config.workers) as executor:
        first = sorted(config.shots)[0]
        futures = [executor.submit(score_pool)]
        futures += [executor.submit(execute, "random", first, d, choose("random", first, [], {}, d, list(pool_cases)))
                    for d in range(config.draws)]
        futures[0].result()
        results = ranking["results"]
        case_of = {r.path: Path(r.path).name.replace("_ct.nii.gz", "") for r in results}
        order = [case_of[r.path] for r in results if r.status == "ok"]
        scores = {case_of[r.path]: float(r.score) for r in results if r.status == "ok"}
        say("ranking: " + ", ".join(f"{c} ({scores[c]:.2f})" for c in order))
        for k in sorted(config.shots):
            futures += [executor.submit(execute, strategy, k, 0, choose(strategy, k, order, scores, 0, list(pool_cases)))
                        for strategy in ("ranked", "lowest")]
            if k != first:
                futures += [executor.submit(execute, "random", k, d, choose("random", k, [], {}, d, list(pool_cases)))
                            for d in range(config.draws)]
        futures.append(executor.submit(execute, "none", 0, 0, []))
        for future in futures:
            future.result()
    report = summarise(rows, config, order, scores)
    write_reports(report, config, output, time.perf_counter() - started)
    return report


def bootstrap_interval(target: np.ndarray, draws: np.ndarray, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(target - mean over draws), resampling test cases and draws.
    target: (cases,); draws: (draws, cases)."""
    rng = np.random.default_rng(seed)
    cases, count = target.shape[0], draws.shape[0]
    stats = np.empty(resamples)
    for i in range(resamples):
        c = rng.integers(0, cases, cases)
        d = rng.integers(0, count, count)
        stats[i] = float(np.mean(target[c] - draws[np.ix_(d, c)].mean(axis=0)))
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def t_interval(differences: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    n = len(differences)
    if n < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, n - 1) * differences.std(ddof=1) / math.sqrt(n)
    return float(differences.mean() - half), float(differences.mean() + half)


def summarise(rows: list[dict], config: SelectConfig, order: list[str], scores: dict[str, float]) -> dict:
    ok = [r for r in rows if r.get("status") == "ok"]
    none = next((r for r in ok if r.get("strategy") == "none"), None)
    table = []
    for k in config.shots:
        by = {s: [r for r in ok if r.get("strategy") == s and r["shots"] == k] for s in ("ranked", "lowest", "random")}
        draws = sorted(by["random"], key=lambda r: r["draw"])
        if not draws:
            continue
        random_cases = np.array([r["dice"][PHANTOM_TARGET] for r in draws])
        line = {"shots": k, "random_draws": len(draws), "random_mean": float(random_cases.mean()),
                "random_draw_means": [float(m) for m in random_cases.mean(axis=1)],
                "random_train_cases": [r["train_cases"] for r in draws]}
        for strategy in ("ranked", "lowest"):
            if not by[strategy]:
                continue
            cases = np.array(by[strategy][0]["dice"][PHANTOM_TARGET])
            diff = cases - random_cases.mean(axis=0)
            line[strategy] = {"train_cases": by[strategy][0]["train_cases"], "dice_mean": float(cases.mean()),
                              "minus_random": float(diff.mean()),
                              "ci_bootstrap": bootstrap_interval(cases, random_cases),
                              "ci_t": t_interval(diff)}
        table.append(line)
    goal = {}
    for line in table:
        if line["shots"] in (1, 3) and "ranked" in line:
            ranked = line["ranked"]
            goal[line["shots"]] = ranked["minus_random"] >= 0.03 and ranked["ci_bootstrap"][0] > 0
    return {"unadapted": none["dice_mean"][PHANTOM_TARGET] if none else None, "table": table,
            "ranking": [{"case": c, "score": scores[c]} for c in order], "goal_met": goal,
            "failed": [r["run_id"] for r in rows if r.get("status") != "ok"]}


def write_reports(report: dict, config: SelectConfig, output: Path, seconds: float) -> None:
    text = ["# Case selection benchmark", "",
            f"Pool {config.pool} site-B phantoms, {config.site_b_tests} site-B test phantoms, "
            f"{config.method} {config.iterations} iterations lr {config.learning_rate:g}, {config.draws} random draws; "
            f"{seconds / 60:.1f} min.", "",
            f"Unadapted site-B Dice: {report['unadapted']:.3f}" if report["unadapted"] is not None else "", "",
            "| shots | ranked | lowest | random mean (draws) | ranked - random [95 % CI bootstrap; t] | lowest - random [95 % CI bootstrap] |",
            "|---|---|---|---|---|---|"]
    for line in report["table"]:
        ranked, lowest = line.get("ranked"), line.get("lowest")

        def cell(entry, with_t=False):
            if not entry:
                return "-"
            low, high = entry["ci_bootstrap"]
            extra = f"; {entry['ci_t'][0]:+.3f} .. {entry['ci_t'][1]:+.3f}" if with_t else ""
            return f"{entry['minus_random']:+.3f} [{low:+.3f} .. {high:+.3f}{extra}]"

        draws = ", ".join(f"{m:.3f}" for m in line["random_draw_means"])
        text.append(f"| {line['shots']} | {ranked['dice_mean']:.3f} | " if ranked else f"| {line['shots']} | - | ")
        text[-1] += (f"{lowest['dice_mean']:.3f} | " if lowest else "- | ") + \
            f"{line['random_mean']:.3f} ({draws}) | {cell(ranked, True)} | {cell(lowest)} |"
    text += ["", "Goal (ranked - random >= +0.03 with the bootstrap interval above 0, at 1 and 3 shots): "
             + ", ".join(f"{k} shot(s): {'met' if met else 'not met'}" for k, met in report["goal_met"].items()),
             "", "Ranking: " + ", ".join(f"{r['case']} {r['score']:.2f}" for r in report["ranking"])]
    if report["failed"]:
        text += ["", "Failed runs: " + ", ".join(report["failed"])]
    (output / TABLE_FILE).write_text("\n".join(text) + "\n")
    (output / RESULTS_FILE).write_text(json.dumps(report, indent=1))
