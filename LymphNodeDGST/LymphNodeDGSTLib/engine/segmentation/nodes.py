"""Per-node report: one row per connected component of a lymph-node label image.

Definitions used (documented here once, relied on by the CSV and the Slicer table):

- A node is a connected component of the label's nonzero voxels. Connectivity is 26 (faces,
  edges and corners) by default, so a node drawn slice by slice with diagonal steps stays one node;
  pass ``fully_connected=False`` for 6-connectivity (faces only).
- Nodes are numbered 1..N by descending volume (ties keep SimpleITK's scan order).
- ``centroid_*_mm``: the centroid of the node's voxel centres in the image's physical space, as
  SimpleITK reports it (LPS for images read from DICOM/NIfTI; Slicer's RAS flips x and y).
- Axial plane: the image's third index axis (k, numpy axis 0) is taken as the slice axis, as in
  almost every CT. Diameters are measured within a k slice, in mm, through the direction matrix
  and the in-plane spacing, so anisotropic pixels and oblique directions are handled.
- Diameters are measured on the convex hull of the node's pixels in the slice, each pixel taken
  as a square of half the pixel size around its centre. Pixel centres alone underestimate a
  digitised shape and whole pixel squares overestimate it (each by about half a pixel per side
  near a curved edge); the half-size squares leave almost no bias (on random ellipses at 0.7 mm
  pixels: long axis +0.03 mm, short axis +0.24 mm on average, spread about 0.2 mm).
  ``long_axis_mm`` is the largest diameter (maximum Feret diameter) over all axial slices;
  ``short_axis_mm`` is the node's width perpendicular to that long axis in the same slice (RECIST
  1.1 style). For a convex cross-section such as an ellipse with semi-axes a >= b this is the
  longest perpendicular chord, so the pair is ~2a and ~2b, within about one pixel.
- ``enlarged``: short axis >= 10 mm, the usual threshold for a pathologically enlarged node.
- ``mean_hu``: mean CT value over the node's voxels (None when no CT is given).
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.spatial import ConvexHull

from LymphNodeDGSTLib.atomic import default_mode, temporary_prefix
from LymphNodeDGSTLib.errors import UserInputError, WriteFailed

ENLARGED_SHORT_AXIS_MM = 10.0
_GRID_TOLERANCE = 1e-4


@dataclass(frozen=True)
class NodeRow:
    """One lymph node: its size, position and axial diameters."""

    id: int
    voxels: int
    volume_mm3: float
    centroid_x_mm: float
    centroid_y_mm: float
    centroid_z_mm: float
    long_axis_mm: float
    short_axis_mm: float
    axial_slice: int  # k index of the slice where the diameters were measured
    mean_hu: float | None
    enlarged: bool

    @property
    def centroid_mm(self) -> tuple[float, float, float]:
        return (self.centroid_x_mm, self.centroid_y_mm, self.centroid_z_mm)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(NodeRow))


def image_from_array(
    array_zyx: np.ndarray,
    spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0),
    origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    """A SimpleITK image from a numpy array in SimpleITK's (z, y, x) order plus its geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin_xyz])
    image.SetDirection([float(d) for d in direction])
    return image


def label_nodes(
    label: sitk.Image, min_volume_mm3: float = 0.0, fully_connected: bool = True
) -> sitk.Image:
    """Connected components of ``label != 0`` numbered 1..N by descending volume.

    Components smaller than ``min_volume_mm3`` are dropped (set to 0). The result is a UInt32
    image on the label's grid whose values are the ``id`` column of ``node_report``.
    """
    if label.GetDimension() != 3:
        raise UserInputError(f"The label image must be 3D, not {label.GetDimension()}D.")
    foreground = sitk.NotEqual(label, 0)
    components = sitk.ConnectedComponent(foreground, fully_connected)
    voxel_volume = float(np.prod(label.GetSpacing()))
    min_voxels = int(np.ceil(min_volume_mm3 / voxel_volume - 1e-9)) if min_volume_mm3 > 0 else 0
    return sitk.RelabelComponent(components, minimumObjectSize=min_voxels, sortByObjectSize=True)


def node_report(
    label: sitk.Image,
    ct: sitk.Image | None = None,
    min_volume_mm3: float = 0.0,
    fully_connected: bool = True,
) -> list[NodeRow]:
    """One ``NodeRow`` per node of ``label`` (see the module docstring for the definitions).

    ``ct``, when given, must lie on the label's grid; it supplies ``mean_hu``.
    """
    if ct is not None:
        _check_same_grid(label, ct)
    nodes = label_nodes(label, min_volume_mm3, fully_connected)

    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(nodes)
    ids = sorted(shapes.GetLabels())
    if not ids:
        return []

    means: dict[int, float] = {}
    if ct is not None:
        intensities = sitk.LabelIntensityStatisticsImageFilter()
        intensities.Execute(nodes, ct)
        means = {i: intensities.GetMean(i) for i in ids}

    array = sitk.GetArrayViewFromImage(nodes)
    voxel_volume = float(np.prod(label.GetSpacing()))
    pixel_to_mm = _in_plane_matrix(label)
    rows = []
    for node_id in ids:
        long_axis, short_axis, k = _axial_diameters(array, shapes.GetBoundingBox(node_id),
                                                    node_id, pixel_to_mm)
        voxels = shapes.GetNumberOfPixels(node_id)
        x, y, z = shapes.GetCentroid(node_id)
        rows.append(NodeRow(
            id=node_id,
            voxels=int(voxels),
            volume_mm3=voxels * voxel_volume,
            centroid_x_mm=x,
            centroid_y_mm=y,
            centroid_z_mm=z,
            long_axis_mm=long_axis,
            short_axis_mm=short_axis,
            axial_slice=k,
            mean_hu=means.get(node_id),
            enlarged=short_axis >= ENLARGED_SHORT_AXIS_MM,
        ))
    return rows


def rows_to_table(rows: Sequence[NodeRow]) -> dict[str, list]:
    """The report as columns (name -> values, in ``COLUMNS`` order), e.g. for a Slicer table."""
    return {name: [getattr(row, name) for row in rows] for name in COLUMNS}


def write_node_csv(rows: Sequence[NodeRow], path: str | os.PathLike) -> Path:
    """Write the report as CSV with a header row; atomic (temporary file, then rename).

    Lengths and HU are written with 2 decimals, centroids with 3; a missing mean HU is empty and
    ``enlarged`` is ``true``/``false``.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, default_mode())
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow([_format(name, value)
                                 for name, value in zip(COLUMNS, astuple(row))])
            stream.flush()
            os.fsync(stream.fileno())  # a full disk shows here, before the rename
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise WriteFailed(f"cannot write {path}: {error.strerror or error}; "
                          "nothing was changed") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _format(name: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}" if name.startswith("centroid") else f"{value:.2f}"
    return str(value)


def _check_same_grid(label: sitk.Image, ct: sitk.Image) -> None:
    same = (
        label.GetSize() == ct.GetSize()
        and np.allclose(label.GetSpacing(), ct.GetSpacing(), atol=_GRID_TOLERANCE)
        and np.allclose(label.GetOrigin(), ct.GetOrigin(), atol=_GRID_TOLERANCE)
        and np.allclose(label.GetDirection(), ct.GetDirection(), atol=_GRID_TOLERANCE)
    )
    if not same:
        raise UserInputError("The CT and the label image are not on the same voxel grid.")


def _in_plane_matrix(image: sitk.Image) -> np.ndarray:
    """3x2 matrix taking an in-slice index offset (di, dj) to a physical offset in mm."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    return direction[:, :2] * spacing[:2]


# The corners of a half-size square around a pixel centre, as (di, dj) offsets (see the module
# docstring: this allowance makes the digitisation bias of the diameters close to zero).
_PIXEL_CORNERS = 0.25 * np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])


def _axial_diameters(
    array_kji: np.ndarray, bounding_box: Sequence[int], node_id: int, pixel_to_mm: np.ndarray
) -> tuple[float, float, int]:
    """(long axis, short axis, slice k) of one node: the slice with the largest long axis."""
    i0, j0, k0, size_i, size_j, size_k = bounding_box
    box = array_kji[k0:k0 + size_k, j0:j0 + size_j, i0:i0 + size_i] == node_id
    best = (-1.0, 0.0, k0)
    for dk in range(size_k):
        j, i = np.nonzero(box[dk])
        if i.size == 0:
            continue
        long_axis, short_axis = _footprint_diameters(np.column_stack([i, j]), pixel_to_mm)
        if long_axis > best[0]:
            best = (long_axis, short_axis, k0 + dk)
    return best


def _footprint_diameters(pixels_ij: np.ndarray, pixel_to_mm: np.ndarray) -> tuple[float, float]:
    """Largest diameter of the pixels' (half-size) squares, and their width perpendicular to it."""
    corners = np.unique((pixels_ij[:, None, :] + _PIXEL_CORNERS[None]).reshape(-1, 2), axis=0)
    # A convex hull commutes with the (affine) index -> mm map, so take it in index space.
    hull = corners[ConvexHull(corners).vertices] if len(corners) > 4 else corners
    points = hull @ pixel_to_mm.T  # (n, 3) physical offsets in mm
    differences = points[:, None, :] - points[None, :, :]
    squared = np.einsum("abc,abc->ab", differences, differences)
    a, b = np.unravel_index(np.argmax(squared), squared.shape)
    long_axis = float(np.sqrt(squared[a, b]))
    along = differences[a, b] / long_axis
    normal = np.cross(pixel_to_mm[:, 0], pixel_to_mm[:, 1])
    across = np.cross(normal, along)
    across /= np.linalg.norm(across)
    projections = points @ across
    return long_axis, float(projections.max() - projections.min())
