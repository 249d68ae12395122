"""Which backend a segmentation runs with, and putting it in place of the predictor's network.

An explicit backend is converted now if needed (the user asked for it; in Slicer this happens in
the segment job's worker, never in the panel); an explicit `openvino-int8` is calibrated on the
reference cases (reference.py) when the version has no INT8 model yet. `auto` uses a cached
conversion when the version has one, and then what the version's guard decision adopted
(OpenVINO bf16 or INT8 in place of f32: decision.py); otherwise this run uses torch (or f32,
when only the decision is missing) while a background process converts and guards the version
for the next run (backend_guard.py; started by `start_pending_conversion` once this segmentation
has succeeded, so a failed run leaves the store untouched). A backend that cannot run falls back
to OpenVINO f32 and then to torch, with a one-line reason; nothing here raises for an optional
backend.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from LymphNodeDGSTLib.engine.segmentation.backends.cache import find_cached
from LymphNodeDGSTLib.engine.segmentation.backends.calibration import calibration_set, nncf_version
from LymphNodeDGSTLib.engine.segmentation.backends.decision import (backend_line, decision_key, find_decision,
                                                                    summary_of)
from LymphNodeDGSTLib.engine.segmentation.backends.hardware import detect_bf16
from LymphNodeDGSTLib.engine.segmentation.backends.names import OPENVINO_BACKENDS
from LymphNodeDGSTLib.engine.segmentation.backends.prepare import previous_failure, start_background_conversion
from LymphNodeDGSTLib.engine.segmentation.backends.networks import (BackendChoice, BackendNetwork, ProgressCallback,
                                                                    build_backend_network, conversion_key,
                                                                    one_line, package_status, resolve_backend)
from LymphNodeDGSTLib.engine.segmentation.backends.reference import CALIBRATION, reference_cases
from LymphNodeDGSTLib.engine.store.architectures import read_json
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints


def network_input_shape(predictor) -> tuple[int, ...]:
    """The shape of one sliding-window tile: (1, channels, *patch)."""
    return (1, len(predictor.dataset_json["channel_names"]), *predictor.configuration_manager.patch_size)


def auto_decision_key(checkpoints: Sequence[Path], shape: Sequence[int]) -> str:
    """The key of the guard decision that applies to this version here (hardware included)."""
    return decision_key(checkpoints, shape, package_status("openvino")[0] or "-", nncf_version(),
                        detect_bf16().tag)


def version_input_shape(version_path: Path) -> tuple[int, ...]:
    """`network_input_shape` read from an installed version's files (no predictor loaded)."""
    plans = read_json(version_path / "plans.json")
    dataset_json = read_json(version_path / "dataset.json")
    metadata = read_json(version_path / "version.json") if (version_path / "version.json").is_file() else {}
    patch = plans["configurations"][metadata.get("configuration", "3d_fullres")]["patch_size"]
    return (1, len(dataset_json["channel_names"]), *patch)


def auto_status(version_path: Path) -> str:
    """What `auto` runs for an installed version on this computer, in one line, for the panel
    (the same words as `segment`'s report): e.g. "openvino-bf16, guard Dice 0.9981"."""
    checkpoints = list(find_checkpoints(version_path).values())
    try:
        shape = version_input_shape(version_path)
        keys = [conversion_key("openvino", checkpoint, shape) for checkpoint in checkpoints]
    except Exception as error:
        return f"torch ({one_line(error)})"
    if not all(find_cached(version_path, key) for key in keys):
        failure = previous_failure(version_path, "openvino")
        return f"torch (OpenVINO conversion failed: {failure})" if failure else \
            "torch until the background conversion after the first run"
    decision = find_decision(version_path, auto_decision_key(checkpoints, shape))
    if decision is None:
        return "openvino (bf16/INT8 guard after the next run)"
    return backend_line(decision.chosen, summary_of(decision))


def _auto(requested: str, backend: str, checkpoints: Sequence[Path], shape: Sequence[int],
          cache_in: Path | None) -> BackendChoice:
    """What `auto` runs now: torch until the version is converted, then the guard's choice."""
    if cache_in is None:  # a results folder outside the store: nowhere to keep a conversion
        return BackendChoice(requested, "torch")
    try:
        keys = [conversion_key(backend, checkpoint, shape) for checkpoint in checkpoints]
    except Exception as error:
        return BackendChoice(requested, "torch", f"{backend} unavailable ({one_line(error)}); using torch")
    if not all(find_cached(cache_in, key) for key in keys):
        failure = previous_failure(cache_in, backend)
        if failure:
            return BackendChoice(requested, "torch",
                                 f"{backend} conversion failed earlier ({failure}); using torch")
        return BackendChoice(requested, "torch", f"{backend}: this model version is converted in "
                             "the background after this run, which uses torch", convert_later=backend)
    if backend != "openvino":
        return BackendChoice(requested, backend)
    decision = find_decision(cache_in, auto_decision_key(checkpoints, shape))
    if decision is not None:
        return BackendChoice(requested, decision.chosen, detail=summary_of(decision))
    failure = previous_failure(cache_in, backend)
    if failure:  # the background guard process itself failed: not started again on every run
        return BackendChoice(requested, backend, detail=f"bf16/INT8 guard failed ({failure})")
    # converted before the guard existed, or on other hardware, or the guard is running
    return BackendChoice(requested, backend, detail="bf16/INT8 guard runs in the background after this run",
                         convert_later=backend)


def _calibration_source(predictor, cache_in: Path | None):
    """The INT8 calibration set, computed on first use: the reference cases' tiles."""
    @functools.cache
    def calibrate():
        if cache_in is None:
            raise RuntimeError("no model version folder to find reference cases for")
        return calibration_set(predictor, reference_cases(cache_in, CALIBRATION))
    return calibrate


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
    shape = network_input_shape(predictor)
    if requested == "auto":
        choice = _auto(requested, choice.used, checkpoints, shape, cache_in)
        if choice.used == "torch":
            return choice
    failures = []
    # the chosen backend, then OpenVINO f32 for a bf16/INT8 one that cannot run, then torch
    fallbacks = [choice.used] + (["openvino"] if choice.used in OPENVINO_BACKENDS[1:] else [])
    for backend in fallbacks:
        try:
            if progress:
                progress("compile", 0, 1)
            predictor.network = build_backend_network(
                backend, network, list(predictor.list_of_parameters), list(checkpoints), cache_in,
                shape, progress, _calibration_source(predictor, cache_in))
            if progress:
                progress("compile", 1, 1)
        except Exception as error:  # any failure of an optional backend: the next one does the work
            predictor.network = network
            failures.append(f"{backend} unavailable ({one_line(error)})")
            continue
        if not failures:
            return choice
        return replace(choice, used=backend, detail=None,
                       reason="; ".join(failures) + f"; using {backend}")
    network.load_state_dict(predictor.list_of_parameters[0])
    return replace(choice, used="torch", detail=None, reason="; ".join(failures) + "; using torch")


def start_pending_conversion(choice: BackendChoice, cache_in: Path | None) -> BackendChoice:
    """After a successful run that `auto` ran without its final backend: convert and guard the
    version in the background (once); returns the choice without the pending conversion."""
    if choice.convert_later and cache_in is not None:
        start_background_conversion(cache_in, choice.convert_later)
    return replace(choice, convert_later=None)
