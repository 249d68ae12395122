"""An exclusive lock between processes, held on a lock file for the length of a `with` block.

The operating system releases it when the holder exits or is killed, so a crash never leaves a
stale lock behind (unlike a lock *file* whose existence is the lock).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from LymphNodeDGSTLib.errors import UserInputError

if os.name == "nt":
    import msvcrt
else:
    import fcntl

POLL_S = 0.05


@contextmanager
def exclusive_lock(path: str | os.PathLike, timeout: float = 120.0, what: str = "this folder") -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent) for the block; waits up to `timeout`
    seconds for another holder, then raises UserInputError naming `what`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise UserInputError(f"{what} is busy (another lndgst is changing it); try again")
            time.sleep(POLL_S)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(fd: int) -> None:
    if os.name == "nt":
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
