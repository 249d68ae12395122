"""The extension factory's ctest for the module, as SlicerMacroPythonTesting.cmake registers it:
`slicer.testing.runUnitTest([binary dir, source dir], 'LymphNodeDGST')` in a Slicer without torch.

Run as `python -m slicer_harness.ctest SETTINGS_FOLDER` (from Testing/): torch and nnU-Net are
blocked before anything imports them, as in the factory's Slicer, which has no PyTorch.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    for blocked in ("torch", "nnunetv2"):
        sys.modules[blocked] = None  # `import torch` raises ImportError, as where it is not installed
    from slicer_harness.session import MODULE_DIR, SlicerSession

    session = SlicerSession(Path(sys.argv[1])).install()
    session.python_module = session.load_module_file()
    session.slicer.testing.runUnitTest([str(MODULE_DIR)], "LymphNodeDGST")  # raises on failure
    print("ctest passed")
