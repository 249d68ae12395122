"""Running a button's action so that a failure shows one clear message and the panel goes on.

Slicer 5.10's `slicer.util.tryWithErrorDisplay` shows its dialog and then *re-raises*
(Base/Python/slicer/util.py, v5.10.0, lines 3368-3409: `errorDisplay(...)` then `raise`), so every
statement after a `with tryWithErrorDisplay(...)` block is skipped after a failure (tables and
buttons were not refreshed) and the exception reaches Qt's slot as a traceback. `reported` shows
the message and swallows the exception; code after the block always runs.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from LymphNodeDGSTLib.errors import UserInputError


@dataclass
class Attempt:
    """What happened inside a `reported` block."""

    error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@contextmanager
def reported(message: str, show_error: Callable[[str, str], None]) -> Iterator[Attempt]:
    """Run the block; on an exception call `show_error(text, details)` once (details: the
    traceback, empty for a UserInputError, which is the user's to fix) and continue after it."""
    attempt = Attempt()
    try:
        yield attempt
    except Exception as error:  # noqa: BLE001 - a button's failure must never escape to Qt
        attempt.error = error
        details = "" if isinstance(error, UserInputError) else traceback.format_exc()
        if details:
            logging.error("%s\n%s", message, details)
        show_error(f"{message}\n\n{error}", details)
