"""The activation gate, kept honest when held-out cases also chose the schedule.

The automatic schedule picks the learning rate and the stopping point that score best on its
held-out cases, so its best score on those cases is optimistic: they cannot be the only evidence
that the new version is better than its parent.

- Two or more held-out cases (by default from 8 cases in the library, a quarter held out): they
  are divided. The first half (rounded down) chooses the schedule; the rest, never seen by the
  schedule, decide activation with the usual rule, no worse than the parent.
- One held-out case: it does both, and activation needs a stricter margin: the adapted version
  must beat the parent on it by SAME_CASES_MARGIN Dice.
- A fixed schedule chooses nothing from the held-out cases: they decide with the usual rule.

SAME_CASES_MARGIN is a judgement, not a measurement: a handful of probes and checks are chosen
on one case, and the best of them is optimistic by an amount this margin is meant to cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from LymphNodeDGSTLib.adaptation.cases.library import CaseRecord

SAME_CASES_MARGIN = 0.02
SEPARATE_GATE_MIN_HELD_OUT = 2


@dataclass
class GateCases:
    schedule: list[CaseRecord]     # choose the learning rate and the stopping point
    gate: list[CaseRecord]         # decide activation (before/after Dice in the report)
    margin: float                  # Dice the adapted version must gain over its parent
    independent: bool              # True: the gate cases played no part in the schedule

    def describe(self) -> dict:
        return {"schedule_cases": [c.id for c in self.schedule], "gate_cases": [c.id for c in self.gate],
                "margin": self.margin, "independent_of_schedule": self.independent}


def divide_held_out(held_out: Sequence[CaseRecord], automatic: bool) -> GateCases:
    """Schedule and gate cases from the held-out cases (see the module docstring)."""
    cases = list(held_out)
    if not automatic:
        return GateCases([], cases, 0.0, True)
    if len(cases) >= SEPARATE_GATE_MIN_HELD_OUT:
        half = len(cases) // 2
        return GateCases(cases[:half], cases[half:], 0.0, True)
    return GateCases(cases, cases, SAME_CASES_MARGIN, False)


def gate_passes(before: float, after: float, margin: float) -> bool:
    return after >= before + margin


def gate_rule_text(gate: GateCases) -> str:
    if not gate.schedule:
        return "activated if no worse than the parent (a fixed schedule chose nothing from them)"
    if gate.margin == 0:
        return "activated if no worse than the parent on held-out cases the schedule did not use"
    return (f"the same held-out case chose the schedule, so activation needs a gain of at least "
            f"{gate.margin:.2f} Dice over the parent")


def why_not_activated(before: float, after: float, margin: float) -> str:
    if margin == 0:
        return f"held-out Dice {after:.3f} is below the parent's {before:.3f}"
    return (f"held-out Dice {after:.3f} does not beat the parent's {before:.3f} by {margin:.2f} "
            "(the held-out case also chose the schedule)")
