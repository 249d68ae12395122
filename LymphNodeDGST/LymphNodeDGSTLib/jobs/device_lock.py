"""One exclusive job per device: a lock file naming its owner by pid and start time, judged stale
when that process is gone (or when it stayed empty too long), and the message for a busy device.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from LymphNodeDGSTLib.engine.processes import process_running, process_start_time
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.jobs.events import LOCKS_FOLDER, utc_now_iso
from LymphNodeDGSTLib.jobs.process_tree import worker_alive


# A lock file this old that is still empty was left by a process that died while writing it.
EMPTY_LOCK_GRACE_S = 5.0


class DeviceBusy(UserInputError):
    """Another exclusive job (an adaptation) holds the device."""


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
