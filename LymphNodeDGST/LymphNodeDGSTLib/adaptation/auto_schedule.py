"""The automatic schedule: choose the learning rate by short probes, train at it with held-out
checks, stop when the checks stop improving (or at the budget), keep the best checkpoint.

1. Probes. Each rate of the grid starts a training run from the foundation (same seed, so the
   same batches and augmentations) that trains `probe_iterations` and is scored on the
   schedule's held-out cases. A probe that diverges scores nothing. The best score wins; a tie
   goes to the smaller rate. The other probes are dropped with their weights.
2. Training. The winning probe is not repeated: it simply goes on as the training run (its own
   random state kept aside while the other probes ran, so it is exactly the run a fresh start at
   that rate would be), and its probe score is the training run's first check. It is scored
   every `check_every` iterations; the weights at the best check are kept (a CPU copy); it stops
   after `patience` checks without a strictly better score, at `max_iterations` (nnU-Net's
   polynomial decay runs over this cap), when the budget is spent, or when it diverges after a
   first check. A grid of one rate is not probed: its run starts as the training run.
3. The budget (seconds) counts from the start of step 1. It is checked before every iteration and
   before every scoring; a scoring that has started finishes. If it runs out while the rate is
   being chosen or before the training run's first check, nothing is published and the error
   says why. Nothing is published before training has stopped.

Everything chosen and seen goes into `ScheduleOutcome.record` (the report's `schedule`).
`auto_fine_tune` is the automatic schedule's `fine_tune`: the same results folder, scored on the
given held-out cases; the adaptation pipeline and the benchmark call it. `run_auto_schedule`
takes any `Scorer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from LymphNodeDGSTLib.adaptation import schedule_messages as say
from LymphNodeDGSTLib.adaptation.held_out_dice import HeldOutCase, HeldOutScorer, Scorer
from LymphNodeDGSTLib.adaptation.nnunet_dataset import PreparedDataset
from LymphNodeDGSTLib.adaptation.schedule import AutoSchedule
from LymphNodeDGSTLib.adaptation.trainer import (FineTuneResult, FineTuneSettings, TrainingDiverged,
                                                 write_results_folder)
from LymphNodeDGSTLib.adaptation.training_run import TrainingRun
from LymphNodeDGSTLib.engine.store.models import ModelVersion
from LymphNodeDGSTLib.errors import Cancelled, UserInputError


CLOCK = time.monotonic  # what the budget is measured with (tests put a scripted clock here)

# nnU-Net's pseudo-validation batches per epoch of the training run (an epoch ends at every
# check): the held-out checks are the evidence here, so one batch only keeps the panel's training
# curve alive. Probes run the same settings: the winner goes on as the training run.
PSEUDO_VALIDATION_ITERATIONS = 1


class BudgetSpent(Exception):
    """Raised between iterations (or before a scoring) when the time budget is over."""


class NothingScored(UserInputError):
    """The budget ran out before any checkpoint of the training run was scored: nothing published."""


class ScheduleReporter(Protocol):
    def progress(self, done: int, total: int, stage: str | None = None, **extra: Any) -> None: ...
    def metric(self, name: str, value: float, **extra: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def cancelled(self) -> bool: ...


class QuietReporter:
    """A ScheduleReporter for callers without a job (the benchmark): says nothing, never cancels."""

    def progress(self, done: int, total: int, stage: str | None = None, **extra: Any) -> None:
        pass

    def metric(self, name: str, value: float, **extra: Any) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False


@dataclass
class ScheduleOutcome:
    weights: dict                 # the best checkpoint's weights (CPU)
    result: FineTuneResult        # the training run's history; weight change of `weights`
    learning_rate: float
    record: dict                  # the report's `schedule`


@dataclass
class _Best:
    iteration: int
    dice: float
    weights: dict


def auto_fine_tune(foundation_checkpoint: dict, parent: ModelVersion, dataset: PreparedDataset,
                   work_dir: Path, base: FineTuneSettings, auto: AutoSchedule,
                   schedule_cases: list[HeldOutCase], device: torch.device,
                   reporter: ScheduleReporter | None = None,
                   fold: int | str = 0) -> tuple[FineTuneResult, dict]:
    """The automatic schedule scored on `schedule_cases` with the product's segmenter; the best
    checkpoint written as `fine_tune` writes its results folder (`work_dir/results`). Returns
    the training run's result and the schedule record (chosen rate, probes, curve, stop)."""
    reporter = reporter or QuietReporter()

    def check_cancelled() -> None:
        if reporter.cancelled():
            raise Cancelled("adaptation cancelled")

    reporter.progress(0, len(schedule_cases), stage="probe",
                      detail="preparing the held-out cases that choose the schedule")
    scorer = HeldOutScorer(parent, schedule_cases, str(device), before_each_case=check_cancelled)
    outcome = run_auto_schedule(foundation_checkpoint, dataset, work_dir, base, auto, scorer, device,
                                reporter, reference=scorer.score_loaded)
    del scorer  # its network copy and preprocessed cases are not needed any more
    write_results_folder(outcome.result, outcome.weights, foundation_checkpoint, dataset, base, fold)
    return outcome.result, outcome.record


def run_auto_schedule(foundation_checkpoint: dict, dataset: PreparedDataset, work_dir: Path,
                      base: FineTuneSettings, auto: AutoSchedule, scorer: Scorer,
                      device: torch.device, reporter: ScheduleReporter,
                      reference: Callable[[], float] | None = None,
                      clock: Callable[[], float] | None = None) -> ScheduleOutcome:
    """Probe, train, keep the best (see the module docstring). `reference` scores the parent on
    the same cases (the curve's iteration 0); Cancelled, TrainingDiverged (every rate) and
    NothingScored publish nothing."""
    auto.validate()
    clock = clock or CLOCK
    started = clock()
    deadline = started + auto.budget_s if auto.budget_s is not None else None

    def within_budget(stage: str) -> None:
        if deadline is not None and clock() >= deadline:
            raise BudgetSpent(stage)

    def should_stop() -> bool:  # the trainer calls it before every iteration
        within_budget("")
        return reporter.cancelled()

    def check_cancelled() -> None:
        if reporter.cancelled():
            raise Cancelled("adaptation cancelled")

    record: dict[str, Any] = {"kind": "auto", **auto.describe()}
    settings = replace(base, iterations=auto.max_iterations, iterations_per_epoch=auto.check_every,
                       val_iterations_per_epoch=PSEUDO_VALIDATION_ITERATIONS)
    try:
        if reference is not None:
            record["reference_dice"] = reference()
            reporter.log(f"held-out Dice of the parent: {record['reference_dice']:.3f}")
        rate, record["probes"], chosen = _choose_rate(foundation_checkpoint, dataset, work_dir,
                                                      settings, auto, scorer, device, reporter,
                                                      should_stop, within_budget, check_cancelled)
    except BudgetSpent:
        raise NothingScored(say.nothing_published_text(auto.budget_s, "probe")) from None
    record["chosen_rate"] = rate
    best_probe = max((p["dice"] for p in record["probes"] if p["dice"] is not None), default=None)
    reporter.log(say.chosen_rate_text(rate, best_probe, len(record["probes"])))

    curve: list[dict] = []
    best: _Best | None = None
    detail = f"training at learning rate {rate:g}"

    def on_iteration(done: int, total: int, loss: float) -> None:
        reporter.progress(done, total, stage="train", loss=round(loss, 5), detail=detail)

    def on_epoch(epoch: int, values: dict) -> None:
        reporter.metric("train_loss", values["train_loss"], epoch=epoch)
        reporter.metric("pseudo_dice", values["pseudo_dice"], epoch=epoch)

    if chosen is None:
        run = TrainingRun(foundation_checkpoint, dataset, work_dir / "training",
                          replace(settings, learning_rate=rate), device, should_stop=should_stop)
    else:
        run = chosen.run
    run.set_callbacks(on_iteration, on_epoch)
    stale = 0

    def check(iteration: int, dice: float, weights: dict) -> bool:
        """Record one check; True when patience has run out."""
        nonlocal best, stale, detail
        curve.append({"iteration": iteration, "dice": dice, "seconds": round(clock() - started, 2)})
        if best is None or dice > best.dice:
            best, stale = _Best(iteration, dice, weights), 0
        else:
            stale += 1
        detail = say.check_text(dice, iteration, best.dice, best.iteration)
        reporter.log(detail)
        reporter.metric("held_out_dice", dice, iteration=iteration)
        reporter.progress(iteration, auto.max_iterations, stage="train", detail=detail)
        return stale >= auto.patience

    with run:
        try:
            done = chosen is not None and check(chosen.iteration, chosen.dice, chosen.weights)
            while not done and run.iteration < auto.max_iterations:
                run.advance_to(min(run.iteration + auto.check_every, auto.max_iterations))
                within_budget("train")
                weights = run.weights()
                done = check(run.iteration, scorer.score(weights), weights)
            stop_reason = say.STOP_PATIENCE if done else say.STOP_MAX_ITERATIONS
        except BudgetSpent:
            stop_reason = say.STOP_BUDGET
        except TrainingDiverged as error:
            if best is None:
                raise
            stop_reason = say.STOP_DIVERGED
            reporter.log(str(error).split(";")[0])
        if best is None:
            raise NothingScored(say.nothing_published_text(auto.budget_s, "train"))
        check_cancelled()
        result = run.result(best.weights, work_dir / "results")
        iterations_run = run.iteration

    stop = say.stop_text(stop_reason, auto.patience, auto.max_iterations, auto.budget_s)
    reporter.log(stop)
    reporter.log(say.kept_text(best.iteration, best.dice, iterations_run))
    reporter.progress(iterations_run, iterations_run, stage="train", detail=stop)
    record.update({"curve": curve, "iterations_run": iterations_run, "best_iteration": best.iteration,
                   "best_dice": best.dice, "stop_reason": stop_reason, "stop_text": stop,
                   "seconds": round(clock() - started, 2)})
    return ScheduleOutcome(best.weights, result, rate, record)


@dataclass
class _Probe:
    run: TrainingRun
    iteration: int
    dice: float
    weights: dict


def _choose_rate(foundation_checkpoint: dict, dataset: PreparedDataset, work_dir: Path,
                 settings: FineTuneSettings, auto: AutoSchedule, scorer: Scorer, device: torch.device,
                 reporter: ScheduleReporter, should_stop: Callable[[], bool],
                 within_budget: Callable[[str], None],
                 check_cancelled: Callable[[], None]) -> tuple[float, list[dict], _Probe | None]:
    """The best rate of the grid by probe runs, every probe's record, and the winning probe's run
    (still open: it goes on as the training run). No probe for a grid of one rate."""
    if len(auto.rates) == 1:
        return auto.rates[0], [], None
    probes: list[dict] = []
    count, length = len(auto.rates), auto.probe_iterations
    leader: _Probe | None = None
    try:
        for index, rate in enumerate(auto.rates, start=1):
            check_cancelled()
            text = say.probe_text(index, count, rate)
            reporter.log(text)
            offset = (index - 1) * length

            def on_iteration(done: int, total: int, loss: float, offset=offset, text=text) -> None:
                reporter.progress(offset + done, count * length, stage="probe", detail=text)

            reporter.progress(offset, count * length, stage="probe", detail=text)
            probe_started = time.perf_counter()
            run = TrainingRun(foundation_checkpoint, dataset, work_dir / f"run_{index}",
                              replace(settings, learning_rate=rate), device,
                              on_iteration=on_iteration, should_stop=should_stop)
            dice: float | None = None
            try:
                run.advance_to(length)
                weights = run.weights()
                within_budget("probe")
                dice = scorer.score(weights)
            except TrainingDiverged:
                pass
            finally:
                if dice is None or not _leads(dice, rate, leader):
                    run.close()  # dropped with its weights
            if dice is not None and _leads(dice, rate, leader):
                if leader is not None:
                    leader.run.close()
                leader = _Probe(run, run.iteration, dice, weights)
            probes.append({"rate": rate, "dice": dice, "diverged": dice is None,
                           "seconds": round(time.perf_counter() - probe_started, 2)})
            reporter.log(say.probe_result_text(rate, dice, length))
            if dice is not None:
                reporter.metric("probe_dice", dice, rate=rate)
    except BaseException:
        if leader is not None:
            leader.run.close()
        raise
    if leader is None:
        raise TrainingDiverged(f"training diverged at every learning rate of the grid "
                               f"({', '.join(f'{r:g}' for r in auto.rates)}); nothing was published; "
                               "try lower --rates")
    return leader.run.settings.lr, probes, leader


def _leads(dice: float, rate: float, leader: _Probe | None) -> bool:
    """Better than the leading probe; a tie goes to the smaller rate."""
    return leader is None or (dice, -rate) > (leader.dice, -leader.run.settings.lr)
