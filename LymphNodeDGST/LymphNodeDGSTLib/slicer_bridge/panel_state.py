"""The panel's state machine: Idle -> Segmenting | Adapting | Installing -> (Cancelling ->) Idle.

One background job at a time; the button that started it turns into Cancel. `Controls` says what
each button reads and whether it can be pressed, so the widget only copies these values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


# --------------------------------------------------------------------------- state machine
class PanelState(enum.Enum):
    IDLE = "idle"
    SEGMENTING = "segmenting"
    ADAPTING = "adapting"
    INSTALLING = "installing"
    CANCELLING = "cancelling"


ALLOWED_TRANSITIONS: dict[PanelState, frozenset[PanelState]] = {
    PanelState.IDLE: frozenset({PanelState.SEGMENTING, PanelState.ADAPTING, PanelState.INSTALLING}),
    PanelState.SEGMENTING: frozenset({PanelState.IDLE, PanelState.CANCELLING}),
    PanelState.ADAPTING: frozenset({PanelState.IDLE, PanelState.CANCELLING}),
    PanelState.INSTALLING: frozenset({PanelState.IDLE, PanelState.CANCELLING}),
    PanelState.CANCELLING: frozenset({PanelState.IDLE}),
}
STATE_OF_JOB = {"segment": PanelState.SEGMENTING, "adapt": PanelState.ADAPTING,
                "install": PanelState.INSTALLING}
APPLY_TEXT, ADAPT_TEXT, INSTALL_TEXT = "Apply", "Adapt to my site", "Install"
CANCEL_TEXT, CANCELLING_TEXT = "Cancel", "Cancelling..."


class InvalidTransition(RuntimeError):
    """A state change the panel does not allow (a programming error in the widget)."""


@dataclass(frozen=True)
class Controls:
    """What each button says and which controls are enabled, for one state."""

    apply_text: str
    apply_enabled: bool
    apply_tooltip: str
    adapt_text: str
    adapt_enabled: bool
    adapt_tooltip: str
    install_text: str
    install_enabled: bool
    model_actions_enabled: bool  # activate, rollback, choosing the model
    inputs_enabled: bool         # selectors and options of segmentation and adaptation
    segment_progress_visible: bool
    adapt_progress_visible: bool


def segment_blocker(has_input: bool, has_model: bool) -> str | None:
    """Why Apply cannot segment now, or None."""
    if not has_model:
        return "No model installed: install one in the Model section."
    if not has_input:
        return "Select the CT volume to segment."
    return None


def adapt_blocker(has_model: bool, case_count: int) -> str | None:
    """Why the model cannot be adapted now, or None."""
    if not has_model:
        return "No model installed: install one in the Model section."
    if case_count < 1:
        return "The case library is empty: correct a segmentation and save it as a training case."
    return None


def controls_for(state: PanelState, cancelling: PanelState | None = None,
                 segment_block: str | None = None, adapt_block: str | None = None) -> Controls:
    """The controls for `state`; `cancelling` is the state a cancel came from (in CANCELLING)."""
    running = cancelling if state is PanelState.CANCELLING else state

    def button(own: PanelState, idle_text: str, blocked: str | None) -> tuple[str, bool]:
        if state is PanelState.IDLE:
            return idle_text, blocked is None
        if running is own:
            return (CANCELLING_TEXT, False) if state is PanelState.CANCELLING else (CANCEL_TEXT, True)
        return idle_text, False

    apply_text, apply_enabled = button(PanelState.SEGMENTING, APPLY_TEXT, segment_block)
    adapt_text, adapt_enabled = button(PanelState.ADAPTING, ADAPT_TEXT, adapt_block)
    install_text, install_enabled = button(PanelState.INSTALLING, INSTALL_TEXT, None)
    idle = state is PanelState.IDLE
    return Controls(
        apply_text, apply_enabled,
        "Stop the segmentation" if apply_text == CANCEL_TEXT else
        segment_block or "Segment the lymph nodes of the selected CT (in the background)",
        adapt_text, adapt_enabled,
        "Stop the adaptation (the current model stays as it is)" if adapt_text == CANCEL_TEXT else
        adapt_block or "Fine-tune the model on the case library (in the background)",
        install_text, install_enabled,
        model_actions_enabled=idle, inputs_enabled=idle,
        segment_progress_visible=running is PanelState.SEGMENTING,
        adapt_progress_visible=running is PanelState.ADAPTING)


class PanelStateMachine:
    """The panel's state; every change goes through the allowed transitions."""

    def __init__(self) -> None:
        self.state = PanelState.IDLE
        self.cancelling_from: PanelState | None = None

    @property
    def busy(self) -> bool:
        return self.state is not PanelState.IDLE

    @property
    def job_kind(self) -> str | None:
        """The kind of job running (or being cancelled): "segment", "adapt", "install" or None."""
        running = self.cancelling_from if self.state is PanelState.CANCELLING else self.state
        return next((kind for kind, state in STATE_OF_JOB.items() if state is running), None)

    def start(self, job_kind: str) -> PanelState:
        if job_kind not in STATE_OF_JOB:
            raise ValueError(f"unknown job kind {job_kind!r}")
        return self._go(STATE_OF_JOB[job_kind])

    def cancel(self) -> PanelState:
        previous = self.state
        self._go(PanelState.CANCELLING)
        self.cancelling_from = previous
        return self.state

    def finish(self) -> PanelState:
        self._go(PanelState.IDLE)
        self.cancelling_from = None
        return self.state

    def controls(self, segment_block: str | None = None, adapt_block: str | None = None) -> Controls:
        return controls_for(self.state, self.cancelling_from, segment_block, adapt_block)

    def _go(self, target: PanelState) -> PanelState:
        if target not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.state.value} -> {target.value} is not allowed")
        self.state = target
        return target
