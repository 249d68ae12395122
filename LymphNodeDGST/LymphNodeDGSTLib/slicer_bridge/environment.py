"""What the panel takes from where it runs: the interpreter background workers start with, and the
home folder from the module's setting. Heavy modules (torch, nnU-Net, matplotlib, SimpleITK) are
imported only inside the functions that need them, in every panel module: importing them must work
in a Slicer whose dependencies are not installed yet, so that the module can offer to install them.
"""

from __future__ import annotations

import shutil
import sys
from typing import Callable

from LymphNodeDGSTLib.home import Home, resolve_home


def worker_python(which: Callable[[str], str | None] = shutil.which,
                  executable: str | None = None) -> str:
    """The interpreter for workers: Slicer's own Python (PythonSlicer) when there is one."""
    return which("PythonSlicer") or executable or sys.executable


def home_from_setting(value: str | None) -> Home:
    """The home folder from the module's setting; empty means the default (resolve_home)."""
    return resolve_home(str(value).strip() or None) if value else resolve_home(None)
