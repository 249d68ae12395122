"""How long and how fast an adaptation trains: the automatic schedule (default) or a fixed one.

Light (no torch): the command line, the panel and the job all read the same rules from here.

- `auto` (the default): the learning rate is chosen from a short grid by brief probe runs scored
  on held-out cases; training at that rate is scored on the same cases every `check_every`
  iterations and stops after `patience` checks without improvement, at `max_iterations`, or when
  the time budget is spent. The best checkpoint is kept, not the last.
- `fixed`: `iterations` at `learning_rate` (defaults: FIXED_ITERATIONS at the method's rate, the
  authors' settings; never measured against the automatic schedule). It is also the documented
  fallback when no case can be held out (fewer than 3 cases and no --holdout).

Giving a fixed-schedule number (--iterations, --lr, --iterations-per-epoch) without --schedule
means `fixed`; giving an automatic-schedule setting (--budget, --rates, ...) means `auto`;
mixing the two, or contradicting --schedule, is a usage error (exit 2).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Iterable

from LymphNodeDGSTLib.errors import UserInputError

AUTO, FIXED = "auto", "fixed"
SCHEDULES = (AUTO, FIXED)

# The fixed schedule (also the fallback without held-out cases): the product's former default.
FIXED_ITERATIONS = 250
FIXED_ITERATIONS_PER_EPOCH = 50

# The automatic schedule's defaults. The grid reaches past 3e-2 because on the site-C phantoms
# every method's best fixed rate was the top of the old grid (issue 23). A probe is as long as
# one check interval; patience 3 tolerates two noisy checks on a handful of held-out cases.
DEFAULT_RATES = (3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_PROBE_ITERATIONS = 20
DEFAULT_CHECK_EVERY = 20
DEFAULT_PATIENCE = 3
DEFAULT_MAX_ITERATIONS = 500

MAX_RATES = 8
MAX_RATE = 10.0
MAX_BUDGET_S = 7 * 24 * 3600
BUDGET_UNITS = {"s": 1, "m": 60, "h": 3600}
BUDGET_HELP = "a time budget such as 90s, 20m, 1h or 1h30m"

FIXED_OPTIONS = ("iterations", "learning_rate", "iterations_per_epoch")
AUTO_OPTIONS = ("budget", "rates", "probe_iterations", "check_every", "patience", "max_iterations")
OPTION_FLAGS = {"iterations": "--iterations", "learning_rate": "--lr",
                "iterations_per_epoch": "--iterations-per-epoch", "budget": "--budget",
                "rates": "--rates", "probe_iterations": "--probe-iterations",
                "check_every": "--check-every", "patience": "--patience",
                "max_iterations": "--max-iterations"}


def parse_budget(text: str | float | int | None) -> float | None:
    """Seconds of a budget written `90s`, `20m`, `1h`, `1h30m` (None: no budget).

    A bare number is refused: `--budget 20` could mean seconds or minutes."""
    if text is None:
        return None
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        seconds = float(text)
    else:
        written = str(text).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", written)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", written).strip():
            raise UserInputError(f"--budget must be {BUDGET_HELP}; got {text!r}")
        units = [unit for _, unit in parts]
        if len(set(units)) != len(units) or units != sorted(units, key="hms".index):
            raise UserInputError(f"--budget must be {BUDGET_HELP} (hours, minutes, seconds in "
                                 f"that order, each once); got {text!r}")
        seconds = sum(float(number) * BUDGET_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_BUDGET_S:
        raise UserInputError(f"--budget must be above 0 and at most 7 days; got {text!r}")
    return seconds


def format_seconds(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `1 h 05 min`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def parse_rates(text: str | Iterable[float] | None) -> tuple[float, ...] | None:
    """`3e-3,1e-2` (or a list of numbers) as a tuple of learning rates."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else list(text)
    try:
        rates = tuple(float(item) for item in items if item != "")
    except (TypeError, ValueError):
        raise UserInputError(f"--rates must be learning rates separated by commas, e.g. "
                             f"3e-3,1e-2,3e-2; got {text!r}") from None
    if not rates or len(rates) > MAX_RATES:
        raise UserInputError(f"--rates must list 1 to {MAX_RATES} learning rates; got {text!r}")
    for rate in rates:
        if not math.isfinite(rate) or rate <= 0 or rate > MAX_RATE:
            raise UserInputError(f"--rates: every rate must be a finite number above 0 and at most "
                                 f"{MAX_RATE:g}; got {rate!r}")
    if len(set(rates)) != len(rates):
        raise UserInputError(f"--rates lists a rate twice: {text!r}")
    return rates


def resolve_schedule(schedule: str | None, given: Iterable[str]) -> str:
    """`auto` or `fixed` from --schedule (None: not given) and the names of the options given
    (AdaptRequest field names); a UserInputError for every contradiction."""
    given = list(given)
    fixed = [name for name in FIXED_OPTIONS if name in given]
    auto = [name for name in AUTO_OPTIONS if name in given]
    if schedule is not None and schedule not in SCHEDULES:
        raise UserInputError(f"--schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if fixed and auto:
        raise UserInputError(
            f"{_flags(fixed)} set a fixed schedule and {_flags(auto)} the automatic one; give "
            "one kind (the automatic schedule chooses the learning rate and the iterations itself)")
    if schedule == AUTO and fixed:
        raise UserInputError(f"--schedule auto chooses the learning rate and the number of "
                             f"iterations itself: drop {_flags(fixed)}, or use --schedule fixed")
    if schedule == FIXED and auto:
        raise UserInputError(f"{_flags(auto)} only apply to --schedule auto")
    if schedule is not None:
        return schedule
    return FIXED if fixed else AUTO


def _flags(names: list[str]) -> str:
    return ", ".join(OPTION_FLAGS[name] for name in names)


@dataclass(frozen=True)
class AutoSchedule:
    """The automatic schedule's settings (see the module docstring)."""

    rates: tuple[float, ...] = DEFAULT_RATES
    probe_iterations: int = DEFAULT_PROBE_ITERATIONS
    check_every: int = DEFAULT_CHECK_EVERY
    patience: int = DEFAULT_PATIENCE
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    budget_s: float | None = None

    def validate(self) -> "AutoSchedule":
        parse_rates(self.rates)
        for flag, value, low in (("--probe-iterations", self.probe_iterations, 1),
                                 ("--check-every", self.check_every, 1),
                                 ("--patience", self.patience, 1),
                                 ("--max-iterations", self.max_iterations, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not \
                    low <= value <= 10_000_000:
                raise UserInputError(f"{flag} must be a whole number from {low} to 10000000; "
                                     f"got {value!r}")
        for flag, value in (("--check-every", self.check_every),
                            ("--probe-iterations", self.probe_iterations)):
            if self.max_iterations < value:
                raise UserInputError(f"--max-iterations ({self.max_iterations}) must be at least "
                                     f"{flag} ({value})")
        if self.budget_s is not None:
            parse_budget(self.budget_s)
        return self

    def describe(self) -> dict:
        return {"rates": list(self.rates), "probe_iterations": self.probe_iterations,
                "check_every": self.check_every, "patience": self.patience,
                "max_iterations": self.max_iterations, "budget_s": self.budget_s}
