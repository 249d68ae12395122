"""Per-node report on synthetic ellipsoids whose true size and position are known."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.engine.segmentation.nodes import (
    COLUMNS,
    NodeRow,
    image_from_array,
    label_nodes,
    node_report,
    rows_to_table,
    write_node_csv,
)

SPACING_XYZ = (0.7, 0.7, 2.5)
SHAPE_ZYX = (14, 56, 56)


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = math.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "oblique": _rotation((1, 2, 3), 25) @ np.diag([1.0, -1.0, 1.0]),
}


class Grid:
    """A voxel grid, with each voxel's physical position and in-frame coordinates in mm."""

    def __init__(self, direction: np.ndarray, origin=(-12.0, 30.0, 5.0)):
        self.direction = direction
        self.origin = np.asarray(origin, dtype=float)
        k, j, i = np.indices(SHAPE_ZYX, dtype=float)
        # Offsets along the image's own axes (mm), shape (3, z, y, x) in x, y, z order.
        self.local = np.stack([i, j, k]) * np.asarray(SPACING_XYZ)[:, None, None, None]

    def physical(self, local_point) -> np.ndarray:
        return self.origin + self.direction @ np.asarray(local_point, dtype=float)

    def ellipsoid(self, centre_local, semi_axes, in_plane_degrees=0.0) -> np.ndarray:
        """Voxels inside an ellipsoid with its a, b axes in the axial (k) plane, turned in-plane."""
        q = self.local - np.asarray(centre_local, dtype=float)[:, None, None, None]
        angle = math.radians(in_plane_degrees)
        u = math.cos(angle) * q[0] + math.sin(angle) * q[1]
        v = -math.sin(angle) * q[0] + math.cos(angle) * q[1]
        a, b, c = semi_axes
        return (u / a) ** 2 + (v / b) ** 2 + (q[2] / c) ** 2 <= 1.0

    def image(self, array: np.ndarray) -> sitk.Image:
        return image_from_array(array, SPACING_XYZ, self.origin, self.direction.ravel())


@pytest.mark.parametrize("name", DIRECTIONS)
def test_ellipsoid_size_position_and_diameters(name):
    grid = Grid(DIRECTIONS[name])
    centre = np.array([19.3, 20.1, 16.9])  # mm along the image axes, off the voxel centres
    a, b, c = 8.0, 5.0, 4.0
    mask = grid.ellipsoid(centre, (a, b, c), in_plane_degrees=30.0)
    ct = np.where(mask, 45, -80).astype(np.int16)

    rows = node_report(grid.image(mask.astype(np.uint8)), grid.image(ct))

    assert len(rows) == 1
    row = rows[0]
    true_volume = 4 / 3 * math.pi * a * b * c
    assert row.voxels == int(mask.sum())
    assert row.volume_mm3 == pytest.approx(row.voxels * np.prod(SPACING_XYZ))
    assert abs(row.volume_mm3 - true_volume) / true_volume < 0.05
    half_voxel = 0.5 * min(SPACING_XYZ)
    assert np.linalg.norm(np.array(row.centroid_mm) - grid.physical(centre)) < half_voxel
    # The true cross-section in the measured slice is an ellipse of semi-axes (a, b) * scale.
    scale = math.sqrt(1 - ((row.axial_slice * SPACING_XYZ[2] - centre[2]) / c) ** 2)
    pixel_diagonal = math.hypot(*SPACING_XYZ[:2])
    assert abs(row.long_axis_mm - 2 * a * scale) < pixel_diagonal
    assert abs(row.short_axis_mm - 2 * b * scale) < pixel_diagonal
    assert abs(row.long_axis_mm - 2 * a) < 1.0 and abs(row.short_axis_mm - 2 * b) < 1.0
    assert row.mean_hu == 45.0
    assert row.id == 1


def test_short_axis_threshold_flags_enlarged_nodes():
    grid = Grid(np.eye(3))
    big = grid.ellipsoid((12.0, 12.0, 16.25), (7.0, 6.0, 6.0))
    small = grid.ellipsoid((28.0, 28.0, 16.25), (5.0, 3.5, 4.0))
    rows = node_report(grid.image((big | small).astype(np.uint8)))
    assert [row.enlarged for row in rows] == [True, False]
    assert rows[0].short_axis_mm == pytest.approx(12.0, abs=1.0)
    assert rows[1].short_axis_mm == pytest.approx(7.0, abs=1.0)
    assert all(row.mean_hu is None for row in rows)


def test_nodes_are_numbered_by_descending_volume_and_filtered_by_volume():
    grid = Grid(np.eye(3))
    small = grid.ellipsoid((8.0, 8.0, 16.25), (3.0, 3.0, 3.0))
    large = grid.ellipsoid((20.0, 25.0, 16.25), (8.0, 6.0, 5.0))
    medium = grid.ellipsoid((32.0, 8.0, 16.25), (5.0, 4.0, 4.0))
    ct = np.full(SHAPE_ZYX, -100, np.int16)
    ct[small], ct[large], ct[medium] = 10, 30, 20
    label = grid.image((small | large | medium).astype(np.uint8))

    rows = node_report(label, grid.image(ct))
    assert [row.id for row in rows] == [1, 2, 3]
    assert [row.mean_hu for row in rows] == [30.0, 20.0, 10.0]
    volumes = [row.volume_mm3 for row in rows]
    assert volumes == sorted(volumes, reverse=True)

    threshold = (volumes[1] + volumes[2]) / 2
    filtered = node_report(label, grid.image(ct), min_volume_mm3=threshold)
    assert [row.mean_hu for row in filtered] == [30.0, 20.0]
    assert filtered[:2] == rows[:2]

    relabelled = sitk.GetArrayFromImage(label_nodes(label, min_volume_mm3=threshold))
    assert set(np.unique(relabelled)) == {0, 1, 2}
    assert np.array_equal(relabelled == 1, large) and not relabelled[small].any()


def test_label_values_other_than_one_count_as_foreground():
    grid = Grid(np.eye(3))
    node = grid.ellipsoid((20.0, 20.0, 16.25), (5.0, 4.0, 4.0))
    [as_one] = node_report(grid.image(node.astype(np.uint8)))
    [as_seven] = node_report(grid.image((node * 7).astype(np.int16)))
    assert as_one == as_seven


def test_connectivity_option():
    array = np.zeros((3, 4, 4), np.uint8)
    array[1, 1, 1] = array[1, 2, 2] = 1  # touching only at an edge
    label = image_from_array(array)
    assert len(node_report(label)) == 1
    assert len(node_report(label, fully_connected=False)) == 2


def test_single_pixel_diameters_are_those_of_a_half_size_square():
    array = np.zeros((3, 5, 5), np.uint8)
    array[1, 2, 2] = 1
    [row] = node_report(image_from_array(array, spacing_xyz=(0.6, 0.8, 3.0)))
    assert row.long_axis_mm == pytest.approx(0.5)  # the 0.3 x 0.4 mm square's diagonal
    assert row.short_axis_mm == pytest.approx(0.48)  # its width across that diagonal
    assert row.volume_mm3 == pytest.approx(0.6 * 0.8 * 3.0)


def test_empty_label_gives_empty_report_and_header_only_csv(tmp_path):
    label = image_from_array(np.zeros(SHAPE_ZYX, np.uint8), SPACING_XYZ)
    assert node_report(label) == []
    assert rows_to_table([]) == {name: [] for name in COLUMNS}
    path = write_node_csv([], tmp_path / "nodes.csv")
    assert path.read_text().splitlines() == [",".join(COLUMNS)]


def test_ct_on_another_grid_is_refused():
    label = image_from_array(np.ones((4, 4, 4), np.uint8))
    ct = image_from_array(np.zeros((4, 4, 4), np.int16), spacing_xyz=(1.0, 1.0, 2.0))
    with pytest.raises(UserInputError, match="same voxel grid"):
        node_report(label, ct)


def test_csv_and_table_content(tmp_path):
    rows = [
        NodeRow(1, 500, 612.5, -10.25, 20.5, -300.125, 15.91, 10.04, 7, 41.237, True),
        NodeRow(2, 20, 24.5, 1.0, 2.0, 3.0, 4.2, 3.1, 3, None, False),
    ]
    path = tmp_path / "nodes.csv"
    path.write_text("stale")
    assert write_node_csv(rows, path) == path
    with path.open(newline="") as stream:
        records = list(csv.DictReader(stream))
    assert tuple(records[0]) == COLUMNS == (
        "id", "voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
        "long_axis_mm", "short_axis_mm", "axial_slice", "mean_hu", "enlarged")
    assert records[0] == {
        "id": "1", "voxels": "500", "volume_mm3": "612.50", "centroid_x_mm": "-10.250",
        "centroid_y_mm": "20.500", "centroid_z_mm": "-300.125", "long_axis_mm": "15.91",
        "short_axis_mm": "10.04", "axial_slice": "7", "mean_hu": "41.24", "enlarged": "true"}
    assert records[1]["mean_hu"] == "" and records[1]["enlarged"] == "false"
    assert [p.name for p in tmp_path.iterdir()] == ["nodes.csv"]  # no temporary file left

    table = rows_to_table(rows)
    assert list(table) == list(COLUMNS)
    assert table["id"] == [1, 2] and table["mean_hu"] == [41.237, None]
    assert table["enlarged"] == [True, False]
