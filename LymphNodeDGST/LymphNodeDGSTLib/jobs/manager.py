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
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from LymphNodeDGSTLib.atomic import staging_folder, write_json_atomic, write_text_atomic
from LymphNodeDGSTLib.engine.file_lock import exclusive_lock
from LymphNodeDGSTLib.engine.processes import process_running, process_start_time
from LymphNodeDGSTLib.errors import Cancelled, UserInputError
from LymphNodeDGSTLib.jobs.kinds import check_kind_name

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

# A job folder without worker.pid this long after creation never got a worker.
START_GRACE_S = 60.0
# A process whose command line is still empty this long after it started is not a worker.
EXEC_GRACE_S = 5.0
# A lock file this old that is still empty was left by a process that died while writing it.
EMPTY_LOCK_GRACE_S = 5.0
WORKER_STOPPED = "the worker stopped without finishing: killed or crashed"
# The folder that holds the LymphNodeDGSTLib package: put on the worker's PYTHONPATH so that any
# interpreter (Slicer's own Python included) imports this very copy of the package.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]

# Workers this process launched: polled so that finished ones are reaped, not left as zombies
# that still answer "alive" to a signal 0.
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


class DeviceBusy(UserInputError):
    """Another exclusive job (an adaptation) holds the device."""


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


# --------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie is not). Never sends a real signal."""
    with _CHILDREN_LOCK:
        _reap_finished_children()
        if pid in _CHILDREN:
            return True
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _linux_process_state(pid) != "Z"


def worker_alive(pid: int, job_id: str) -> bool:
    """`pid` is alive and, where the OS tells (Linux /proc), it is the worker of `job_id`, not an
    unrelated process that was given a dead worker's recycled pid."""
    if not pid_alive(pid):
        return False
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    if not command_line:
        # Empty for a moment while a worker execs: cannot tell then. Empty for good in a kernel
        # thread, which may hold a dead worker's recycled pid: not ours once it is not new.
        return _started_within(pid, EXEC_GRACE_S)
    return job_id.encode() in command_line


def _started_within(pid: int, seconds: float) -> bool:
    """Whether `pid` started less than `seconds` ago (True when the OS does not tell)."""
    started = process_start_time(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return True
    return started is None or uptime - started / ticks < seconds


def _linux_process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0] if ")" in stat else None


def _windows_pid_alive(pid: int) -> bool:
    # os.kill(pid, 0) would terminate the process on Windows; ask the kernel instead.
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # access denied: exists, not ours
    try:
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _ask_to_stop(pid: int) -> None:
    if os.name == "nt":
        return  # no SIGTERM there (it would kill at once): the worker polls the cancel file
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _reap_finished_children() -> None:
    """Poll every worker process this process launched (call with _CHILDREN_LOCK held), so that a
    finished one is reaped. Under PythonSlicer the launched process is CTKAppLauncher, whose pid
    is not the worker's (worker.pid holds python-real's): it must be polled by its own pid."""
    for launched_pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[launched_pid]


def job_processes(pid: int, job_id: str) -> list:
    """The processes of job `job_id` whose worker is `pid`: its launcher (PythonSlicer is
    CTKAppLauncher, which runs python-real as its child and waits for it), the worker and all its
    descendants (nnU-Net's data-loader processes), as psutil.Process objects; [] without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        worker = psutil.Process(pid)
        processes = [worker, *worker.children(recursive=True)]
    except psutil.Error:
        return []
    try:
        parent = worker.parent()
    except psutil.Error:
        parent = None
    if parent is not None and _is_launcher_of(parent, job_id):
        processes.insert(0, parent)
    return processes


def _is_launcher_of(process, job_id: str) -> bool:
    """Whether `process` launched the worker of `job_id`: a process this one started for a job,
    or one whose command line runs the worker on that job's folder. Never this process."""
    import psutil

    if process.pid == os.getpid():
        return False
    with _CHILDREN_LOCK:
        if process.pid in _CHILDREN:
            return True
    try:
        command_line = process.cmdline()
    except psutil.Error:
        return False
    return "LymphNodeDGSTLib.jobs.worker" in command_line and any(job_id in part for part in command_line)


def _force_kill(pid: int, job_id: str = "", known: list | None = None) -> list:
    """Kill the whole job at once: launcher, worker and every descendant (SIGKILL;
    TerminateProcess on Windows). `known`: processes seen earlier, so that a child orphaned
    meanwhile is not missed. Returns the processes it found, for `_end_leftovers` to reap."""
    processes = list({p.pid: p for p in [*(known or []), *job_processes(pid, job_id)]}.values())
    for process in processes:
        try:
            process.kill()
        except Exception:  # psutil.NoSuchProcess, AccessDenied: gone, or not ours to kill
            pass
    if os.name != "nt":
        # The job's own process group (start_new_session: its leader is the process we launched,
        # the launcher under PythonSlicer) also catches descendants psutil could not list.
        try:
            group = os.getpgid(pid)
            if group != os.getpgid(0):
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif not processes:  # no psutil: Windows' own tree kill
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
    return processes


def _ended(process) -> bool:
    """Gone, or a zombie (dead; only its parent can reap it)."""
    try:
        return not process.is_running() or process.status() == "zombie"
    except Exception:  # psutil.NoSuchProcess
        return True


def _end_leftovers(known: list, pid: int, timeout: float) -> None:
    """After the worker ended: give its launcher and descendants `timeout` s to end by
    themselves, kill those that do not, and reap every process this process launched for the
    job (the launcher under PythonSlicer, else the worker), so none stays defunct."""
    if known and not _wait_until(lambda: all(_ended(p) for p in known), timeout):
        for process in known:
            if not _ended(process):
                try:
                    process.kill()
                except Exception:
                    pass
        _wait_until(lambda: all(_ended(p) for p in known), timeout)
    ours = {pid, *(p.pid for p in known)}
    with _CHILDREN_LOCK:
        launched = [(p, child) for p, child in _CHILDREN.items() if p in ours]
    for launched_pid, child in launched:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        with _CHILDREN_LOCK:
            _CHILDREN.pop(launched_pid, None)


def _wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def nnunet_worker_caps() -> dict[str, str]:
    """nnU-Net's worker-process counts for a worker (the user's own settings win)."""
    from LymphNodeDGSTLib.engine.nnunet_env import worker_count_defaults

    return worker_count_defaults()


def worker_environment(extra: Mapping[str, str] | None = None,
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker: `base` (default: ours) plus `extra`; PYTHONPATH starts with
    the package's folder, then `extra`'s PYTHONPATH, then the inherited one."""
    env = dict(os.environ if base is None else base)
    extra = dict(extra or {})
    paths = [str(PACKAGE_PARENT)]
    for raw in (extra.pop("PYTHONPATH", ""), env.get("PYTHONPATH", "")):
        paths += [p for p in raw.split(os.pathsep) if p]
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in nnunet_worker_caps().items():
        env.setdefault(name, value)
    return env


# --------------------------------------------------------------------------- device locks
@dataclass(frozen=True)
class DeviceLock:
    path: Path
    device: str
    pid: int
    job: str
    kind: str
    pid_start: int | None = None  # the owner's start time, where the OS tells (Linux)


def lock_owner_alive(holder: DeviceLock) -> bool:
    """Whether the lock's owner still runs: same pid and same start time, so a pid the OS gave
    to another process since never keeps a dead job's lock (older locks: the job id check)."""
    if holder.pid_start is not None and process_start_time(holder.pid) is not None:
        return process_running(holder.pid, holder.pid_start)
    return worker_alive(holder.pid, holder.job)


def device_lock_path(jobs_root: str | os.PathLike, device: str) -> Path:
    """`cuda` and `cuda:0` are the same device and share a lock."""
    name = (device or "cpu").strip().lower()
    if name == "cuda":
        name = "cuda:0"
    return Path(jobs_root) / LOCKS_FOLDER / (re.sub(r"[^a-z0-9]+", "_", name) + ".lock")


def read_device_lock(jobs_root: str | os.PathLike, device: str) -> DeviceLock | None:
    """The live holder of `device`'s lock, or None (no lock, or a stale one)."""
    path = device_lock_path(jobs_root, device)
    holder = _read_lock_file(path)
    if holder is None or not lock_owner_alive(holder):
        return None
    return holder


def acquire_device_lock(jobs_root: str | os.PathLike, device: str, job_id: str, kind: str,
                        pid: int | None = None) -> DeviceLock:
    """Take `device`'s lock for `job_id` (atomically: O_CREAT|O_EXCL), recovering a lock whose
    owner is dead. Raises DeviceBusy when a live job holds it."""
    path = device_lock_path(jobs_root, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = pid or os.getpid()
    record = {"pid": owner, "pid_start": process_start_time(owner), "job": job_id, "kind": kind,
              "device": device, "since": utc_now_iso()}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock_file(path)
            if holder is None:
                if _age_s(path) < EMPTY_LOCK_GRACE_S:  # being written right now
                    time.sleep(0.1)
                    continue
                _remove_stale_lock(path, None)
            elif lock_owner_alive(holder):
                raise DeviceBusy(busy_message(holder)) from None
            else:
                _remove_stale_lock(path, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return DeviceLock(path, device, owner, job_id, kind, record["pid_start"])
    holder = _read_lock_file(path)
    raise DeviceBusy(busy_message(holder) if holder else f"could not lock device {device}")


def release_device_lock(lock: DeviceLock) -> None:
    """Remove the lock if it is still ours."""
    holder = _read_lock_file(lock.path)
    if holder is not None and holder.job == lock.job and holder.pid == lock.pid:
        lock.path.unlink(missing_ok=True)


def busy_message(holder: DeviceLock) -> str:
    what = "an adaptation" if holder.kind == "adapt" else f"a '{holder.kind}' job"
    return (f"{what} is already running on {holder.device} (job {holder.job}); wait for it or "
            f"cancel it with 'lndgst jobs cancel {holder.job}'")


def _read_lock_file(path: Path) -> DeviceLock | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        started = data.get("pid_start")
        return DeviceLock(path, str(data["device"]), int(data["pid"]), str(data["job"]),
                          str(data.get("kind", "")), int(started) if started is not None else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_stale_lock(path: Path, judged: DeviceLock | None) -> None:
    """Move the stale lock aside, then check it is the one judged stale: if another process
    replaced it meanwhile with a live lock, put that one back."""
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    moved = _read_lock_file(aside)
    if moved is not None and (judged is None or (moved.pid, moved.job) != (judged.pid, judged.job)) \
            and lock_owner_alive(moved):
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


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

        A job that has already ended is returned unchanged.
        """
        info = self.get(job_id)
        if info.state != "running":
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
             poll: float = 0.5, timeout: float | None = None) -> JobInfo:
        """Follow the job's events (to `on_event`) until it ends; TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        offset = 0
        while True:
            info = self.get(job_id)  # state before events: a terminal state's events are all there
            events, offset = self.events(job_id, offset)
            if on_event is not None:
                for event in events:
                    on_event(event)
            if info.state != "running":
                return info
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
        events, _ = read_events(folder / EVENTS_FILE)
        return next((e for e in events if e.get("type") in TERMINAL_EVENTS), None)

    def _info(self, folder: Path, spec: dict) -> JobInfo:
        pid = _read_pid(folder / PID_FILE)
        # Liveness first, events second: a worker seen dead has written all it ever will.
        alive = pid is not None and worker_alive(pid, folder.name)
        events, _ = read_events(folder / EVENTS_FILE)
        last_progress = next((e for e in reversed(events) if e.get("type") == "progress"), None)
        terminal = next((e for e in events if e.get("type") in TERMINAL_EVENTS), None)
        result = error = None
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
        return JobInfo(id=folder.name, kind=str(spec.get("kind", "")), state=state,
                       created=str(spec.get("created", "")), folder=folder, spec=spec, pid=pid,
                       last_progress=last_progress, result=result, error=error)


def _read_spec(folder: Path) -> dict | None:
    try:
        spec = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _age_since(created: str | None) -> float:
    try:
        since = dt.datetime.fromisoformat(str(created))
    except ValueError:
        return float("inf")
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - since).total_seconds()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
