"""Exceptions that carry a message meant for the user, and the exit codes they decide.

`UserInputError` and its subclasses mean "bad input or usage": the command line prints the message
as one line on stderr and exits with status 2, having written nothing.
"""


import errno
import unicodedata


class UserInputError(Exception):
    """Bad input or usage: one clear message, exit status 2, nothing written."""


class ModelValidationError(UserInputError):
    """An nnU-Net results folder (or zip) that cannot be installed as it is."""


class UnsafeCheckpointError(ModelValidationError):
    """A checkpoint that would need arbitrary unpickling to load."""


class Cancelled(Exception):
    """Work stopped on request. Deliberately not a RuntimeError: nnU-Net retries RuntimeErrors."""


class OutOfMemory(Exception):
    """The device ran out of memory; the message says what to try instead."""


# Exit status of the command line and of anything that follows a job on a terminal.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class WriteFailed(Exception):
    """A file the user cares about could not be written (disk full, quota, I/O error): exit 2
    with one line; the earlier file, if any, is left as it was."""


# Failures of the user's file system, not of our code: the user can fix them (free space, choose a
# writable folder), so they are reported like bad input. Any other OSError stays a bug.
_ENVIRONMENT_HINTS = {
    errno.ENOSPC: "free some space (or choose another folder) and run the command again",
    errno.EDQUOT: "free some space within your quota and run the command again",
    errno.EROFS: "the file system is read-only; choose a writable folder (--home, or another output)",
    errno.EACCES: "no permission; choose files and folders you may use",
    errno.EPERM: "operation not permitted; choose files and folders you may use",
    errno.ENAMETOOLONG: "a name is longer than the file system allows (255 bytes); choose a shorter one",
}


def environment_problem(error: BaseException) -> str | None:
    """One line for an OSError the user's environment caused (full disk, read-only file system,
    no permission), or None for any other error."""
    if not isinstance(error, OSError) or error.errno not in _ENVIRONMENT_HINTS:
        return None
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}: {_ENVIRONMENT_HINTS[error.errno]}"


def printable(text: object) -> str:
    """Text read from a file, safe for a terminal: control and format characters (line breaks,
    ESC sequences, bidi overrides) shown as Python escapes (`\\n`, `\\x1b`) instead of acting."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Cf") else c
                   for c in str(text))

