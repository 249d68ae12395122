"""What the automatic schedule says it is doing, in words (job log, progress `detail`, panel).

The job's progress events carry these texts in a `detail` field and the same words go to the job
log, so a terminal, `lndgst jobs show` and the panel all show one wording.
"""

from __future__ import annotations

from LymphNodeDGSTLib.adaptation.schedule import format_seconds

# Why training stopped (the report's `stop_reason`).
STOP_PATIENCE = "no_improvement"
STOP_MAX_ITERATIONS = "max_iterations"
STOP_BUDGET = "budget"
STOP_DIVERGED = "diverged"
STOP_FIXED = "fixed"


def probe_text(index: int, count: int, rate: float) -> str:
    return f"choosing the learning rate ({index} of {count}: trying {rate:g})"


def probe_result_text(rate: float, dice: float | None, iterations: int) -> str:
    if dice is None:
        return f"learning rate {rate:g}: training diverged within {iterations} iterations"
    return f"learning rate {rate:g}: held-out Dice {dice:.3f} after {iterations} iterations"


def chosen_rate_text(rate: float, dice: float | None, probed: int) -> str:
    if probed <= 1:
        return f"learning rate {rate:g} (the only rate given; no probe needed)"
    return f"chose learning rate {rate:g} (held-out Dice {dice:.3f}, best of {probed} probes)"


def check_text(dice: float, iteration: int, best: float, best_iteration: int) -> str:
    text = f"held-out Dice {dice:.3f} at {iteration} iterations"
    return text + (" (best so far)" if iteration == best_iteration else f", best {best:.3f} at {best_iteration}")


def stop_text(reason: str, patience: int = 0, max_iterations: int = 0, budget_s: float | None = None) -> str:
    if reason == STOP_PATIENCE:
        return f"stopping: held-out Dice has not improved for {patience} checks"
    if reason == STOP_MAX_ITERATIONS:
        return f"stopping: reached the cap of {max_iterations} iterations"
    if reason == STOP_BUDGET:
        return f"stopping: the time budget of {format_seconds(budget_s or 0)} is spent"
    if reason == STOP_DIVERGED:
        return "stopping: training diverged after the last check (the best check is kept)"
    if reason == STOP_FIXED:
        return "fixed schedule: trained the set number of iterations"
    return f"stopping: {reason}"


def kept_text(best_iteration: int, best: float, iterations_run: int) -> str:
    return (f"keeping the weights at {best_iteration} iterations (held-out Dice {best:.3f}), "
            f"not the last of {iterations_run}")


def nothing_published_text(budget_s: float | None, stage: str) -> str:
    """The message of a budget that ran out before any held-out check of the training run."""
    where = "while choosing the learning rate" if stage == "probe" else "before the first held-out check"
    return (f"the time budget of {format_seconds(budget_s or 0)} ran out {where}: no checkpoint "
            "was scored, so nothing was published; give a larger --budget, fewer --rates or a "
            "smaller --check-every, or use --schedule fixed")


def fallback_text(case_count: int, iterations: int, rate: float) -> str:
    """Why the fixed schedule is used although the automatic one was asked for."""
    return (f"only {case_count} case(s): none can be held out to choose a schedule, so the "
            f"documented fixed schedule is used ({iterations} iterations at learning rate {rate:g})")


def schedule_summary(schedule: dict) -> str:
    """One line about a finished schedule (the report's `schedule` record), for the outcome."""
    if schedule.get("kind") != "auto":
        reason = schedule.get("reason")
        return (f"Fixed schedule: {schedule.get('iterations')} iterations at learning rate "
                f"{schedule.get('learning_rate'):g}" + (f" ({reason})." if reason else "."))
    return (f"Automatic schedule: learning rate {schedule['chosen_rate']:g}, best held-out Dice "
            f"{schedule['best_dice']:.3f} at {schedule['best_iteration']} of "
            f"{schedule['iterations_run']} iterations; {schedule['stop_text']}.")
