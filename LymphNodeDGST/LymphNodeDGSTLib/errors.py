"""Exceptions that carry a message meant for the user.

`UserInputError` and its subclasses mean "bad input or usage": the command line prints the message
as one line on stderr and exits with status 2, having written nothing.
"""


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
    """A file the user cares about could not be written (disk full, quota, I/O error): exit 1
    with one line; the earlier file, if any, is left as it was."""
