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
                  iterations: int = 250, device: str = "auto", **advanced: Any):
    """An AdaptRequest with the module's defaults. It is never activated by the job itself
    (activation "never"): the user chooses afterwards, seeing the before/after Dice."""
    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest

    if "activation" in advanced:
        raise ValueError("the module always submits with activation 'never'")
    return AdaptRequest(model=model, method=method, gamma=int(gamma), iterations=int(iterations),
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

    @property
    def recommended(self) -> bool:
        """Use the adapted version if it is no worse than its parent (the CLI's rule)."""
        return self.dice_after >= self.dice_before

    def text(self) -> str:
        change = self.dice_after - self.dice_before
        where = "held-out cases" if self.held_out else (
            "the training cases (too few cases to hold one out: not an independent check)")
        advice = ("The adapted model is no worse: using it is recommended." if self.recommended
                  else "The adapted model is worse: keeping the current model is recommended.")
        return (f"{self.version} (adapted from {self.parent}): Dice on {where} "
                f"{self.dice_before:.3f} -> {self.dice_after:.3f} ({change:+.3f}). {advice}")

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
                             optional_path("figure"), optional_path("report"))
