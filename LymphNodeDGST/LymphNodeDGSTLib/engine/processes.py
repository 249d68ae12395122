"""Who owns something: a process identified by its pid *and* its start time.

A pid alone is reused by the OS, so a lock or a staging folder left by a dead process could look
owned by whatever process got its number. The start time (Linux: /proc/PID/stat, field 22, in
clock ticks since boot) tells the two apart. Where the OS does not tell, the pid alone is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

OWNER_TAG = re.compile(r"^(\d+)\.(\d+)$")


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if unknown or not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_running(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, when `start_time` is given and the OS can tell, is
    the process that started then rather than a later one given the same pid."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # cannot tell cheaply here: never judge a Windows owner dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): the pid answers, that is all we know
    if state == "Z":
        return False
    actual = process_start_time(pid)
    return start_time is None or actual is None or actual == start_time


def owner_tag(pid: int | None = None) -> str:
    """'PID.START' for this (or another) process, to put in the name of what it owns."""
    pid = pid or os.getpid()
    return f"{pid}.{process_start_time(pid) or 0}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process a tag names still runs; None for a string that is not a tag."""
    match = OWNER_TAG.match(tag)
    if match is None:
        return None
    start = int(match.group(2)) or None
    return process_running(int(match.group(1)), start)
