"""Choosing the compute device, and saying why."""

from __future__ import annotations

import torch

from LymphNodeDGSTLib.errors import UserInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def choose_device(requested: str = "auto") -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    requested = (requested or "auto").lower()
    if requested not in DEVICE_CHOICES and not requested.startswith("cuda:"):
        raise UserInputError(f"unknown device '{requested}'; use one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {requested} requested but {describe_cuda_absence()}")
    if requested == "mps" and not _mps_available():
        raise UserInputError("device mps requested but Apple Metal is not available")
    return torch.device(requested)


def describe_cuda_absence() -> str:
    if torch.version.cuda is None:
        return "the installed PyTorch is a CPU-only build"
    return f"no CUDA GPU is visible (PyTorch built for CUDA {torch.version.cuda})"


def describe_device(device: torch.device) -> str:
    """One line for users: which device will be used and why."""
    if device.type == "cuda":
        index = device.index or 0
        properties = torch.cuda.get_device_properties(index)
        return f"GPU {properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "Apple GPU (Metal)"
    return f"CPU ({torch.get_num_threads()} threads): {describe_cuda_absence()}"
