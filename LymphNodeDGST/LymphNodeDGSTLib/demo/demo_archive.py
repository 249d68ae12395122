"""Where the bundled demo model's archive is, and its name: light (no torch), so the Slicer panel can
offer it at first open and install it in the background."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_NAME = "lymphnode-demo"
DEMO_ZIP_NAME = "lymphnode-demo.zip"


def locate_demo_model() -> Path | None:
    """The shipped demo model zip: $LNDGST_DEMO_MODEL, else the module's Resources/DemoModel."""
    explicit = os.environ.get("LNDGST_DEMO_MODEL")
    if explicit:
        return Path(explicit) if Path(explicit).exists() else None
    shipped = Path(__file__).resolve().parents[2] / "Resources" / "DemoModel" / DEMO_ZIP_NAME
    return shipped if shipped.is_file() else None
