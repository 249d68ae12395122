"""Body crop: a synthetic body on a scanner table, and the real CTs of ../shared/data."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeDGSTLib.engine.segmentation.body_crop import BodyBox, find_body_box

SPACING_ZYX = (2.5, 1.0, 1.0)
SHAPE_ZYX = (30, 160, 160)
BODY_SLICES = (3, 27)  # first, last + 1
BODY_CENTRE_YX, BODY_SEMI_AXES_YX = (70, 80), (40, 60)
TABLE_ROWS = (132, 142)


def _phantom(bridge: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(CT in HU, body mask): an elliptic body lying on a dense table, joined by a head rest."""
    rng = np.random.default_rng(0)
    ct = rng.normal(-1000, 20, SHAPE_ZYX).astype(np.int16)
    y, x = np.ogrid[:SHAPE_ZYX[1], :SHAPE_ZYX[2]]
    (cy, cx), (ay, ax) = BODY_CENTRE_YX, BODY_SEMI_AXES_YX
    ellipse = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1
    body = np.zeros(SHAPE_ZYX, bool)
    body[BODY_SLICES[0]:BODY_SLICES[1]] = ellipse
    ct[body] = 40
    ct[body & (np.abs(x - cx) < 15)[None] & (np.abs(y - cy) < 10)[None]] = -850  # lung: inside
    ct[:, TABLE_ROWS[0]:TABLE_ROWS[1], 5:155] = 300  # the table runs through every slice
    if bridge:
        ct[BODY_SLICES[0]:BODY_SLICES[1], cy + ay - 3:TABLE_ROWS[0], cx - 10:cx + 10] = 200
    return ct, body


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.nonzero(mask)
    return np.array([i.min() for i in indices]), np.array([i.max() + 1 for i in indices])


def test_box_holds_body_and_margin_but_not_the_table():
    ct, body = _phantom()
    box = find_body_box(ct, SPACING_ZYX, margin_mm=10.0)

    margin_voxels = np.ceil(10.0 / np.array(SPACING_ZYX)).astype(int)  # 4 slices, 10 rows/columns
    first, last = _bounds(body)
    assert np.all(np.array(box.start_zyx) <= np.maximum(first - margin_voxels, 0))
    assert np.all(np.array(box.stop_zyx) >= np.minimum(last + margin_voxels, SHAPE_ZYX))
    table = np.zeros(SHAPE_ZYX, bool)
    table[:, TABLE_ROWS[0]:TABLE_ROWS[1], 5:155] = True
    assert table[box.slices].sum() < 0.25 * table.sum()  # at most a sliver of the table
    assert box.start_zyx[1] > 0 and box.start_zyx[2] > 0 and box.stop_zyx[2] < SHAPE_ZYX[2]
    assert box.fraction_of(SHAPE_ZYX) < 0.7


def test_margin_is_converted_per_axis_and_clipped():
    ct, body = _phantom(bridge=False)
    tight = find_body_box(ct, SPACING_ZYX, margin_mm=0.0)
    first, last = _bounds(body)
    # Without margin the box is the body's, rounded out to whole analysis blocks (4 mm in-plane
    # here, one slice in z) plus one block per side.
    start, stop = np.array(tight.start_zyx), np.array(tight.stop_zyx)
    assert np.all(start <= first) and np.all(first - start < [1, 8, 8])
    assert np.all(stop >= last) and np.all(stop - last < [1, 8, 8])

    wide = find_body_box(ct, SPACING_ZYX, margin_mm=5.0)
    assert np.array_equal(np.subtract(tight.start_zyx, wide.start_zyx), [2, 5, 5])
    assert np.array_equal(np.subtract(wide.stop_zyx, tight.stop_zyx), [2, 5, 5])

    huge = find_body_box(ct, SPACING_ZYX, margin_mm=500.0)
    assert huge.covers(SHAPE_ZYX) and huge.fraction_of(SHAPE_ZYX) == 1.0


def test_threshold_is_in_hu():
    ct, _ = _phantom(bridge=False)
    assert find_body_box(ct, SPACING_ZYX, threshold_hu=500.0) is None  # nothing that dense


def test_all_air_gives_none():
    air = np.random.default_rng(1).normal(-1000, 30, (10, 64, 64)).astype(np.int16)
    assert find_body_box(air, (3.0, 1.0, 1.0)) is None


def test_small_object_survives_without_the_opening():
    ct = np.full((8, 40, 40), -1000, np.int16)
    ct[3:5, 15:25, 15:25] = 50  # 10 mm across: thinner than the opening disk
    box = find_body_box(ct, (1.0, 1.0, 1.0), margin_mm=1.0)
    assert box is not None
    assert box.start_zyx[0] <= 2 and box.stop_zyx[0] >= 6


def test_box_slices_select_the_box():
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    box = BodyBox((1, 2, 3), (4, 5, 7))
    assert np.array_equal(array[box.slices], array[1:4, 2:5, 3:7])
    assert box.shape == (3, 3, 4) and box.voxels == 36 and not box.covers(array.shape)


def _shared_ct(name: str) -> Path:
    root = Path(os.environ.get("LNDGST_SHARED_DATA",
                               Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    path = root / "ct" / name
    if not path.is_file():
        pytest.skip(f"real CT {path} is absent")
    return path


@pytest.mark.shared_data
def test_real_head_and_neck_ct_is_cropped_fast_and_table_is_left_out():
    image = sitk.ReadImage(str(_shared_ct("hn_ct_pycerr.nii.gz")))
    array = sitk.GetArrayFromImage(image)  # 90 x 511 x 511, HU
    spacing = image.GetSpacing()[::-1]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        box = find_body_box(array, spacing)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0
    # The patient lies on a head rest and table top (rows ~355-410); the box stops above them.
    assert box.stop_zyx[1] < 390
    assert box.fraction_of(array.shape) < 0.6


@pytest.mark.shared_data
def test_real_small_head_ct_keeps_the_whole_body():
    image = sitk.ReadImage(str(_shared_ct("head_ct_slicer.nii.gz")))
    array = sitk.GetArrayFromImage(image)  # values are HU as stored (air about -920)
    box = find_body_box(array, image.GetSpacing()[::-1])
    tissue = array > -500
    assert tissue[box.slices].sum() >= 0.999 * tissue.sum()
