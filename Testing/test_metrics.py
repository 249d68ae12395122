"""Dice and HD95 on small masks whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeDGSTLib.adaptation.metrics import dice, hd95, image_dice


def test_dice_counts_overlap_and_treats_two_empty_masks_as_perfect():
    truth = np.zeros((4, 4, 4), bool)
    truth[0, 0, :4] = True
    prediction = np.zeros_like(truth)
    prediction[0, 0, 2:] = True
    assert dice(prediction, truth) == pytest.approx(2 * 2 / (2 + 4))
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert dice(np.zeros_like(truth), truth) == 0.0


def test_image_dice_counts_every_nonzero_label_as_foreground():
    truth = np.zeros((3, 5, 5), np.uint8)
    truth[1, 1:3, 1:3] = 1
    prediction = np.zeros_like(truth)
    prediction[1, 1:3, 1:3] = 7      # another label value, same voxels
    prediction[1, 4, 4] = 2          # one false positive
    score = image_dice(sitk.GetImageFromArray(prediction), sitk.GetImageFromArray(truth))
    assert score == pytest.approx(2 * 4 / (5 + 4))


def test_hd95_is_in_millimetres_and_none_for_an_empty_mask():
    truth = np.zeros((1, 1, 10), bool)
    truth[0, 0, 2] = True
    prediction = np.zeros_like(truth)
    prediction[0, 0, 5] = True
    assert hd95(prediction, truth, (1.0, 1.0, 2.0)) == pytest.approx(6.0)  # 3 voxels x 2 mm
    assert hd95(np.zeros_like(truth), truth, (1.0, 1.0, 1.0)) is None
