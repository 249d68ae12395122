"""Segmentation quality: Dice and the 95th-percentile Hausdorff distance, in physical units."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def image_dice(label: sitk.Image, truth: sitk.Image) -> float:
    """Dice of two label images, every non-zero label counting as foreground."""
    return dice(sitk.GetArrayViewFromImage(label) > 0, sitk.GetArrayViewFromImage(truth) > 0)


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> float | None:
    """Symmetric 95th-percentile surface distance in mm; None when either mask is empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if not prediction.any() or not truth.any():
        return None
    surface_p = prediction & ~ndimage.binary_erosion(prediction)
    surface_t = truth & ~ndimage.binary_erosion(truth)
    to_truth = ndimage.distance_transform_edt(~surface_t, sampling=spacing_zyx)
    to_prediction = ndimage.distance_transform_edt(~surface_p, sampling=spacing_zyx)
    distances = np.concatenate([to_truth[surface_p], to_prediction[surface_t]])
    return float(np.percentile(distances, 95))


def case_metrics(prediction: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    return {"dice": dice(prediction, truth), "hd95_mm": hd95(prediction, truth, spacing_zyx)}
