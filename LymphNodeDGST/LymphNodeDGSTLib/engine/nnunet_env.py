"""Environment nnU-Net reads at import time, set before any `nnunetv2` import.

nnU-Net warns (and some code paths fail) when its three folders are unset, and it defaults to 8
worker processes. We point the folders at a scratch place under the home directory unless the
user set them, and cap the worker counts to the machine's cores.
"""

from __future__ import annotations

import os
import tempfile


def worker_count_defaults() -> dict[str, str]:
    """nnU-Net's process counts for small machines: augmentation in the training process
    itself, and at most 4 preprocessing/export workers."""
    cores = max(1, min(os.cpu_count() or 1, 4))
    return {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": str(cores)}


def configure_nnunet_environment(scratch_dir: str | None = None) -> None:
    """Set nnU-Net's environment variables where the user has not set them."""
    scratch = scratch_dir or os.path.join(tempfile.gettempdir(), "lndgst-nnunet")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(name, os.path.join(scratch, name))
    for name, value in worker_count_defaults().items():
        os.environ.setdefault(name, value)


configure_nnunet_environment()
