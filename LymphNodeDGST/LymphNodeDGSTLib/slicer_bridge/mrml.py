"""The bridge between Slicer's MRML scene and the core: volume nodes <-> arrays, label arrays <->
segmentation nodes, per-node reports -> table nodes.

This is the only core module that imports `slicer`, and it uses only the MRML API (no Qt, no
`slicer.util`, no application object), so it runs both inside 3D Slicer and headless with the
`slicer-core` package. Arrays are indexed [z, y, x]; geometry is LPS, exactly as SimpleITK reads
the same volume from a file. Slicer works in RAS, so the first two rows of every direction and
the first two origin coordinates change sign on the way through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from LymphNodeDGSTLib.engine.images.geometry import ImageGeometry

# RAS <-> LPS: flip the first two axes (its own inverse).
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# Slicer's own entry for "lymph node" (3D Slicer General Anatomy list, Slicer 5.x): SNOMED CT
# 59441001 "Lymph node" in the category 85756007 "Tissue", serialized the way Slicer stores it in
# a segment's "TerminologyEntry" tag: context~category~type~type modifier~anatomic context~
# region~region modifier, each code as scheme^value^meaning.
LYMPH_NODE_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue"
    "~SCT^59441001^Lymph node"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~^^"
    "~^^"
)
# The recommended display colour of that entry (RGB 68, 172, 100).
LYMPH_NODE_COLOR = (68 / 255, 172 / 255, 100 / 255)


def volume_to_array(volume_node: slicer.vtkMRMLVolumeNode) -> tuple[np.ndarray, ImageGeometry]:
    """A copy of a scalar volume's voxels ([z, y, x]) and its geometry in LPS.

    The geometry is the node's own (local) one: a parent transform, if any, is not applied.
    """
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume node {volume_node.GetName()!r} holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume node {volume_node.GetName()!r} has {image.GetNumberOfScalarComponents()} "
            "components per voxel; only scalar volumes are supported"
        )
    dims_xyz = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = array.reshape(dims_xyz[::-1]).copy()

    direction_ras = _direction_ras(volume_node)
    spacing = np.asarray(volume_node.GetSpacing(), dtype=np.float64)
    origin_ras = np.asarray(volume_node.GetOrigin(), dtype=np.float64)
    first_voxel = np.asarray(image.GetExtent()[0::2], dtype=np.float64)
    if first_voxel.any():  # image data whose extent does not start at 0: origin of voxel (0,0,0)
        origin_ras = origin_ras + direction_ras @ (spacing * first_voxel)
    geometry = ImageGeometry(
        spacing=tuple(spacing),
        origin=tuple(_LPS_FROM_RAS @ origin_ras),
        direction=tuple((_LPS_FROM_RAS @ direction_ras).ravel()),
    )
    return array, geometry


def array_to_volume_node(
    array_zyx: np.ndarray,
    geometry: ImageGeometry,
    scene: slicer.vtkMRMLScene,
    name: str,
    labelmap: bool = False,
) -> slicer.vtkMRMLScalarVolumeNode:
    """A new scalar (or labelmap) volume node in `scene` holding a copy of `array_zyx`."""
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    volume_node = scene.AddNewNodeByClass(node_class, name)
    update_volume_node_from_array(volume_node, array_zyx, geometry)
    volume_node.CreateDefaultDisplayNodes()
    return volume_node


def update_volume_node_from_array(
    volume_node: slicer.vtkMRMLVolumeNode, array_zyx: np.ndarray, geometry: ImageGeometry
) -> None:
    """Replace a volume node's voxels and geometry with a copy of `array_zyx` on `geometry`."""
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"expected a 3D array indexed [z, y, x], got shape {array_zyx.shape}")
    if array_zyx.dtype == np.bool_:
        array_zyx = array_zyx.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array_zyx.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_zyx).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)

    volume_node.SetSpacing(geometry.spacing)
    volume_node.SetOrigin(tuple(_LPS_FROM_RAS @ np.asarray(geometry.origin)))
    volume_node.SetIJKToRASDirectionMatrix(_matrix4x4(_LPS_FROM_RAS @ geometry.direction_matrix))
    volume_node.SetAndObserveImageData(image)


def volume_node_to_sitk(volume_node: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """The SimpleITK image SimpleITK would read from the file this volume node was loaded from."""
    array, geometry = volume_to_array(volume_node)
    return geometry.to_sitk(array)


def sitk_image_to_volume_node(
    image: sitk.Image, scene: slicer.vtkMRMLScene, name: str, labelmap: bool = False
) -> slicer.vtkMRMLScalarVolumeNode:
    """A new volume node in `scene` holding a 3D scalar SimpleITK image."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("only scalar images can become volume nodes")
    return array_to_volume_node(
        sitk.GetArrayFromImage(image), ImageGeometry.from_sitk(image), scene, name, labelmap
    )


def labelmap_array_to_segmentation(
    label_zyx: np.ndarray,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    scene: slicer.vtkMRMLScene,
    segment_name: str = "lymph node",
    color: Sequence[float] = LYMPH_NODE_COLOR,
    terminology: str = LYMPH_NODE_TERMINOLOGY,
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
    node_name: str | None = None,
) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node on the reference volume's grid with one segment: every nonzero voxel.

    `label_zyx` must have the reference volume's shape. The segment carries `color` and the
    `terminology` entry (Slicer's serialized format). Given `segmentation_node`, a segment of the
    same name in it is replaced (keeping its ID) instead of creating a new node.
    """
    _register_segmentation_converter_rules()
    label_zyx = np.asarray(label_zyx)
    reference_image = reference_volume_node.GetImageData()
    if reference_image is None:
        raise ValueError(
            f"reference volume {reference_volume_node.GetName()!r} holds no image data"
        )
    expected_shape = reference_image.GetDimensions()[::-1]
    if label_zyx.shape != expected_shape:
        raise ValueError(
            f"label array shape {label_zyx.shape} differs from the reference volume's "
            f"{expected_shape} ([z, y, x])"
        )

    mask = slicer.vtkOrientedImageData()
    mask.SetExtent(reference_image.GetExtent())
    mask.SetSpacing(reference_volume_node.GetSpacing())
    mask.SetOrigin(reference_volume_node.GetOrigin())
    direction = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASDirectionMatrix(direction)
    mask.SetDirectionMatrix(direction)
    binary = np.ascontiguousarray(label_zyx != 0, dtype=np.uint8)
    mask.GetPointData().SetScalars(numpy_support.numpy_to_vtk(binary.ravel(), deep=True))

    if segmentation_node is None:
        node_name = node_name or f"{reference_volume_node.GetName()} {segment_name}"
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    # Same frame as the volume, so the segment lands on its voxels even under a transform.
    segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())

    segment = slicer.vtkSegment()
    segment.SetName(segment_name)
    segment.SetColor(*color)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
    segment.AddRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), mask
    )
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    insert_before = ""
    if segment_id:
        index = segmentation.GetSegmentIndex(segment_id)
        if index + 1 < segmentation.GetNumberOfSegments():
            insert_before = segmentation.GetNthSegmentID(index + 1)
        segmentation.RemoveSegment(segment_id)
    if not segmentation.AddSegment(segment, segment_id, insert_before):
        raise RuntimeError(f"Slicer refused to add segment {segment_name!r}")
    return segmentation_node


def segmentation_to_label_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
) -> np.ndarray:
    """One segment as a uint8 0/1 array ([z, y, x]) on the reference volume's exact grid.

    Uses Slicer's own export, so edits made in the Segment Editor, any source representation and
    transforms between the two nodes are all taken into account. The scene is left as it was.
    """
    _register_segmentation_converter_rules()
    scene = segmentation_node.GetScene()
    if scene is None:
        raise ValueError("the segmentation node must be in a scene")
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(
            f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}"
        )

    nodes_before = _node_ids(scene)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LymphNodeDGST export")
    try:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node,
            [segment_id],
            labelmap_node,
            reference_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        )
        if not exported:
            raise RuntimeError(f"Slicer could not export segment {segment_id!r} to a labelmap")
        label, _ = volume_to_array(labelmap_node)
    finally:
        for node_id in _node_ids(scene) - nodes_before:  # the labelmap and anything it brought
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)

    expected_shape = reference_volume_node.GetImageData().GetDimensions()[::-1]
    if label.shape != expected_shape:
        raise RuntimeError(f"exported labelmap has shape {label.shape}, expected {expected_shape}")
    return (label != 0).astype(np.uint8)


def node_report_to_table(
    report: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    scene: slicer.vtkMRMLScene,
    name: str,
    units: Mapping[str, str] | None = None,
    table_node: slicer.vtkMRMLTableNode | None = None,
) -> slicer.vtkMRMLTableNode:
    """A table node holding a report given as columns ({name: values}) or rows ([{name: value}]).

    Numbers become numeric columns (missing values NaN), anything else text. `units` labels
    columns (e.g. {"volume_mm3": "mm3"}). Given `table_node`, its contents are replaced.
    """
    columns = _as_columns(report)
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"report columns differ in length: {sorted(lengths)}")

    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        table_node.RemoveAllColumns()
    for column_name, values in columns.items():
        table_node.AddColumn(_vtk_column(column_name, values))
    for column_name, unit in (units or {}).items():
        table_node.SetColumnUnitLabel(column_name, unit)
    table_node.Modified()
    return table_node


def _direction_ras(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])


def _matrix4x4(direction: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, float(direction[row, column]))
    return matrix


def _node_ids(scene: slicer.vtkMRMLScene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _register_segmentation_converter_rules() -> None:
    """Register the representation converters Slicer's Segmentations module registers at startup.

    Inside Slicer they are already there; headless (slicer-core) the factory starts empty and
    segmentations could then not even hold a binary labelmap.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
    ):
        factory.RegisterConverterRule(rule())


def _as_columns(
    report: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
) -> dict[str, list[Any]]:
    if isinstance(report, Mapping):
        return {str(key): list(values) for key, values in report.items()}
    columns: dict[str, list[Any]] = {}
    for row in report:
        for key in row:
            columns.setdefault(str(key), [])
    for row in report:
        for key, values in columns.items():
            values.append(row.get(key))
    return columns


def _vtk_column(name: str, values: list[Any]) -> vtk.vtkAbstractArray:
    """An integer column if all values are integers, a float column (None -> NaN) if all are
    numbers or None, otherwise a text column."""
    integer_types = (int, np.integer, np.bool_)  # bool is an int
    number_types = (*integer_types, float, np.floating)
    present = [value for value in values if value is not None]
    if values and all(isinstance(value, integer_types) for value in values):
        array = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.int64), deep=True)
    elif present and all(isinstance(value, number_types) for value in present):
        array = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.float64), deep=True)
    else:
        array = vtk.vtkStringArray()
        for value in values:
            array.InsertNextValue("" if value is None else str(value))
    array.SetName(name)
    return array
