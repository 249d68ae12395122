"""The panel's adapt section: the request the panel builds, the adaptation job, and its outcome
(use the adapted version or keep the current one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD as ADAPT_DEFAULT_METHOD
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager


# --------------------------------------------------------------------------- adaptation
def adapt_request(model: str | None = None, method: str = ADAPT_DEFAULT_METHOD, gamma: int = 2,
                  iterations: int | None = None, device: str = "auto", **advanced: Any):
    """An AdaptRequest with the module's defaults: the automatic schedule, or a fixed one when
    `iterations` is given (`budget="20m"` etc. pass through `advanced`). It is never activated by
    the job itself (activation "never"): the user chooses afterwards, seeing the before/after Dice."""
    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest

    if "activation" in advanced:
        raise ValueError("the module always submits with activation 'never'")
    return AdaptRequest(model=model, method=method, gamma=int(gamma),
                        iterations=None if iterations is None else int(iterations),
                        device=device, activation="never", **advanced)


def adapt_job_params(home: Home, request) -> dict:
    from dataclasses import asdict

    return {"home": str(home.root), "request": asdict(request)}


def submit_adaptation(manager: JobManager, home: Home, request, python: str | None = None,
                      env: dict | None = None) -> JobInfo:
    """Check the request (UserInputError for what can fail before training), pin the parent
    version, and start the adaptation as an exclusive background job on its device."""
    from LymphNodeDGSTLib.adaptation.adapt import check_request
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device

    parent, _ = check_request(home, request)
    request = replace(request, model=parent.ref)
    device = str(choose_device(request.device))
    return manager.submit("adapt", adapt_job_params(home, request), device=device,
                          exclusive_device=True, python=python, env=env)


@dataclass(frozen=True)
class AdaptationOutcome:
    """The end of an adaptation, as the panel offers it: use the new version or keep the old."""

    version: str         # NAME@N, published but not active
    parent: str          # NAME@M, still active
    dice_before: float
    dice_after: float
    held_out: bool
    figure: Path | None
    report: Path | None
    gate_margin: float = 0.0           # > 0: the held-out case also chose the schedule
    schedule_text: str | None = None   # how the schedule ran, in one sentence

    @property
    def recommended(self) -> bool:
        """Use the adapted version if it passes the gate (the CLI's rule): no worse than its
        parent, or better by the margin when the held-out case also chose the schedule."""
        return self.dice_after >= self.dice_before + self.gate_margin

    def text(self) -> str:
        change = self.dice_after - self.dice_before
        where = "held-out cases" if self.held_out else (
            "the training cases (too few cases to hold one out: not an independent check)")
        if self.gate_margin:
            verdict = (f"better by at least {self.gate_margin:.2f}" if self.recommended else
                       f"not better by {self.gate_margin:.2f} (the margin asked when the held-out "
                       "case also chose the schedule)")
        else:
            verdict = "no worse" if self.recommended else "worse"
        advice = (f"The adapted model is {verdict}: using it is recommended." if self.recommended
                  else f"The adapted model is {verdict}: keeping the current model is recommended.")
        schedule = f" {self.schedule_text}" if self.schedule_text else ""
        return (f"{self.version} (adapted from {self.parent}): Dice on {where} "
                f"{self.dice_before:.3f} -> {self.dice_after:.3f} ({change:+.3f}). {advice}{schedule}")

    def kept_text(self) -> str:
        return (f"Kept {self.parent}; {self.version} stays installed and can be activated later in "
                "the Model section.")

    def name_and_version(self) -> tuple[str, int]:
        name, _, number = self.version.partition("@")
        return name, int(number)


def adaptation_outcome(result: dict) -> AdaptationOutcome:
    """From an adapt job's result (adapt.run_adaptation's summary)."""
    def optional_path(key: str) -> Path | None:
        return Path(result[key]) if result.get(key) else None

    return AdaptationOutcome(result["version"], result["parent"], float(result["dice_before"]),
                             float(result["dice_after"]), bool(result.get("evaluation_is_held_out")),
                             optional_path("figure"), optional_path("report"),
                             float(result.get("gate_margin") or 0.0), result.get("schedule_text"))
