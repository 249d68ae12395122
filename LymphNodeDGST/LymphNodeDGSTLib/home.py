"""The home directory: where models, cases and jobs live.

`--home DIR` on the command line wins, then `$LNDGST_HOME`, then `~/.lymphnode-dgst`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "~/.lymphnode-dgst"
# Kernel file systems: they look like folders but cannot hold our files.
VIRTUAL_FILE_SYSTEMS = (Path("/proc"), Path("/sys"))


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


def home_problem(home: Home) -> str | None:
    """Why `home` cannot be a home (a file, inside /proc or /sys), or None. A home that does not
    exist yet is fine: it is created on first write."""
    root = home.root
    if any(root == top or top in root.parents for top in VIRTUAL_FILE_SYSTEMS):
        return f"home {root} is inside a kernel file system; choose a folder on a disk"
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"home {root}: {folder} is a file, not a folder; choose another home"
            return None
    return None
