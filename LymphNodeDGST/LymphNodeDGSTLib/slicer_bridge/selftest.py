"""The part of the module's self-test that needs no torch and no nnU-Net.

The extension build factory registers the self-test as a ctest (slicer_add_python_unittest) in a
Slicer without torch: this checks what can be checked there, on the real scene: a CT into the
scene, a segmentation with the lymph-node terminology, the segment back onto the CT's grid, and a
training case saved into a case library. Nothing here imports torch (pytest checks that).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk

from LymphNodeDGSTLib.slicer_bridge.mrml import (LYMPH_NODE_TERMINOLOGY, labelmap_array_to_segmentation,
                                                 segmentation_to_label_array, sitk_image_to_volume_node)
from LymphNodeDGSTLib.slicer_bridge.panel import case_rows, save_case_from_segmentation


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def scene_and_case_library(scene, library) -> list[str]:
    """Run the checks on `scene` (an empty vtkMRMLScene is fine) and `library` (an empty
    CaseLibrary); AssertionError names the first that fails. Returns what was checked."""
    ct = np.full((12, 24, 20), -1000, np.int16)  # air, a soft-tissue body and a bone rod: a CT
    ct[:, 3:21, 2:18] = 40
    ct[:, 16:19, 8:11] = 700
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-8.0, 10.0, 30.0))
    label = np.zeros((12, 24, 20), np.uint8)
    label[4:8, 8:14, 6:12] = 1
    volume = sitk_image_to_volume_node(image, scene, "self-test CT")
    segmentation = labelmap_array_to_segmentation(label, volume, scene)
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    terminology = vtk.reference("")
    check(bool(segment.GetTag(segment.GetTerminologyEntryTagName(), terminology))
          and str(terminology) == LYMPH_NODE_TERMINOLOGY, "the segment carries the lymph-node terminology")
    back = segmentation_to_label_array(segmentation, segment_id, volume)
    check(back.shape == label.shape and bool(np.array_equal(back > 0, label > 0)),
          "the segment comes back voxel for voxel on the CT's grid")
    record = save_case_from_segmentation(library, volume, segmentation, case_id="selftest")
    check(record.id == "selftest" and record.metadata["label_voxels"] == int(label.sum()),
          "the training case holds the segment's voxels")
    check([row.id for row in case_rows(library)] == ["selftest"], "the case is listed")
    return ["scene round trip", "terminology", "training case"]
