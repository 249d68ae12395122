"""The adaptation benchmark: DGST against every comparison method, on phantoms and real labels.

Protocol (one for all methods; docs/benchmarks.md gives the reasons):
- Foundation: the bundled demo model (a 4-stage PlainConvUNet trained on site-A phantoms).
- Part 1, phantom domain shift. Per seed, a pool of site-B phantoms is drawn (seed s: phantoms
  2000 + 100 s, 2000 + 100 s + 1, ...); shot count k adapts on the first k of them (nested:
  1 shot is in 3, 3 are in 5), and the seed is also the training seed. Every adapted model is
  tested on the same unseen site-B phantoms (3000, 3001, ...) and, for forgetting, on unseen
  site-A phantoms (6000, 6001, ...). "none" is the unadapted model, tested once.
- Part 2, real labels. The soft-tissue-sarcoma CTs of ../shared/data/sts: adapt on a fixed five
  (STS_TRAIN), test on the other five (STS_TEST); the site-A phantoms again measure forgetting.
- Every method gets the same iterations (one epoch, nnU-Net's PolyLR per iteration, SGD 0.99
  Nesterov, deep supervision, batch and patch of the foundation's plans) and the same learning
  rate (default 1e-2; `learning_rate=None` gives each method its authors' rate instead).
- Each run (fine-tune, then evaluation) is a fresh Python process: its peak RSS, read with
  getrusage right after fine-tuning, is the fine-tune's own peak (augmentation runs in-process,
  nnUNet_n_proc_DA=0), never one inherited from an earlier run. Evaluation is nnU-Net's sliding
  window without mirroring (`segment --fast`).
- Each finished run is appended to runs.jsonl at once, so an interrupted benchmark keeps what it
  measured (and `resume` skips it next time); tables, figure and results.json come at the end.

The child process entry point is `python -m LymphNodeDGSTLib.demo.bench_adapt.runs RUN_SPEC.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.demo.bench_adapt.plan import (BenchConfig, BenchOutputs, CONFIG_FILE, RUNS_FILE, RunSpec, Say, chosen_learning_rates, crop_case, plan_runs, plan_tuning, sts_cases)
from LymphNodeDGSTLib.demo.bench_adapt.tables import _minutes, describe_row, read_rows, write_reports




# --------------------------------------------------------------------------------------------
# Data


# --------------------------------------------------------------------------------------------
# Planning


# --------------------------------------------------------------------------------------------
# The child: one fine-tune and its evaluation, in a fresh process


# --------------------------------------------------------------------------------------------
# The parent: the whole benchmark

# Settings that change no measurement (a run's time limit) or only add or drop runs (a seed's cases
# depend only on that seed): a resumed benchmark may change these and keeps the runs it has.
EXTENSIBLE_SETTINGS = ("run_timeout_s", "seeds")
# Settings added after benchmarks were measured, with the value that means what those measured:
# a stored config.json without one of them compares as if it held this value.
ADDED_SETTINGS = {"auto_settings": {}}


def benchmark_foundation() -> Path:
    """The shipped demo model zip every benchmark adapts; a usage error when it is missing."""
    from LymphNodeDGSTLib.demo.demo_model import locate_demo_model

    archive = locate_demo_model()
    if archive is None:
        raise UserInputError("the demo model is missing (LymphNodeDGST/Resources/DemoModel/lymphnode-demo.zip)")
    return archive


def same_settings(stored: dict, wanted: dict, extensible: tuple[str, ...] = ()) -> bool:
    """True when two config documents' "config" entries agree, keys in `extensible` aside (settings
    that only add or drop runs, so a resumed benchmark may change them)."""
    def measured(document: dict) -> dict:
        config = {**ADDED_SETTINGS, **(document.get("config") or {})}
        return {key: value for key, value in config.items() if key not in extensible}
    return measured(stored) == measured(json.loads(json.dumps(wanted)))


def open_output(output: Path, document: dict, resume: bool, extensible: tuple[str, ...] = ()) -> Path:
    """Make `output` ready for a benchmark described by `document`: when resuming, refuse a folder
    measured with other settings and keep its runs; else start runs.jsonl afresh. Writes
    config.json; returns the path of runs.jsonl."""
    runs_path = output / RUNS_FILE
    if resume and (output / CONFIG_FILE).is_file():
        if not same_settings(json.loads((output / CONFIG_FILE).read_text()), document, extensible):
            raise UserInputError(f"--resume: {output} holds a benchmark with other settings; "
                                 "use another --output or drop --resume")
    elif runs_path.exists():
        runs_path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).write_text(json.dumps(document, indent=1))
    return runs_path


def run_benchmark(config: BenchConfig, output: Path, resume: bool = False, say: Say = print) -> BenchOutputs:
    """Run every planned run (skipping those already in runs.jsonl when resuming); write
    results.md, results.json and the figure into `output`."""
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    config.validate()
    archive = benchmark_foundation()
    output = Path(output).resolve()
    work = output / "work"
    runs_path = open_output(output, {"config": asdict(config), "foundation": str(archive)}, resume,
                            extensible=EXTENSIBLE_SETTINGS)

    started = time.perf_counter()
    store_root = work / "store"
    shutil.rmtree(store_root, ignore_errors=True)
    foundation = ModelStore(store_root).install(archive, name="foundation", show_progress=False).path
    sts = None
    sts_skipped = None
    if config.sts:
        found = sts_cases(config)
        if isinstance(found, str):
            sts_skipped = found
            say(found)
        else:
            sts = ([crop_case(c, work / "sts", config.crop_zyx) for c in found[0]],
                   [crop_case(c, work / "sts", config.crop_zyx) for c in found[1]])
            say(f"real labels: adapting on {', '.join(c.case_id for c in sts[0])}; "
                f"testing on {', '.join(c.case_id for c in sts[1])}")
    else:
        sts_skipped = "real-label part skipped (--skip-sts)"
    done = {row["run_id"]: row for row in read_rows(runs_path) if row.get("status") == "ok"} if resume else {}
    tuning_rows: list[dict] = []
    learning_rates = None
    if config.tune_lrs and config.phantoms:
        tuning = plan_tuning(config, foundation, work)
        say(f"tuning: {len(tuning)} runs on held-out site-{config.shift} cases")
        tuning_rows = _run_specs(tuning, done, config, runs_path, started, say)
        learning_rates = chosen_learning_rates(tuning_rows)
        say("chosen learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in learning_rates.items()))
    plan = plan_runs(config, foundation, work, sts, say, learning_rates)
    rows = tuning_rows + _run_specs(plan, done, config, runs_path, started, say)

    outputs = write_reports(rows, config, output, sts_skipped, learning_rates)
    say(f"wrote {outputs.table}, {outputs.results}" + (f", {outputs.figure}" if outputs.figure else "")
        + f" ({_minutes(time.perf_counter() - started)} in all)")
    return outputs


def report_from_runs(output: Path) -> BenchOutputs:
    """Write results.md, results.json and the figure from the runs already in OUTPUT/runs.jsonl
    (an interrupted or cut-short benchmark); the tables say which runs exist."""
    output = Path(output).resolve()
    if not (output / CONFIG_FILE).is_file() or not (output / RUNS_FILE).is_file():
        raise UserInputError(f"--report-only: {output} holds no benchmark (config.json and runs.jsonl)")
    stored = json.loads((output / CONFIG_FILE).read_text())["config"]
    stored = {key: tuple(value) if isinstance(value, list) else value for key, value in stored.items()}
    config = BenchConfig(**stored)
    rows = read_rows(output / RUNS_FILE)
    learning_rates = chosen_learning_rates(rows) if config.tune_lrs else None
    skipped = None if config.sts else "real-label part skipped (--skip-sts)"
    return write_reports(rows, config, output, skipped, learning_rates)


def _run_specs(plan: list[RunSpec], done: dict[str, dict], config: BenchConfig, runs_path: Path,
               started: float, say: Say) -> list[dict]:
    """Run what is not already done; every row in plan order (done ones reused)."""
    # imported here: the package must not import `runs`, the child's `-m` entry point (runpy warns
    # in every run log when a package has already imported the module it is asked to run)
    from LymphNodeDGSTLib.demo.bench_adapt.runs import run_in_child
    rows = [done[spec.run_id] for spec in plan if spec.run_id in done]
    todo = [spec for spec in plan if spec.run_id not in done]
    iterations = ("iterations chosen by the schedule" if config.schedule == "auto"
                  else f"{config.iterations} iterations each")
    say(f"{len(plan)} runs ({len(plan) - len(todo)} already measured), {iterations}, "
        f"learning rate {config.learning_rate_wording()}, "
        f"device {config.device}; rows go to {runs_path}")
    measured_seconds: list[float] = []
    for index, spec in enumerate(todo, 1):
        row = run_in_child(spec, config.run_timeout_s)
        with open(runs_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
        if spec.method != "none":
            measured_seconds.append(row["process_seconds"])
        remaining = sum(1 for s in todo[index:] if s.method != "none")
        eta = remaining * float(np.mean(measured_seconds)) if measured_seconds else 0.0
        say(f"[{index}/{len(todo)}] {describe_row(row)} | elapsed {_minutes(time.perf_counter() - started)}, "
            f"about {_minutes(eta)} left")
    return rows


# --------------------------------------------------------------------------------------------
# Reports


