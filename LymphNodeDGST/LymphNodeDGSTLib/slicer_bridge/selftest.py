"""The part of the module's self-test that needs no torch and no nnU-Net.

The extension build factory registers the self-test as a ctest (slicer_add_python_unittest) in a
Slicer without torch: this checks what can be checked there, on the real scene: a CT into the
scene, a segmentation with the lymph-node terminology, the segment back onto the CT's grid, and a
training case saved into a case library. Nothing here imports torch (pytest checks that).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
import vtk

from LymphNodeDGSTLib.slicer_bridge.mrml import (LYMPH_NODE_TERMINOLOGY, labelmap_array_to_segmentation,
                                                 segmentation_to_label_array, sitk_image_to_volume_node)
from LymphNodeDGSTLib.slicer_bridge.cases_section import case_rows, save_case_from_segmentation


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


def segment_save_case_and_adapt(logic, scene, jump_to_node: Callable[..., None], say: Callable[[str], None],
                                idle: Callable[[], None], timeout_s: float = 1800) -> str:
    """The whole loop where torch and nnU-Net are installed: install the demo model, segment a
    site-B phantom in-process, save its truth as a corrected case, adapt for a few iterations in a
    background job (not activated). `logic` is the module logic's ModuleLogic (`core`),
    `jump_to_node` centres the views on a node, `say` shows a step, `idle` keeps
    the application responsive while waiting. Returns the adaptation's outcome text."""
    from LymphNodeDGSTLib.demo.phantom import generate_phantom
    from LymphNodeDGSTLib.slicer_bridge.job_following import JobFollower
    from LymphNodeDGSTLib.slicer_bridge.adapt_section import adapt_request, adaptation_outcome

    say("Installing the demo model")
    model = logic.ensureDefaultModel()
    check(model is not None, "the bundled demo model (Resources/DemoModel) is missing")
    phantom = generate_phantom("B", 7)
    volume = sitk_image_to_volume_node(phantom.image, scene, "phantom CT")

    say("Segmenting (in-process, fast)")
    segmentation, table, rows = logic.segmentInProcess(volume, fast=True)
    check(bool(segmentation.GetSegmentation().GetSegmentIdBySegmentName("lymph node")), "no lymph-node segment")
    check(table.GetNumberOfRows() == len(rows), "the node table does not match the report")
    if rows:
        jump_to_node(rows[0], volume)

    say("Correcting (the phantom's truth plays the clinician) and saving a case")
    labelmap_array_to_segmentation(sitk.GetArrayFromImage(phantom.label), volume, scene,
                                   segmentation_node=segmentation)
    record = logic.saveTrainingCase(volume, segmentation, caseId="selftest")
    check(record.id == "selftest" and record.metadata["label_voxels"] > 0, "the case was not saved")

    say("Adapting (a few iterations, background job, not activated)")
    name = model.partition("@")[0]
    job = logic.startAdaptation(adapt_request(name, iterations=4, iterations_per_epoch=2))
    follower, deadline = JobFollower(logic.jobs, job.id), time.monotonic() + timeout_s
    summary = follower.poll()[1]
    while not summary.finished:
        check(time.monotonic() < deadline, f"adaptation still running: {summary.status_text()}")
        idle()
        time.sleep(0.5)
        summary = follower.poll()[1]
    check(summary.state == "done", f"the adaptation ended {summary.state}: {summary.error}")
    outcome = adaptation_outcome(summary.result)
    check(outcome.parent == model, "the adaptation did not start from the active model")
    check(logic.store().active_version(name) == 1, "the job activated its version (the user chooses)")
    check(len(logic.store().versions(name)) == 2, "the adapted version was not published")
    return outcome.text()
