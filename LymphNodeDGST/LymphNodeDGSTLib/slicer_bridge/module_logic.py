"""What the Slicer module's logic class does, as plain Python: the home's job manager, model store
and case library, and the starts of segmentation and adaptation.

The module's `LymphNodeDGSTLogic` (Slicer's base class) holds one as `core`, with the home folder from
Qt's settings, and adds the one call that needs Slicer's markups module; everything here runs with slicer-core alone.
Method names follow Slicer's camelCase, since the widget and the self-test call them.
"""

from __future__ import annotations

from typing import Any

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.slicer_bridge.cases_section import case_rows, save_case_from_segmentation
from LymphNodeDGSTLib.slicer_bridge.segment_section import (import_segmentation_result, new_segmentation_files, segment_editor_node, segment_in_process, submit_segmentation, write_segmentation_input)
from LymphNodeDGSTLib.slicer_bridge.model_section import model_rows
from LymphNodeDGSTLib.slicer_bridge.adapt_section import submit_adaptation
from LymphNodeDGSTLib.slicer_bridge.environment import worker_python


class ModuleLogic:
    """A thin facade over LymphNodeDGSTLib for one home folder and one MRML scene."""

    def __init__(self, home: Home, scene: Any = None):
        self.home = home
        self.scene = scene
        self._segmenter, self._segmenterKey = None, None

    @property
    def jobs(self) -> JobManager:
        return JobManager(self.home.jobs)

    def store(self):
        from LymphNodeDGSTLib.engine.store.models import ModelStore

        return ModelStore(self.home.models)

    def library(self):
        from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary

        return CaseLibrary(self.home.cases)

    def demoModelArchive(self):
        """The bundled demo model's archive when the store holds no model yet (light: no torch)."""
        from LymphNodeDGSTLib.demo.demo_archive import locate_demo_model

        return None if self.store().names() else locate_demo_model()

    def ensureDefaultModel(self):
        from LymphNodeDGSTLib.demo.demo_model import ensure_default_model

        return ensure_default_model(self.store())

    def modelRows(self) -> list:
        return model_rows(self.store())

    def caseRows(self) -> list:
        return case_rows(self.library())

    def activate(self, name: str, version):
        return self.store().activate(name, int(version))

    def rollback(self, name: str):
        return self.store().rollback(name)

    def segmentEditorNode(self):
        return segment_editor_node(self.scene)

    def startSegmentation(self, volumeNode, model=None, device="auto", fast=False, backend="auto"):
        """Write the CT for a background segmentation job and start it: (JobInfo, files)."""
        if volumeNode is None:
            raise UserInputError("Select the CT volume to segment.")
        files = new_segmentation_files(self.home)
        try:
            write_segmentation_input(volumeNode, files)
            return submit_segmentation(self.jobs, self.home, files, model, device, fast,
                                       python=worker_python(), backend=backend), files
        except Exception:
            files.remove()
            raise

    def importSegmentation(self, files, volumeNode, segmentationNode=None, tableNode=None):
        return import_segmentation_result(files, volumeNode, self.scene, segmentationNode, tableNode)

    def segmentInProcess(self, volumeNode, segmentationNode=None, model=None, device="auto", fast=True):
        from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

        if self._segmenterKey != (self.home.models, device):  # kept loaded between calls
            self._segmenter = Segmenter(self.store(), device=device)
            self._segmenterKey = (self.home.models, device)
        return segment_in_process(self._segmenter, volumeNode, self.scene, model, fast, segmentationNode)

    def saveTrainingCase(self, volumeNode, segmentationNode, selectedSegmentId=None, caseId=None):
        return save_case_from_segmentation(self.library(), volumeNode, segmentationNode,
                                           selectedSegmentId, caseId)

    def startAdaptation(self, request) -> JobInfo:
        return submit_adaptation(self.jobs, self.home, request, python=worker_python())
