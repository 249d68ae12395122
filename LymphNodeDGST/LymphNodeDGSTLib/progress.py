"""Progress shown on a terminal: one tqdm bar per stage of a long step."""

from __future__ import annotations

import sys

from tqdm import tqdm

STAGE_NAMES = {
    "load": "loading model",
    "convert": "converting model",
    "quantize": "quantising model (INT8)",
    "compile": "compiling model",
    "preprocess": "preprocessing",
    "predict": "sliding window",
    "resample": "resampling",
    "rank": "ranking (per mille)",
    "probe": "choosing the learning rate",
}


class TerminalProgress:
    """A `progress(stage, done, total)` callback drawing tqdm bars on stderr."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm | None = None
        self._stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=STAGE_NAMES.get(stage, stage), unit="step",
                             file=sys.stderr, leave=False)
        assert self._bar is not None
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None

    def __enter__(self) -> "TerminalProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
