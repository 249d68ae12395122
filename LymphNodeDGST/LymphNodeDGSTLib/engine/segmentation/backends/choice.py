"""Which backend a segmentation runs with, and putting it in place of the predictor's network.

An explicit backend is converted now if needed (the user asked for it; in Slicer this happens in
the segment job's worker, never in the panel). `auto` uses a cached conversion when the version
has one; otherwise this run uses torch while a background process converts the version for the
next run (prepare.py; started by `start_pending_conversion` once this segmentation
has succeeded, so a failed run leaves the store untouched). Anything that keeps a backend from running means torch, with a
one-line reason; nothing here raises for an optional backend.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from LymphNodeDGSTLib.engine.segmentation.backends.cache import find_cached
from LymphNodeDGSTLib.engine.segmentation.backends.prepare import previous_failure, start_background_conversion
from LymphNodeDGSTLib.engine.segmentation.backends.networks import (BackendChoice, BackendNetwork, ProgressCallback,
                                              build_backend_network, conversion_key, resolve_backend)


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def attach_backend(predictor, requested: str, device: torch.device, checkpoints: Sequence[Path],
                   cache_in: Path | None, progress: ProgressCallback | None = None) -> BackendChoice:
    """Put the backend's stand-in in place of `predictor.network` (or the plain torch network
    back). `cache_in`: the store version's folder (conversions are cached there), or None."""
    network = predictor.network.network if isinstance(predictor.network, BackendNetwork) \
        else predictor.network
    predictor.network = network
    choice = resolve_backend(requested, device)
    if choice.used == "torch":
        return choice
    backend = choice.used
    shape = (1, len(predictor.dataset_json["channel_names"]), *predictor.configuration_manager.patch_size)
    if requested == "auto":
        if cache_in is None:  # a results folder outside the store: nowhere to keep a conversion
            return BackendChoice(requested, "torch")
        try:
            keys = [conversion_key(backend, checkpoint, shape) for checkpoint in checkpoints]
        except Exception as error:
            return BackendChoice(requested, "torch", f"{backend} unavailable ({_one_line(error)}); using torch")
        if not all(find_cached(cache_in, key) for key in keys):
            failure = previous_failure(cache_in, backend)
            if failure:
                return BackendChoice(requested, "torch",
                                     f"{backend} conversion failed earlier ({failure}); using torch")
            return BackendChoice(requested, "torch", f"{backend}: this model version is converted in "
                                 "the background after this run, which uses torch", convert_later=backend)
    try:
        predictor.network = build_backend_network(backend, network, list(predictor.list_of_parameters),
                                                  list(checkpoints), cache_in, shape, progress)
    except Exception as error:  # any failure of an optional backend: torch does the work
        predictor.network = network
        network.load_state_dict(predictor.list_of_parameters[0])
        return BackendChoice(requested, "torch", f"{backend} unavailable ({_one_line(error)}); using torch")
    return choice


def start_pending_conversion(choice: BackendChoice, cache_in: Path | None) -> BackendChoice:
    """After a successful run that `auto` ran with torch: convert the version in the background
    (once); returns the choice without the pending conversion."""
    if choice.convert_later and cache_in is not None:
        start_background_conversion(cache_in, choice.convert_later)
    return replace(choice, convert_later=None)
