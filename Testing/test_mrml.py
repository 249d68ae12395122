"""The MRML bridge against Slicer's real MRML library (the slicer-core package).

Volumes are built the way Slicer holds them (RAS IJK-to-RAS directions) and must match, exactly,
what SimpleITK reads from the same file (LPS).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip(
    "slicer", reason="slicer-core (Slicer's MRML library; pip install slicer-core) is not installed"
)
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from LymphNodeDGSTLib.slicer_bridge import mrml  # noqa: E402  (needs slicer)
from LymphNodeDGSTLib.engine.images.geometry import ImageGeometry  # noqa: E402

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
SPACING = (0.7, 0.9, 3.0)
ORIGIN_RAS = (12.5, -40.25, 77.0)
SHAPE_ZYX = (7, 9, 11)


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    axis_vector = np.asarray(axis, dtype=np.float64)
    x, y, z = axis_vector / np.linalg.norm(axis_vector)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array(
        [
            [c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
            [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
            [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)],
        ]
    )


DIRECTIONS_RAS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),  # LPS-aligned, the usual DICOM CT in Slicer
    "oblique": _rotation((1.0, 2.0, 0.5), 20.0),
}


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _ct_array(shape: tuple[int, int, int] = SHAPE_ZYX) -> np.ndarray:
    return np.random.default_rng(7).integers(-1024, 2000, shape).astype(np.int16)


def _volume_node_ras(scene, array_zyx: np.ndarray, direction_ras: np.ndarray, name: str = "CT"):
    """A volume node built the way Slicer builds one, independently of mrml.py."""
    image = vtk.vtkImageData()
    image.SetDimensions(array_zyx.shape[::-1])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(array_zyx).ravel(), deep=True)
    )
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(SPACING)
    node.SetOrigin(ORIGIN_RAS)
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, direction_ras[row, column])
    node.SetIJKToRASDirectionMatrix(matrix)
    return node


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _label_array(shape: tuple[int, int, int] = SHAPE_ZYX) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 2:6, 3:8] = 1
    label[5, 7, 9] = 1  # single voxel
    label[-1, -1, -1] = 1  # corner voxels: the extent must not be cropped or shifted
    label[0, 0, 0] = 1
    return label


@pytest.mark.parametrize("direction_name", DIRECTIONS_RAS)
def test_volume_to_array_is_lps_and_round_trips_exactly(scene, direction_name):
    direction_ras = DIRECTIONS_RAS[direction_name]
    ct = _ct_array()
    node = _volume_node_ras(scene, ct, direction_ras)

    array, geometry = mrml.volume_to_array(node)
    assert array.dtype == np.int16 and np.array_equal(array, ct)
    assert geometry.spacing == SPACING
    assert geometry.origin == tuple(RAS_TO_LPS @ np.asarray(ORIGIN_RAS))
    assert np.array_equal(geometry.direction_matrix, RAS_TO_LPS @ direction_ras)
    array[0, 0, 0] += 1  # a copy, not a view of Slicer's memory
    assert mrml.volume_to_array(node)[0][0, 0, 0] == ct[0, 0, 0]

    image = mrml.volume_node_to_sitk(node)
    assert ImageGeometry.from_sitk(image) == geometry
    back = mrml.sitk_image_to_volume_node(image, scene, "back")
    assert np.array_equal(_ijk_to_ras(back), _ijk_to_ras(node))
    back_array, back_geometry = mrml.volume_to_array(back)
    assert np.array_equal(back_array, ct) and back_geometry == geometry


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("direction_name", DIRECTIONS_RAS)
def test_geometry_equals_what_simpleitk_reads_from_a_slicer_written_file(
    scene, tmp_path, direction_name, suffix
):
    node = _volume_node_ras(scene, _ct_array(), DIRECTIONS_RAS[direction_name])
    path = tmp_path / f"ct{suffix}"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)

    array, geometry = mrml.volume_to_array(node)
    read = sitk.ReadImage(str(path))
    assert geometry.isclose(ImageGeometry.from_sitk(read), atol=1e-6)
    assert np.array_equal(array, sitk.GetArrayFromImage(read))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("direction_name", DIRECTIONS_RAS)
def test_geometry_of_a_file_loaded_by_slicer_equals_simpleitks(
    scene, tmp_path, direction_name, suffix
):
    image = sitk.GetImageFromArray(_ct_array())
    image.SetSpacing(SPACING)
    image.SetOrigin(tuple(RAS_TO_LPS @ np.asarray(ORIGIN_RAS)))
    image.SetDirection(tuple((RAS_TO_LPS @ DIRECTIONS_RAS[direction_name]).ravel()))
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    array, geometry = mrml.volume_to_array(node)
    read = sitk.ReadImage(str(path))
    assert geometry.isclose(ImageGeometry.from_sitk(read), atol=1e-6)
    assert np.array_equal(array, sitk.GetArrayFromImage(read))


def test_image_data_extent_not_starting_at_zero_moves_the_origin(scene):
    direction_ras = DIRECTIONS_RAS["oblique"]
    node = _volume_node_ras(scene, _ct_array(), direction_ras)
    node.GetImageData().SetExtent(2, 12, 1, 9, 3, 9)  # same size, first voxel is (2, 1, 3)
    _, geometry = mrml.volume_to_array(node)
    first_voxel_ras = (_ijk_to_ras(node) @ np.array([2.0, 1.0, 3.0, 1.0]))[:3]
    np.testing.assert_allclose(geometry.origin, RAS_TO_LPS @ first_voxel_ras, rtol=0, atol=1e-9)


@pytest.mark.parametrize("direction_name", DIRECTIONS_RAS)
def test_label_array_round_trips_through_a_segmentation_exactly(scene, direction_name):
    ct_node = _volume_node_ras(scene, _ct_array(), DIRECTIONS_RAS[direction_name])
    label = _label_array()

    segmentation_node = mrml.labelmap_array_to_segmentation(label, ct_node, scene)
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("lymph node")
    assert segment_id

    nodes_before = scene.GetNumberOfNodes()
    exported = mrml.segmentation_to_label_array(segmentation_node, segment_id, ct_node)
    assert scene.GetNumberOfNodes() == nodes_before  # the temporary labelmap is gone
    assert exported.dtype == np.uint8
    assert np.array_equal(exported, label)

    # The segment's own labelmap sits on the CT's grid (what the Segment Editor paints on).
    internal = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, internal)
    world = vtk.vtkMatrix4x4()
    internal.GetImageToWorldMatrix(world)
    world_array = [[world.GetElement(r, c) for c in range(4)] for r in range(4)]
    np.testing.assert_allclose(world_array, _ijk_to_ras(ct_node), atol=1e-12)


def test_multi_valued_labels_become_one_binary_segment(scene):
    ct_node = _volume_node_ras(scene, _ct_array(), DIRECTIONS_RAS["flipped"])
    label = _label_array().astype(np.int32) * 7
    label[4, 4, 4] = 2
    segmentation_node = mrml.labelmap_array_to_segmentation(label, ct_node, scene)
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("lymph node")
    exported = mrml.segmentation_to_label_array(segmentation_node, segment_id, ct_node)
    assert np.array_equal(exported, (label != 0).astype(np.uint8))


def test_segment_carries_lymph_node_terminology_and_colour(scene):
    ct_node = _volume_node_ras(scene, _ct_array(), np.eye(3))
    segmentation_node = mrml.labelmap_array_to_segmentation(_label_array(), ct_node, scene)
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("lymph node"))

    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    assert tag == "TerminologyEntry"
    value = vtk.reference("")
    assert segment.GetTag(tag, value)
    serialized = str(value)
    assert serialized == mrml.LYMPH_NODE_TERMINOLOGY
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(serialized, entry)
    assert entry.GetTerminologyContextName() == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
    )

    def code(coded_entry) -> tuple[str, str, str]:
        return (
            coded_entry.GetCodingSchemeDesignator(),
            coded_entry.GetCodeValue(),
            coded_entry.GetCodeMeaning(),
        )

    assert code(entry.GetCategoryObject()) == ("SCT", "85756007", "Tissue")
    assert code(entry.GetTypeObject()) == ("SCT", "59441001", "Lymph node")
    # Slicer's serializer writes the same string from the same codes.
    assert slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry) == serialized
    np.testing.assert_allclose(segment.GetColor(), mrml.LYMPH_NODE_COLOR)

    # The segmentation is tied to the CT: reference geometry and the same transform parent.
    assert segmentation_node.GetNodeReferenceID(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) == ct_node.GetID()


def test_segmenting_again_replaces_the_segment_and_keeps_its_id(scene):
    ct_node = _volume_node_ras(scene, _ct_array(), DIRECTIONS_RAS["oblique"])
    segmentation_node = mrml.labelmap_array_to_segmentation(_label_array(), ct_node, scene)
    segmentation = segmentation_node.GetSegmentation()
    segmentation.AddEmptySegment("", "other")
    segment_id = segmentation.GetSegmentIdBySegmentName("lymph node")

    second = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    second[2:5, 1:3, 4:6] = 1
    same_node = mrml.labelmap_array_to_segmentation(
        second, ct_node, scene, segmentation_node=segmentation_node
    )
    assert same_node is segmentation_node
    assert segmentation.GetNumberOfSegments() == 2
    assert segmentation.GetNthSegmentID(0) == segment_id
    exported = mrml.segmentation_to_label_array(segmentation_node, segment_id, ct_node)
    assert np.array_equal(exported, second)
    empty_id = segmentation.GetSegmentIdBySegmentName("other")
    assert not mrml.segmentation_to_label_array(segmentation_node, empty_id, ct_node).any()


def test_segmentation_follows_a_transformed_volume(scene):
    ct_node = _volume_node_ras(scene, _ct_array(), DIRECTIONS_RAS["oblique"])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 15.0)
    matrix.SetElement(1, 1, 0.0), matrix.SetElement(1, 2, -1.0)
    matrix.SetElement(2, 1, 1.0), matrix.SetElement(2, 2, 0.0)
    transform.SetMatrixTransformToParent(matrix)
    ct_node.SetAndObserveTransformNodeID(transform.GetID())

    label = _label_array()
    segmentation_node = mrml.labelmap_array_to_segmentation(label, ct_node, scene)
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("lymph node")
    exported = mrml.segmentation_to_label_array(segmentation_node, segment_id, ct_node)
    assert np.array_equal(exported, label)


def test_wrong_shapes_and_unknown_segments_are_refused(scene):
    ct_node = _volume_node_ras(scene, _ct_array(), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        mrml.labelmap_array_to_segmentation(np.zeros((2, 2, 2), np.uint8), ct_node, scene)
    segmentation_node = mrml.labelmap_array_to_segmentation(_label_array(), ct_node, scene)
    with pytest.raises(ValueError, match="no segment"):
        mrml.segmentation_to_label_array(segmentation_node, "missing", ct_node)
    with pytest.raises(ValueError, match="no image data"):
        mrml.volume_to_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


def test_report_becomes_a_table_node(scene):
    columns = {
        "node": [1, 2, 3],
        "volume_mm3": [512.5, 33.0, None],
        "short_axis_mm": [11.2, 4.1, 6.0],
        "level": ["II", "III", "IV"],
    }
    table_node = mrml.node_report_to_table(
        columns, scene, "Lymph nodes", units={"volume_mm3": "mm3"}
    )
    table = table_node.GetTable()
    assert table_node.GetName() == "Lymph nodes"
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(columns)
    assert table.GetNumberOfRows() == 3
    assert [table.GetValue(r, 0).ToInt() for r in range(3)] == [1, 2, 3]
    assert table.GetValue(0, 1).ToDouble() == 512.5 and math.isnan(table.GetValue(2, 1).ToDouble())
    assert [table.GetValue(r, 3).ToString() for r in range(3)] == ["II", "III", "IV"]
    assert isinstance(table.GetColumnByName("level"), vtk.vtkStringArray)
    assert table_node.GetColumnUnitLabel("volume_mm3") == "mm3"

    rows = [{"node": 1, "level": "II"}, {"node": 2, "level": "V"}]
    same = mrml.node_report_to_table(rows, scene, "ignored", table_node=table_node)
    assert same is table_node
    assert table.GetNumberOfColumns() == 2 and table.GetNumberOfRows() == 2
    assert table.GetValue(1, 1).ToString() == "V"

    with pytest.raises(ValueError, match="length"):
        mrml.node_report_to_table({"a": [1, 2], "b": [1]}, scene, "bad")


def _shared_data() -> Path:
    configured = os.environ.get("LNDGST_SHARED_DATA")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.shared_data
def test_real_ct_and_label_loaded_by_slicer_match_simpleitk(scene):
    case = _shared_data() / "sts" / "STS_002"
    if not (case / "image.nii.gz").exists():
        pytest.skip(f"real CT test data not found at {case}")

    def load(path: Path, node_class: str):
        node = scene.AddNewNodeByClass(node_class, path.stem)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
        return node

    ct_node = load(case / "image.nii.gz", "vtkMRMLScalarVolumeNode")
    array, geometry = mrml.volume_to_array(ct_node)
    ct = sitk.ReadImage(str(case / "image.nii.gz"))
    assert geometry.isclose(ImageGeometry.from_sitk(ct), atol=1e-6)
    assert np.array_equal(array, sitk.GetArrayFromImage(ct))

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "label.nii.gz")))
    assert label.any()
    segmentation_node = mrml.labelmap_array_to_segmentation(label, ct_node, scene)
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("lymph node")
    exported = mrml.segmentation_to_label_array(segmentation_node, segment_id, ct_node)
    assert np.array_equal(exported, (label != 0).astype(np.uint8))
