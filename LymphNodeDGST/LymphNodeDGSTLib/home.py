"""The home directory: where models, cases and jobs live.

`--home DIR` on the command line wins, then `$LNDGST_HOME`, then `~/.lymphnode-dgst`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "~/.lymphnode-dgst"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cases(self) -> Path:
        return self.root / "cases"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"


def resolve_home(explicit: str | os.PathLike | None = None) -> Home:
    """The home chosen by argument, environment or default (not created here)."""
    raw = explicit or os.environ.get("LNDGST_HOME") or DEFAULT_HOME
    return Home(Path(raw).expanduser().resolve())
