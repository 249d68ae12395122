"""Background jobs: a folder per job, a detached worker process, and state read back from files.

Layout of `jobs/` (the home's jobs folder):
    ID/job.json        the spec: id, kind, created, device, exclusive_device, params
    ID/events.ndjson   one JSON object a line, appended by the worker (see below)
    ID/worker.pid      the worker's process id, one line
    ID/worker.log      the worker's stdout and stderr (tracebacks land here)
    ID/cancel          present once a cancel was requested (the worker polls it too)
    locks/DEVICE.lock  {"pid", "pid_start", "job", "kind", "device", "since"}: one exclusive job
                       per device; its owner is the process with that pid *and* start time
    locks/submit.lock  held while an exclusive job is checked and created (never stale: an OS lock)

Events: every event has "type" and "time", an ISO 8601 UTC time with milliseconds
("2026-11-26T11:22:33.123+00:00").
    progress  done, total (iterations of the current stage), optional stage, eta_s, extra fields
    metric    name, value, optional epoch and extra fields
    log       message
    done      result (a dict)
    error     message; "cancelled": true for a cancelled job, "out_of_memory": true for OOM

A job's state is never stored: it is derived from its events and whether its worker is alive, so
a worker killed by the OS or a crash shows as failed without anyone having to write that down.
IDs look like `20261126-112233-457c`: UTC creation time to the millisecond, then a random hex
digit (two jobs created in the same millisecond); they sort by time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from LymphNodeDGSTLib.atomic import staging_folder, write_json_atomic, write_text_atomic
from LymphNodeDGSTLib.engine.file_lock import exclusive_lock
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.jobs.kinds import check_kind_name
from LymphNodeDGSTLib.jobs.events import (CANCEL_FILE, EVENTS_FILE, JOB_FILE, JOB_ID_PATTERN, JobInfo, LOCKS_FOLDER, LOG_FILE, PID_FILE, SUBMIT_LOCK, TERMINAL_EVENTS, WORK_FOLDER, job_events_writer, new_job_id, read_events, utc_now_iso)
from LymphNodeDGSTLib.jobs.process_tree import (START_GRACE_S, _CHILDREN, _CHILDREN_LOCK, _ask_to_stop, _end_leftovers, _force_kill, _wait_until, job_processes, worker_alive, worker_environment, worker_stopped)
from LymphNodeDGSTLib.jobs.device_lock import (DeviceBusy, DeviceLock, _read_lock_file, _remove_stale_lock, busy_message, device_lock_path, lock_owner_alive, read_device_lock)


WORKER_STOPPED = "the worker stopped without finishing: killed or crashed"


# --------------------------------------------------------------------------- the manager
class JobManager:
    """Submits jobs as detached worker processes and reads their state back from the files."""

    def __init__(self, jobs_root: str | os.PathLike):
        self.root = Path(jobs_root)

    # ---------------------------------------------------------------- submit
    def submit(self, kind: str, params: dict, device: str = "cpu", python: str | None = None,
               exclusive_device: bool = False, env: Mapping[str, str] | None = None) -> JobInfo:
        """Start `kind` with `params` in a new detached worker and return at once.

        `python`: the interpreter to run the worker (default: this one). `env`: extra environment
        variables for the worker (its PYTHONPATH entries are added, not substituted).
        `exclusive_device`: at most one such job per device at a time (adaptations); "auto" is
        resolved here to the device it means, so that it shares that device's lock.
        """
        check_kind_name(kind)
        try:
            json.dumps(params)
        except (TypeError, ValueError) as error:
            raise UserInputError(f"job parameters must be JSON data: {error}") from None
        if exclusive_device:
            if (device or "auto") == "auto":
                from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
                device = str(choose_device("auto"))
            # Check and create as one step: of simultaneous submissions for a device, exactly
            # one gets a job; the others see it (running, worker still starting) and are refused.
            with exclusive_lock(self.root / LOCKS_FOLDER / SUBMIT_LOCK, what=f"the jobs folder {self.root}"):
                self._refuse_if_device_busy(device)
                folder = self._create(kind, params, device, exclusive_device)
        else:
            folder = self._create(kind, params, device, exclusive_device)
        self._launch(folder, python, env)
        return self.get(folder.name)

    def _refuse_if_device_busy(self, device: str) -> None:
        holder = read_device_lock(self.root, device)
        if holder is not None:
            raise DeviceBusy(busy_message(holder))
        # A job submitted a moment ago may not have taken the lock yet (its worker is starting).
        wanted = device_lock_path(self.root, device)
        for folder in self._job_folders():
            spec = _read_spec(folder)
            if (spec and spec.get("exclusive_device")
                    and device_lock_path(self.root, spec.get("device", "cpu")) == wanted
                    and self._info(folder, spec).state == "running"):
                raise DeviceBusy(busy_message(DeviceLock(wanted, spec.get("device", device), 0,
                                                         folder.name, spec.get("kind", ""))))

    def _create(self, kind: str, params: dict, device: str, exclusive_device: bool) -> Path:
        """The job folder with job.json and an empty events file, published by one rename."""
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            now = dt.datetime.now(dt.timezone.utc)
            job_id = new_job_id(now)
            destination = self.root / job_id
            if destination.exists():
                continue
            spec = {"id": job_id, "kind": kind,
                    "created": now.isoformat(timespec="milliseconds"), "device": device,
                    "exclusive_device": bool(exclusive_device), "params": params}
            with staging_folder(self.root) as staged:
                write_json_atomic(staged / JOB_FILE, spec)
                (staged / EVENTS_FILE).touch()
                try:
                    os.rename(staged, destination)
                except OSError:
                    if destination.exists():
                        continue  # another process took this id in the same second
                    raise
            return destination

    def _launch(self, folder: Path, python: str | None, env: Mapping[str, str] | None) -> None:
        command = [python or sys.executable, "-m", "LymphNodeDGSTLib.jobs.worker", str(folder)]
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP")
                                        | getattr(subprocess, "CREATE_NO_WINDOW"))
        else:
            options["start_new_session"] = True
        with open(folder / LOG_FILE, "ab") as log:
            try:
                child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=worker_environment(env),
                                         close_fds=True, **options)
            except OSError as error:
                job_events_writer(folder).write(
                    "error", message=f"could not start the worker ({command[0]}): {error}")
                raise UserInputError(f"could not start a worker with {command[0]}: "
                                     f"{error.strerror or error}") from None
        with _CHILDREN_LOCK:
            _CHILDREN[child.pid] = child
        # The worker overwrites this with its own pid; writing it here leaves no moment without
        # one, and keeps an existing file (the worker may have been quicker).
        try:
            fd = os.open(folder / PID_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{child.pid}\n")

    # ---------------------------------------------------------------- queries
    def get(self, job_id: str) -> JobInfo:
        folder = self._folder(job_id)
        spec = _read_spec(folder)
        if spec is None:
            raise UserInputError(f"job {job_id} has no readable {JOB_FILE}")
        return self._info(folder, spec)

    def list(self) -> list[JobInfo]:
        """All jobs, newest first."""
        infos = []
        for folder in self._job_folders():
            spec = _read_spec(folder)
            if spec is not None:
                infos.append(self._info(folder, spec))
        return sorted(infos, key=lambda info: (info.created, info.id), reverse=True)

    def events(self, job_id: str, offset: int = 0) -> tuple[list[dict], int]:
        """The events written since byte `offset`, and the offset to pass next time."""
        return read_events(self._folder(job_id) / EVENTS_FILE, offset)

    # ---------------------------------------------------------------- control
    def cancel(self, job_id: str, timeout: float = 10.0) -> JobInfo:
        """Ask the worker to stop (cancel file + SIGTERM); SIGKILL it after `timeout` seconds.

        A job that has already ended keeps its state; what a killed worker left (its `work`
        folder, its device lock) is removed.
        """
        info = self.get(job_id)
        if info.state != "running":
            if info.pid is None or not worker_alive(info.pid, job_id):
                self._clean_up_after(info)  # a worker killed with -9 left its work copy and lock
            return info
        write_text_atomic(info.folder / CANCEL_FILE, utc_now_iso() + "\n")
        message = "cancelled on request"
        if info.pid is not None and worker_alive(info.pid, job_id):
            pid = info.pid
            known = job_processes(pid, job_id)  # before the stop: orphans stay known
            _ask_to_stop(pid)
            if not _wait_until(lambda: not worker_alive(pid, job_id), timeout):
                known = _force_kill(pid, job_id, known)
                _wait_until(lambda: not worker_alive(pid, job_id), 5.0)
                message = f"cancelled on request (the worker was killed after {timeout:g} s)"
            _end_leftovers(known, pid, timeout=5.0)
        elif info.pid is None:
            # No worker yet: a starting worker sees the cancel file and stops by itself.
            _wait_until(lambda: self._terminal_event(info.folder) is not None, timeout)
        if self._terminal_event(info.folder) is None:
            job_events_writer(info.folder).write("error", message=message, cancelled=True)
        if info.pid is None or not worker_alive(info.pid, job_id):
            self._clean_up_after(info)
        return self.get(job_id)

    def _clean_up_after(self, info: JobInfo) -> None:
        """What a worker killed before its own clean-up leaves: its device lock, its work copy."""
        if info.spec.get("exclusive_device"):
            path = device_lock_path(self.root, str(info.spec.get("device", "cpu")))
            holder = _read_lock_file(path)
            if holder is not None and holder.job == info.id and not lock_owner_alive(holder):
                _remove_stale_lock(path, holder)
        shutil.rmtree(info.folder / WORK_FOLDER, ignore_errors=True)

    def wait(self, job_id: str, on_event: Callable[[dict], None] | None = None,
             poll: float = 0.5, timeout: float | None = None,
             on_stopped: Callable[[JobInfo], None] | None = None) -> JobInfo:
        """Follow the job's events (to `on_event`) until it ends; TimeoutError after `timeout`.
        `on_stopped` is told once each time the worker is found stopped (SIGSTOP)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        offset = 0
        was_stopped = False
        while True:
            info = self.get(job_id)  # state before events: a terminal state's events are all there
            events, offset = self.events(job_id, offset)
            if on_event is not None:
                for event in events:
                    on_event(event)
            if info.state != "running":
                return info
            if info.stopped and not was_stopped and on_stopped is not None:
                on_stopped(info)
            was_stopped = info.stopped
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout:g} s")
            time.sleep(poll)

    # ---------------------------------------------------------------- internals
    def _folder(self, job_id: str) -> Path:
        folder = self.root / job_id
        if not JOB_ID_PATTERN.match(job_id) or not (folder / JOB_FILE).is_file():
            raise UserInputError(f"no job '{job_id}' (see 'lndgst jobs list')")
        return folder

    def _job_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if JOB_ID_PATTERN.match(p.name) and p.is_dir()]

    def _terminal_event(self, folder: Path) -> dict | None:
        events = _readable_events(folder)
        return next((e for e in events if e.get("type") in TERMINAL_EVENTS), None)

    def _info(self, folder: Path, spec: dict) -> JobInfo:
        pid, alive = self._liveness(folder)  # first: a worker seen dead has written all it ever will
        events = _readable_events(folder)
        last_progress = next((e for e in reversed(events) if e.get("type") == "progress"), None)
        terminal = next((e for e in events if e.get("type") in TERMINAL_EVENTS), None)
        return self._state(folder, spec, pid, alive, terminal, last_progress)

    def info_after(self, job_id: str, read_events_since: Callable[[], tuple[dict | None, dict | None]]) -> JobInfo:
        """A job's info where the caller reads the events itself, incrementally (the panel's poll):
        liveness is checked first, then `read_events_since()` gives (terminal event or None, last
        progress event or None) from what the caller has read so far."""
        folder = self._folder(job_id)
        spec = _read_spec(folder)
        if spec is None:
            raise UserInputError(f"job {job_id} has no readable {JOB_FILE}")
        pid, alive = self._liveness(folder)
        terminal, last_progress = read_events_since()
        return self._state(folder, spec, pid, alive, terminal, last_progress)

    def _liveness(self, folder: Path) -> tuple[int | None, bool]:
        pid = _read_pid(folder / PID_FILE)
        return pid, pid is not None and worker_alive(pid, folder.name)

    @staticmethod
    def _state(folder: Path, spec: dict, pid: int | None, alive: bool, terminal: dict | None,
               last_progress: dict | None) -> JobInfo:
        result = error = None
        user_error = bool(terminal is not None and terminal.get("user_error") is True)
        if terminal is not None and terminal["type"] == "done":
            state, result = "done", terminal.get("result") or {}
        elif terminal is not None:
            state = "cancelled" if terminal.get("cancelled") else "failed"
            error = str(terminal.get("message", "failed"))
        elif alive or (pid is None and _age_since(spec.get("created")) < START_GRACE_S):
            state = "running"
        elif (folder / CANCEL_FILE).exists():
            state, error = "cancelled", "cancelled on request"
        else:
            state, error = "failed", WORKER_STOPPED
        stopped = state == "running" and pid is not None and worker_stopped(pid)
        return JobInfo(id=folder.name, kind=str(spec.get("kind", "")), state=state,
                       created=str(spec.get("created", "")), folder=folder, spec=spec, pid=pid,
                       last_progress=last_progress, result=result, error=error, user_error=user_error,
                       stopped=stopped)


def _read_spec(folder: Path) -> dict | None:
    try:
        spec = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _readable_events(folder: Path) -> list[dict]:
    """A job's events for listing it; none when the file cannot be read (a folder in its place):
    one damaged job must not break `jobs list` for all. A follower reads with read_events and
    reports such damage itself."""
    try:
        return read_events(folder / EVENTS_FILE)[0]
    except OSError:
        return []


MAX_PID = 2 ** 22  # Linux's pid_max ceiling; Windows' pids are below it too in practice


def _read_pid(path: Path) -> int | None:
    """The worker's pid, or None when the file is missing or damaged. 0, 1, negative numbers, our
    own pid and numbers past any pid are damage: signalling 0 or -1 would reach our own process
    group or every process we may signal (issue 26, item 13)."""
    try:
        pid = int(path.read_text(encoding="ascii", errors="replace").strip())
    except (OSError, ValueError):
        return None
    return pid if 1 < pid < MAX_PID and pid != os.getpid() else None


def _age_since(created: str | None) -> float:
    try:
        since = dt.datetime.fromisoformat(str(created))
    except ValueError:
        return float("inf")
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - since).total_seconds()


