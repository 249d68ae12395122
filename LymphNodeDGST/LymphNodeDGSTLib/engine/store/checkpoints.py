"""Safe loading of nnU-Net checkpoints.

`torch.load` of a file from outside runs pickled code unless `weights_only=True`. nnU-Net's own
trainer stores numpy scalars in its logs, so exactly numpy's scalar reconstructor and dtype classes
are allow-listed; anything else that needs unpickling is refused unless the user trusts the file.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import numpy as np

from LymphNodeDGSTLib.errors import ModelValidationError, UnsafeCheckpointError


def _numpy_safe_globals() -> list:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [scalar, np.dtype, *dtype_classes]


SAFE_GLOBALS = _numpy_safe_globals()
# torch is imported where a checkpoint is loaded: listing the store (the Slicer panel at start) needs none


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint on the CPU; refuse one that needs arbitrary unpickling unless trusted."""
    import torch

    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ModelValidationError(f"{path}: the checkpoint is corrupt or not a PyTorch file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust:
            raise UnsafeCheckpointError(
                f"{path}: the checkpoint needs arbitrary code to load ({_unsafe_reason(error)}); "
                "install it only if you trust its source, with --trust-checkpoint") from None
        checkpoint = _load_untrusted(path)
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError) as error:
        raise ModelValidationError(
            f"{path}: the checkpoint is corrupt or not a PyTorch file ({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelValidationError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def _load_untrusted(path: str) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure of a foreign pickle is a bad file
        raise ModelValidationError(f"{path}: the checkpoint could not be loaded ({_first_line(error)})") from None


def _unsafe_reason(error: BaseException) -> str:
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(error))
    return f"it references {found.group(1)}" if found else _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
