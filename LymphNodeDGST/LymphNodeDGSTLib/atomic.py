"""Write-then-rename helpers: a reader never sees a half-written file or folder.

What they create gets the modes other tools give (0666 / 0777 less the user's umask), not the
0600 / 0700 of Python's temporary files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_prefix(name: str, limit: int = 100) -> str:
    """A hidden temporary name's start for `name`, short enough that the whole temporary name stays
    within the 255 bytes a file name may hold (a legal 240-byte name plus a suffix would not), and
    valid UTF-8 whatever `name` holds."""
    # bytes that are not UTF-8 (surrogates here) left out: ITK may be given the temporary name
    name = name.encode("utf-8", "ignore").decode("utf-8")
    while len(os.fsencode(name)) > limit:  # whole characters, never half of one
        name = name[:-1]
    return f".{name}."


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def temporary_sibling(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file name in `path`'s folder (same file system, so os.replace is atomic).

    The temporary file is removed if the block fails; on success the caller has replaced it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp" + suffix, dir=path.parent)
    os.chmod(tmp, default_mode())
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        _remove_quietly(tmp)


@contextmanager
def staging_folder(parent: str | os.PathLike, prefix: str = ".staging-") -> Iterator[Path]:
    """A temporary folder inside `parent`, removed unless the caller renamed it away."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, default_mode(folder=True))
    try:
        yield folder
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode open()/mkdir() would give a new file or folder: 0666/0777 less the umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def _remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
