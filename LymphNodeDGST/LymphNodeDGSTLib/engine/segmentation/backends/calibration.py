"""INT8 for OpenVINO: post-training quantisation of a version's f32 IR with NNCF.

Calibration runs the network on tiles exactly as the segmenter feeds them: each reference case
through nnU-Net's own preprocessing, padded and cut by the predictor's sliding-window tiling,
at most MAX_CALIBRATION_TILES tiles in all, spread evenly over each case. Only the cases given are
used (the case library's when it has cases, else phantoms: reference.py). NNCF is imported only
here, when a version is quantised; a failure raises, and the caller falls back.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from LymphNodeDGSTLib.engine.segmentation.backends.reference import ReferenceCase

MAX_CALIBRATION_TILES = 16


@dataclass(frozen=True)
class CalibrationSet:
    """The network inputs NNCF collects statistics on, and the case each one came from."""

    tiles: list[np.ndarray]
    case_of_tile: list[str]

    @property
    def cases(self) -> list[str]:
        return sorted(set(self.case_of_tile))


def nncf_version() -> str | None:
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return None


def case_tiles(predictor, case: ReferenceCase) -> list[np.ndarray]:
    """The sliding-window tiles (1, C, *patch) the network would see for `case`."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    # the same call as segmenter.preprocess_case (kept here: the segmenter imports this package)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case_npy(
        case.array_zyx[None].astype(np.float32, copy=False), None,
        {"spacing": list(case.spacing_zyx)}, predictor.plans_manager,
        predictor.configuration_manager, predictor.dataset_json)
    padded, _ = pad_nd_image(torch.from_numpy(data), predictor.configuration_manager.patch_size,
                             "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    return [np.ascontiguousarray(padded[slicer][None].numpy(), dtype=np.float32)
            for slicer in slicers]


def evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[int(i * len(items) / count)] for i in range(count)]


def calibration_set(predictor, cases: Sequence[ReferenceCase],
                    max_tiles: int = MAX_CALIBRATION_TILES) -> CalibrationSet:
    if not cases:
        raise RuntimeError("no cases to calibrate INT8 on")
    tiles, names = [], []
    share = max(1, max_tiles // len(cases))
    for case in cases:
        for tile in evenly(case_tiles(predictor, case), share)[:max_tiles - len(tiles)]:
            tiles.append(tile)
            names.append(case.name)
    return CalibrationSet(tiles, names)


def quantize_openvino_int8(f32_model_xml: Path, calibration: CalibrationSet, folder: Path) -> None:
    """Write the INT8 model (`folder/model.xml`) quantised from the f32 IR on `calibration`."""
    import nncf
    import openvino as ov

    if not calibration.tiles:
        raise RuntimeError("calibration set is empty")
    model = ov.Core().read_model(str(f32_model_xml))
    quantized = nncf.quantize(model, nncf.Dataset(calibration.tiles),
                              subset_size=len(calibration.tiles),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
