"""A job's files and events: the folder layout, the events a worker appends, and reading them back.

Layout of `jobs/` (the home's jobs folder):
    ID/job.json        the spec: id, kind, created, device, exclusive_device, params
    ID/events.ndjson   one JSON object a line, appended by the worker (see below)
    ID/worker.pid      the worker's process id, one line
    ID/worker.log      the worker's stdout and stderr (tracebacks land here)
    ID/cancel          present once a cancel was requested (the worker polls it too)
    locks/DEVICE.lock  one exclusive job per device (jobs/device_lock.py)
    locks/submit.lock  held while an exclusive job is checked and created (never stale: an OS lock)

Events: every event has "type" and "time", an ISO 8601 UTC time with milliseconds
("2026-11-26T11:22:33.123+00:00").
    progress  done, total (iterations of the current stage), optional stage, eta_s, extra fields
    metric    name, value, optional epoch and extra fields
    log       message
    done      result (a dict)
    error     message; "cancelled": true for a cancelled job, "out_of_memory": true for OOM,
              "user_error": true for bad input or a full or read-only disk (exit status 2)

IDs look like `20261126-112233-457c`: UTC creation time to the millisecond, then a random hex
digit (two jobs created in the same millisecond); they sort by time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from LymphNodeDGSTLib.errors import Cancelled


JOB_FILE = "job.json"
EVENTS_FILE = "events.ndjson"
PID_FILE = "worker.pid"
LOG_FILE = "worker.log"
CANCEL_FILE = "cancel"
LOCKS_FOLDER = "locks"
SUBMIT_LOCK = "submit.lock"
WORK_FOLDER = "work"  # a job's scratch copy (checkpoints, preprocessed cases); never kept
STATES = ("running", "done", "failed", "cancelled")
EVENT_TYPES = ("progress", "metric", "log", "done", "error")
TERMINAL_EVENTS = ("done", "error")
JOB_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


@dataclass
class JobInfo:
    id: str
    kind: str
    state: str
    created: str
    folder: Path
    spec: dict
    pid: int | None
    last_progress: dict | None
    result: dict | None
    error: str | None
    user_error: bool = False  # bad input or a full or read-only disk: the user's to fix (exit 2)
    stopped: bool = False     # running, but its worker is stopped (SIGSTOP): no progress until resumed

    @property
    def fraction_done(self) -> float | None:
        """done / total of the last progress event (None before the first one)."""
        progress = self.last_progress or {}
        total = progress.get("total")
        if not total:
            return None
        return min(1.0, max(0.0, float(progress.get("done", 0)) / float(total)))


def utc_now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def new_job_id(now: dt.datetime | None = None) -> str:
    """UTC date and time, then milliseconds and one random hex digit: `20261126-112233-457c`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}{secrets.token_hex(1)[0]}"


# --------------------------------------------------------------------------- worker side
class EventWriter:
    """Appends events to events.ndjson: one `write` of one whole line per event.

    The file is opened for each event in append mode, so the manager can add a final event after
    the worker is gone, and readers never see half of a line they would parse.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, event_type: str, **fields: Any) -> dict:
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event_type!r}")
        event = {"type": event_type, "time": utc_now_iso(), **fields}
        line = (json.dumps(event, default=_json_default) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return event


class Reporter:
    """What a job function gets to report progress, metrics and logs, and to notice a cancel.

    `cancel_event` is set by the worker's SIGTERM/SIGINT handler; the `cancel` file (written by
    `JobManager.cancel`) is also honoured, which is how a cancel reaches a worker on Windows.
    """

    def __init__(self, job_folder: str | os.PathLike, writer: EventWriter | None = None,
                 cancel_event: threading.Event | None = None, min_interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.job_folder = Path(job_folder)
        self.cancel_event = cancel_event or threading.Event()
        self.min_interval_s = min_interval_s
        self._writer = writer or EventWriter(self.job_folder / EVENTS_FILE)
        self._clock = clock
        self._stage: str | None = None
        self._stage_started = clock()
        self._stage_first_done = 0
        self._last_written = float("-inf")

    def progress(self, done: int, total: int, stage: str | None = None, **extra: Any) -> None:
        """`done` of `total` iterations of `stage`; the ETA comes from the rate since the stage
        began. Events closer together than `min_interval_s` are skipped, except a stage's first
        and last."""
        now = self._clock()
        new_stage = stage != self._stage or done < self._stage_first_done
        if new_stage:
            self._stage, self._stage_started, self._stage_first_done = stage, now, done
        finished = total > 0 and done >= total
        if not (new_stage or finished) and now - self._last_written < self.min_interval_s:
            return
        fields: dict[str, Any] = {"done": done, "total": total}
        if stage is not None:
            fields["stage"] = stage
        worked, elapsed = done - self._stage_first_done, now - self._stage_started
        if worked > 0 and elapsed > 0:
            fields["eta_s"] = round(max(0, total - done) * elapsed / worked, 1)
        fields.update(extra)
        self._writer.write("progress", **fields)
        self._last_written = now

    def metric(self, name: str, value: Any, **extra: Any) -> None:
        self._writer.write("metric", name=name, value=value, **extra)

    def log(self, message: str) -> None:
        self._writer.write("log", message=message)
        print(message, file=sys.stderr, flush=True)

    def cancelled(self) -> bool:
        if not self.cancel_event.is_set() and (self.job_folder / CANCEL_FILE).exists():
            self.cancel_event.set()
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled on request")


def job_events_writer(job_folder: str | os.PathLike) -> EventWriter:
    return EventWriter(Path(job_folder) / EVENTS_FILE)


# --------------------------------------------------------------------------- reading events
def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete events from byte `offset` on, and the offset after the last complete line.

    A partial last line (a write in progress) is left for the next call; a line that is not JSON
    is skipped.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in data[:end].split(b"\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end + 1


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
