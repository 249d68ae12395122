"""A function run on a worker thread, so the panel's GUI thread never waits on it (importing torch
to describe the device, writing loaded volumes for the ranking); the panel's timer asks `done`."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable


class BackgroundCall:
    """`function(*args)` started on a daemon thread; `result` or `error` once `done`."""

    def __init__(self, function: Callable[..., Any], *args: Any, name: str = "lndgst-background"):
        self.result: Any = None
        self.error: BaseException | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(function, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., Any], args: tuple) -> None:
        try:
            self.result = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the GUI thread, shown there
            logging.debug("background call failed", exc_info=True)
            self.error = error
        finally:
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)
