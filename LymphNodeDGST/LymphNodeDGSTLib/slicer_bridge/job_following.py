"""Following a background job from the panel: new events read at each poll, a summary (state,
progress, ETA, curve) for the status line and progress bar, cancel, and the training curve figure.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.jobs.events import TERMINAL_EVENTS, JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager


POLL_INTERVAL_MS = 500


# --------------------------------------------------------------------------- following a job
@dataclass
class JobSummary:
    """A job as the panel shows it, from all events read so far."""

    job_id: str
    kind: str = ""
    state: str = "running"           # running, done, failed, cancelled
    stage: str | None = None
    done: int | None = None
    total: int | None = None
    eta_s: float | None = None
    loss: float | None = None        # the latest training loss (per iteration)
    detail: str | None = None        # what the stage is doing, in words (the automatic schedule)
    # the live curve: (epoch, training loss, pseudo Dice), None where not reported
    curve: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    last_log: str | None = None
    result: dict | None = None
    error: str | None = None
    out_of_memory: bool = False

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def fraction(self) -> float | None:
        """Share of the current stage done (None before the first progress event)."""
        if not self.total:
            return None
        return min(1.0, max(0.0, (self.done or 0) / self.total))

    @property
    def percent(self) -> int:
        fraction = self.fraction
        return 100 if self.state == "done" else int(round(100 * fraction)) if fraction is not None else 0

    @property
    def eta_text(self) -> str:
        return format_eta(self.eta_s)

    def status_text(self) -> str:
        """One line: `train 120/250 - held-out Dice 0.712 at 120 iterations, best 0.731 at 80 -
        about 3 min left - loss 0.412`, or how the job ended."""
        if self.state == "done":
            return "Done."
        if self.state == "cancelled":
            return "Cancelled."
        if self.state == "failed":
            return f"Failed: {self.error or 'unknown error'}"
        parts = []
        if self.stage and self.total:
            parts.append(f"{self.stage} {self.done}/{self.total}")
        elif self.stage:
            parts.append(self.stage)
        else:
            parts.append("starting")
        if self.detail:
            parts.append(self.detail)
        if self.eta_text:
            parts.append(self.eta_text)
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        return " - ".join(parts)


def format_eta(seconds: float | None) -> str:
    """`45 s left`, `about 3 min left`, `about 1 h 05 min left`; "" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    if seconds < 60:
        return f"{max(1, round(seconds))} s left"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


class JobFollower:
    """Reads a job's new events on each `poll()` (the widget's QTimer calls it every 500 ms)."""

    def __init__(self, manager: JobManager, job_id: str):
        self.manager = manager
        self.job_id = job_id
        self._offset = 0
        self._terminal: dict | None = None
        self._last_progress: dict | None = None
        self._curve: dict[int, list[float | None]] = {}
        self.summary = JobSummary(job_id)

    def poll(self) -> tuple[list[dict], JobSummary]:
        """The events written since the last poll (read from the last offset: the file is never
        read again from its start), and the summary after them. A job whose files cannot be read
        any more ends as failed, once, with the reason."""
        new_events: list[dict] = []

        def read_new() -> tuple[dict | None, dict | None]:
            events, self._offset = self.manager.events(self.job_id, self._offset)
            new_events.extend(events)
            for event in events:
                if event.get("type") in TERMINAL_EVENTS and self._terminal is None:
                    self._terminal = event
                elif event.get("type") == "progress":
                    self._last_progress = event
            return self._terminal, self._last_progress

        try:
            info = self.manager.info_after(self.job_id, read_new)
        except UserInputError as error:  # the job folder vanished (home cleared, or moved)
            self.summary = replace(self.summary, state="failed", error=str(error))
            return [], self.summary
        except OSError as error:  # e.g. events.ndjson replaced by a folder, a disk gone
            self.summary = replace(self.summary, state="failed",
                                   error=f"cannot read the job's files any more ({error})")
            return [], self.summary
        summary = replace(self.summary, kind=info.kind)
        for event in new_events:
            self._apply(summary, event)
        summary.state, summary.result = info.state, info.result
        summary.error = info.error if info.state != "done" else None
        summary.curve = [(epoch, *values) for epoch, values in sorted(self._curve.items())]
        self.summary = summary
        return new_events, summary

    def cancel(self, timeout: float = 10.0) -> threading.Thread:
        """Ask the job to stop without blocking the caller: JobManager.cancel waits for the worker
        (and kills it after `timeout`), so it runs in a thread; poll() then sees the ending."""
        thread = threading.Thread(target=self.manager.cancel, args=(self.job_id, timeout),
                                  name=f"cancel-{self.job_id}", daemon=True)
        thread.start()
        return thread

    def _apply(self, summary: JobSummary, event: dict) -> None:
        kind = event.get("type")
        if kind == "progress":
            if event.get("stage") != summary.stage:
                summary.eta_s = summary.detail = None
            summary.stage = event.get("stage")
            summary.detail = event.get("detail", summary.detail)
            summary.done, summary.total = event.get("done"), event.get("total")
            summary.eta_s = event.get("eta_s", summary.eta_s)
            if event.get("loss") is not None:
                summary.loss = float(event["loss"])
        elif kind == "metric" and event.get("epoch") is not None:
            column = {"train_loss": 0, "pseudo_dice": 1}.get(event.get("name"))
            if column is not None:
                self._curve.setdefault(int(event["epoch"]), [None, None])[column] = float(event["value"])
        elif kind == "log":
            summary.last_log = str(event.get("message", ""))
        elif kind == "error" and event.get("out_of_memory"):
            summary.out_of_memory = True


def failure_text(kind: str, summary: JobSummary) -> str:
    """The message for a failed job; out of memory comes with what to try instead."""
    what = {"segment": "segmentation", "adapt": "adaptation", "install": "model installation"}
    text = f"The {what.get(kind, kind)} failed: {summary.error or 'unknown error'}"
    if summary.out_of_memory:
        text += (" Try the fast option or the CPU for segmentation; fewer iterations or the CPU "
                 "for adaptation.")
    return text


def running_job(manager: JobManager, kinds: Sequence[str] = ("adapt",)) -> JobInfo | None:
    """The newest running job of one of `kinds` (e.g. an adaptation started before a restart)."""
    return next((info for info in manager.list() if info.kind in kinds and info.state == "running"),
                None)


def write_curve_png(curve: Sequence[tuple[int, float | None, float | None]], path: str | Path,
                    width_px: int = 360, height_px: int = 180) -> Path:
    """A small PNG of the training loss and pseudo Dice per epoch (the live curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot(1, 1, 1)
    dice_axis = loss_axis.twinx()
    epochs = [point[0] for point in curve]
    loss = [math.nan if point[1] is None else point[1] for point in curve]
    dice = [math.nan if point[2] is None else point[2] for point in curve]
    loss_axis.plot(epochs, loss, "o-", color="tab:red", markersize=3, label="training loss")
    dice_axis.plot(epochs, dice, "s-", color="tab:green", markersize=3, label="pseudo Dice")
    loss_axis.set_xlabel("epoch", fontsize=8)
    loss_axis.set_ylabel("loss", color="tab:red", fontsize=8)
    dice_axis.set_ylabel("pseudo Dice", color="tab:green", fontsize=8)
    dice_axis.set_ylim(0, 1)
    for axis in (loss_axis, dice_axis):
        axis.tick_params(labelsize=7)
    if epochs:
        loss_axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
