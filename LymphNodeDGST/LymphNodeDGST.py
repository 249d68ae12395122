"""LymphNodeDGST: the 3D Slicer module. Glue only: Qt widgets <-> LymphNodeDGSTLib.

Long work runs in background jobs (LymphNodeDGSTLib.jobs.manager) followed by a QTimer; the panel's state
machine and everything it shows come from LymphNodeDGSTLib.slicer_bridge (one module per panel section), which is tested without Slicer.
Core modules that need torch or nnU-Net are imported only once the packages are installed.
"""

import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from LymphNodeDGSTLib.slicer_bridge import dependencies
from LymphNodeDGSTLib.slicer_bridge.editor import EmbeddedSegmentEditor
from LymphNodeDGSTLib.slicer_bridge.reporting import reported
from LymphNodeDGSTLib.slicer_bridge.module_logic import ModuleLogic
from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD as ADAPT_DEFAULT_METHOD
from LymphNodeDGSTLib.adaptation.methods import METHODS as ADAPT_METHODS
from LymphNodeDGSTLib.engine.segmentation.backends.names import BACKEND_CHOICES
from LymphNodeDGSTLib.slicer_bridge.environment import home_from_setting, worker_python
from LymphNodeDGSTLib.slicer_bridge.folder_segmentation import folder_result_text, submit_folder_segmentation
from LymphNodeDGSTLib.slicer_bridge.cases_section import CASE_COLUMNS
from LymphNodeDGSTLib.slicer_bridge.segment_section import (DEVICE_CHOICES, NODE_TABLE_COLUMNS, backend_text, node_centroid_world, node_table_cells)
from LymphNodeDGSTLib.slicer_bridge.model_section import (INSTALL_JOB_KIND, MODEL_COLUMNS, device_text, export_adapter_for_row, install_job_params, selected_model_name)
from LymphNodeDGSTLib.slicer_bridge.job_following import (POLL_INTERVAL_MS, JobFollower, failure_text, running_job, write_curve_png)
from LymphNodeDGSTLib.slicer_bridge.panel_state import PanelStateMachine, adapt_blocker, segment_blocker
from LymphNodeDGSTLib.slicer_bridge.adapt_section import adapt_request, adaptation_outcome
from LymphNodeDGSTLib.slicer_bridge.ranking_panel import (RANK_BUTTONS, RANK_COLUMNS, RANK_JOB_KIND,
    doubtful_point_ras, library_hashes, open_ranked_ct, rank_rows, snapshot_loaded_volumes, start_rank_job,
    write_snapshot_for_ranking)  # noqa: E128
from LymphNodeDGSTLib.slicer_bridge.background_call import BackgroundCall
from LymphNodeDGSTLib.demo.demo_archive import DEMO_MODEL_NAME

HOME_SETTING = "LymphNodeDGST/Home"
DOCUMENTATION_URL = "https://github.com/lymphnode-dgst/SlicerLymphNodeDGST#readme"


class LymphNodeDGST(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Lymph Node DGST")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]  # slicer.modules.markups, the Segment Editor
        self.parent.contributors = ["LymphNodeDGST developers"]
        self.parent.helpText = _(
            "Segments lymph nodes in CT with an nnU-Net v2 model, lets you correct the result and "
            "save it as a training case, and adapts the model to your site's scans with Dynamic "
            "Gradient Sparsification Training (DGST) in the background. Not for clinical use "
            "without local validation.") + " " + _(
            'See the <a href="{url}">module documentation</a>.').format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "Built on nnU-Net v2 (Isensee et al., Nature Methods 2021), PyTorch, SimpleITK and 3D "
            "Slicer; its structure follows SlicerNNUNet and SlicerMONAIAuto3DSeg.")


@parameterNodeWrapper
class LymphNodeDGSTParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    nodeTable: vtkMRMLTableNode
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    fast: bool = False
    method: Annotated[str, Choice(list(ADAPT_METHODS))] = ADAPT_DEFAULT_METHOD
    gamma: Annotated[int, WithinRange(1, 64)] = 2
    iterations: Annotated[int, WithinRange(1, 100000)] = 250
    adaptDevice: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    backend: Annotated[str, Choice(list(BACKEND_CHOICES))] = "auto"


class LymphNodeDGSTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.machine = PanelStateMachine()
        self.follower = None
        self.jobContext = {}
        self.modelRows, self.caseRows, self.nodeRows = [], [], []
        self.outcome = None
        self.ready = False
        self._curveEpochs = 0
        self.deviceLookup = None
        self.installing = False

    # ------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LymphNodeDGST.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LymphNodeDGSTLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.deviceTimer = qt.QTimer()  # the device line is worked out on a thread (it imports torch)
        self.deviceTimer.setInterval(100)
        self.deviceTimer.connect("timeout()", self.onDeviceLookupPoll)

        self.segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        self.editor = EmbeddedSegmentEditor(self.segmentEditorWidget, slicer.mrmlScene, self.logic.core.segmentEditorNode,
                                            slicer.qSlicerSegmentEditorEffectFactory.instance())
        self.ui.segmentEditorContainer.layout().addWidget(self.segmentEditorWidget)
        for table, columns in ((self.ui.modelsTableWidget, MODEL_COLUMNS),
                               (self.ui.casesTableWidget, CASE_COLUMNS),
                               (self.ui.nodesTableWidget, [title for _, title in NODE_TABLE_COLUMNS])):
            table.setColumnCount(len(columns))
            table.setHorizontalHeaderLabels(list(columns))
        self.ui.adaptResultWidget.visible = False
        self.ui.homeDirectoryButton.directory = str(self.logic.core.home.root)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.homeDirectoryButton.connect("directoryChanged(QString)", self.onHomeChanged)
        self.ui.activateButton.connect("clicked(bool)", self.onActivate)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.ui.exportAdapterButton.connect("clicked(bool)", self.onExportAdapter)
        self.ui.installAdapterButton.connect("clicked(bool)", self.onInstallAdapter)
        self.ui.browseZipButton.connect("clicked(bool)", lambda: self.onBrowse(folder=False))
        self.ui.browseFolderButton.connect("clicked(bool)", lambda: self.onBrowse(folder=True))
        self.ui.installButton.connect("clicked(bool)", self.onInstallModel)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.segmentFolderButton = qt.QPushButton("Segment all CTs in a folder...")
        self.segmentFolderButton.toolTip = ("Segment every CT file and DICOM series of a folder in the "
                                            "background, with the options above; resumes finished cases")
        self.ui.segmentCollapsibleButton.layout().addRow(self.segmentFolderButton)
        self.segmentFolderButton.connect("clicked(bool)", self.onSegmentFolder)
        self.ui.nodesTableWidget.connect("cellClicked(int,int)", self.onNodeClicked)
        self.ui.saveCaseButton.connect("clicked(bool)", self.onSaveCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdapt)
        self.ui.useAdaptedButton.connect("clicked(bool)", self.onUseAdapted)
        self.ui.keepCurrentButton.connect("clicked(bool)", self.onKeepCurrent)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.setupRankSection()
        self.checkDependencies()

    def cleanup(self):
        self.timer.stop()
        self.deviceTimer.stop()
        self.rankTimer.stop()
        if self.follower is not None and self.machine.job_kind == "segment":
            self.logic.core.jobs.cancel(self.follower.job_id, timeout=2.0)  # its result would be lost
        self.editor.cleanup()
        self.removeObservers()

    def enter(self):
        self.editor.enter()
        self.initializeParameterNode()

    def exit(self):
        self.editor.exit()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateControls)

    def onSceneStartClose(self, caller, event):
        if self.machine.job_kind == "segment" and "volume" in self.jobContext:
            # its CT leaves the scene with the rest: the result would have nowhere to go
            self.jobContext["sceneClosed"] = True
            self.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.editor.select_editor_node()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.inputVolume and firstVolume:
            self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateControls)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateControls)
        self.updateControls()

    # ------------------------------------------------------------------ first use, home
    def checkDependencies(self):
        plan = self.installPlan()
        self.ready = plan.ready
        self.ui.dependencyStatusLabel.text = plan.status_text()
        self.ui.installDependenciesButton.enabled = not plan.ready and plan.blocker() is None
        self.ui.firstUseCollapsibleButton.collapsed = plan.ready
        for section in (self.ui.modelCollapsibleButton, self.ui.segmentCollapsibleButton,
                        self.ui.correctCollapsibleButton, self.ui.adaptCollapsibleButton):
            section.enabled = plan.ready
        if plan.ready:
            self.refreshAll()

    @staticmethod
    def installPlan():
        return dependencies.plan_installation(hasattr(slicer.modules, "pytorchutils"))

    def showError(self, text, details=""):
        slicer.util.errorDisplay(text, **({"detailedText": details} if details else {}))

    def runPip(self, arguments):
        """pip under Slicer's own Python, its output to the console and kept for the diagnosis."""
        with slicer.util.WaitCursor():
            return dependencies.run_pip(arguments, worker_python(),
                                        on_line=lambda line: (print(line), slicer.app.processEvents()))

    @staticmethod
    def installTorch(requirement):  # we asked already: no PyTorchUtils dialog under a wait cursor
        import PyTorchUtils

        with slicer.util.WaitCursor():
            return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)

    def onInstallDependencies(self):
        if self.installing:  # pip and PyTorchUtils process events while they run: no second install
            return
        self.installing, self.ui.installDependenciesButton.enabled = True, False
        try:
            self.installDependencies()
        finally:
            self.installing = False
            self.checkDependencies()

    def installDependencies(self):
        plan = self.installPlan()
        if plan.blocker():
            self.showError(plan.blocker())
        elif slicer.util.confirmOkCancelDisplay(plan.confirmation_text()):
            constraints = Path(tempfile.mkdtemp()) / "constraints.txt"
            report = dependencies.run_installation(plan, self.installTorch, self.runPip, constraints)
            if report.failure:
                self.showError(*report.failure)
            elif report.ok and plan.install_torch and "torch" in sys.modules:
                slicer.util.infoDisplay(_("PyTorch was reinstalled: restart 3D Slicer to use it."))

    def ensureLoraPackage(self):
        """peft, for the LoRA method only: installed on its own, after asking; False if absent."""
        if not dependencies.lora_missing():
            return True
        requirement = dependencies.LORA_REQUIREMENT
        if not slicer.util.confirmOkCancelDisplay(_("The LoRA method needs the Python package {name} (and "
                                                    "transformers, accelerate). Install it now?").format(name=requirement.specifier)):
            return False
        report = dependencies.install_optional(requirement, self.runPip, Path(tempfile.mkdtemp()) / "constraints.txt")
        if report.failure:
            self.showError(*report.failure)
        return report.ok

    def onHomeChanged(self, directory):
        qt.QSettings().setValue(HOME_SETTING, directory)
        self.logic.core.home = home_from_setting(directory)
        if self.ready:
            self.refreshAll()

    def refreshAll(self):
        try:  # called from setup(): report problems, never fail the module's construction
            self.refreshModels()
            self.refreshCases()
            self.updateDeviceInfo()
            running = running_job(self.logic.core.jobs, ("adapt",))
            if running is not None and not self.machine.busy:
                self.ui.adaptStatusLabel.text = _("Following an adaptation started earlier.")
                self.follow("adapt", running.id, {})
            elif not self.modelRows and not self.machine.busy:
                self.installDemoModel()
        except Exception as error:
            logging.exception("LymphNodeDGST: reading the home folder failed")
            slicer.util.errorDisplay(_("Could not read the home folder {folder}: {error}").format(
                folder=self.logic.core.home.root, error=error))

    def installDemoModel(self):
        """First open with an empty model store: the bundled demo model, installed by a background
        job (validating it imports torch, which takes seconds the panel must not freeze for)."""
        archive = self.logic.core.demoModelArchive()
        if archive is None:
            return
        params = install_job_params(self.logic.core.home, str(archive), DEMO_MODEL_NAME)
        job = self.logic.core.jobs.submit(INSTALL_JOB_KIND, params, python=worker_python())
        self.follow("install", job.id, {"demo": True})
        self.ui.installStatusLabel.text = _("Installing the demo model {model} in the background (not a clinical "
                                            "model)...").format(model=DEMO_MODEL_NAME)

    def updateDeviceInfo(self, *unused):
        if self.ready:  # the combo's text, not the parameter node: this slot may run first
            self.ui.deviceInfoLabel.text = _("Checking the compute device...")
            self.deviceLookup = BackgroundCall(device_text, self.ui.deviceComboBox.currentText or "auto")
            self.deviceTimer.start()

    def onDeviceLookupPoll(self):
        lookup = self.deviceLookup
        if lookup is None or not lookup.done:
            return
        self.deviceTimer.stop()
        self.ui.deviceInfoLabel.text = lookup.result if lookup.error is None else _(
            "Could not check the compute device: {error}").format(error=lookup.error)

    # ------------------------------------------------------------------ controls and tables
    def updateControls(self, *unused):
        if not hasattr(self, "ui"):
            return
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        controls = self.machine.controls(segment_blocker(hasInput, bool(self.modelRows)),
                                         adapt_blocker(bool(self.modelRows), len(self.caseRows)))
        for button, text, enabled, tip in (
                (self.ui.applyButton, controls.apply_text, controls.apply_enabled, controls.apply_tooltip),
                (self.ui.adaptButton, controls.adapt_text, controls.adapt_enabled, controls.adapt_tooltip),
                (self.ui.installButton, controls.install_text, controls.install_enabled, "")):
            button.text, button.enabled = text, enabled
            if tip:
                button.toolTip = tip
        for widget in (self.ui.modelsTableWidget, self.ui.activateButton, self.ui.rollbackButton,
                       self.ui.exportAdapterButton, self.ui.installAdapterButton,
                       self.ui.installSourceLineEdit, self.ui.browseZipButton, self.ui.browseFolderButton):
            widget.enabled = controls.model_actions_enabled
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector,
                       self.ui.deviceComboBox, self.ui.fastCheckBox, self.ui.advancedCollapsibleButton,
                       self.ui.removeCaseButton, self.ui.homeDirectoryButton):
            widget.enabled = controls.inputs_enabled
        self.ui.segmentProgressBar.visible = controls.segment_progress_visible
        if hasattr(self, "segmentFolderButton"):
            self.segmentFolderButton.enabled = not self.machine.busy and bool(self.modelRows)
        self.ui.adaptProgressBar.visible = controls.adapt_progress_visible

    def fillTable(self, table, rows):
        table.setRowCount(len(rows))
        for r, cells in enumerate(rows):
            for c, text in enumerate(cells):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def refreshModels(self):
        self.modelRows = self.logic.core.modelRows()
        self.fillTable(self.ui.modelsTableWidget, [row.cells() for row in self.modelRows])
        self.updateControls()

    def refreshCases(self):
        self.caseRows = self.logic.core.caseRows()
        self.fillTable(self.ui.casesTableWidget, [row.cells() for row in self.caseRows])
        self.ui.casesStatusLabel.text = _("{n} training case(s) in {folder}").format(
            n=len(self.caseRows), folder=self.logic.core.home.cases)
        self.updateControls()

    def selectedModel(self):
        row = self.ui.modelsTableWidget.currentRow()
        return selected_model_name(self.modelRows, row if row >= 0 else None)

    # ------------------------------------------------------------------ model section
    def onActivate(self):
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0:
            slicer.util.infoDisplay(_("Select a version in the table first."))
            return
        with reported(_("Could not activate the model."), self.showError):
            self.logic.core.activate(self.modelRows[row].name, self.modelRows[row].version)
        self.refreshModels()

    def onRollback(self):
        with reported(_("Could not roll back."), self.showError):
            version = self.logic.core.rollback(self.selectedModel())
            self.ui.installStatusLabel.text = _("Now using {version}.").format(version=version.ref)
        self.refreshModels()

    def onBrowse(self, folder):
        path = (qt.QFileDialog.getExistingDirectory(None, _("nnU-Net results folder")) if folder else
                qt.QFileDialog.getOpenFileName(None, _("nnU-Net model archive or checkpoint"), "",
                                               _("Models (*.zip *.pth);;All files (*)")))
        if path:
            self.ui.installSourceLineEdit.text = path

    def onExportAdapter(self):
        row = self.ui.modelsTableWidget.currentRow()
        path = qt.QFileDialog.getSaveFileName(None, _("Site adapter"), "", _("Site adapters (*.safetensors)"))
        if path:
            with reported(_("Could not export the adapter."), self.showError), slicer.util.WaitCursor():
                self.ui.installStatusLabel.text = export_adapter_for_row(
                    self.logic.core.store(), self.modelRows, row if row >= 0 else None, path)

    def onInstallAdapter(self):
        path = qt.QFileDialog.getOpenFileName(None, _("Site adapter"), "", _("Site adapters (*.safetensors)"))
        if path:
            with reported(_("Could not start the installation."), self.showError):
                params = install_job_params(self.logic.core.home, path, adapter=True)
                job = self.logic.core.jobs.submit(INSTALL_JOB_KIND, params, python=worker_python())
                self.follow("install", job.id, {})

    def onInstallModel(self):
        if self.machine.job_kind == "install":
            return self.cancelJob()
        with reported(_("Could not start the installation."), self.showError):
            params = install_job_params(self.logic.core.home, self.ui.installSourceLineEdit.text,
                                        self.ui.installNameLineEdit.text.strip(),
                                        self.ui.installSha256LineEdit.text.strip(),
                                        self.ui.trustCheckpointCheckBox.checked)
            job = self.logic.core.jobs.submit(INSTALL_JOB_KIND, params, python=worker_python())
            self.follow("install", job.id, {})

    # ------------------------------------------------------------------ segment section
    def onApply(self):
        if self.machine.job_kind == "segment":
            return self.cancelJob()
        p = self._parameterNode
        with reported(_("Could not start the segmentation."), self.showError), slicer.util.WaitCursor():
            job, files = self.logic.core.startSegmentation(p.inputVolume, self.selectedModel(), p.device, p.fast,
                                                      backend=p.backend)
            self.follow("segment", job.id, {"files": files, "volume": p.inputVolume})

    def onSegmentFolder(self):
        if self.machine.busy:
            return
        inputDir = qt.QFileDialog.getExistingDirectory(self.parent, _("Folder of CTs to segment"))
        outputDir = inputDir and qt.QFileDialog.getExistingDirectory(
            self.parent, _("Folder for the labels, node reports and cohort table (outside the CT folder)"))
        if not outputDir:
            return
        p = self._parameterNode
        with reported(_("Could not start the folder segmentation."), self.showError), slicer.util.WaitCursor():
            job = submit_folder_segmentation(self.logic.core.jobs, self.logic.core.home, inputDir, outputDir,
                                             self.selectedModel(), p.device, p.fast, python=worker_python())
            self.follow("segment", job.id, {"folder": outputDir})

    def showSegmentation(self, context, result):
        p = self._parameterNode
        volume = context["volume"]
        if p is None or not slicer.mrmlScene.IsNodePresent(volume):  # the scene was closed meanwhile
            self.ui.segmentStatusLabel.text = _("The CT was closed before its segmentation finished; nothing was added.")
            return
        segmentation, table, self.nodeRows = self.logic.core.importSegmentation(
            context["files"], volume, p.outputSegmentation, p.nodeTable)
        p.outputSegmentation, p.nodeTable = segmentation, table
        self.fillTable(self.ui.nodesTableWidget, node_table_cells(self.nodeRows))
        self.segmentEditorWidget.setSegmentationNode(segmentation)
        self.segmentEditorWidget.setSourceVolumeNode(volume)
        self.ui.segmentStatusLabel.text = _("{n} node(s) found with {model} on {device} ({backend}) in {seconds} s.").format(
            n=len(self.nodeRows), model=result["model"], device=result["device"],
            backend=backend_text(result),
            seconds=f"{result['seconds']:.0f}")

    def onNodeClicked(self, row, column):
        if 0 <= row < len(self.nodeRows):
            volume = self.segmentEditorWidget.sourceVolumeNode() or self._parameterNode.inputVolume
            self.logic.jumpToNode(self.nodeRows[row], volume)

    # ------------------------------------------------------------------ correct section
    def onSaveCase(self):
        segmentation = self.segmentEditorWidget.segmentationNode() or self._parameterNode.outputSegmentation
        volume = self.segmentEditorWidget.sourceVolumeNode() or self._parameterNode.inputVolume
        if segmentation is None or volume is None:
            slicer.util.infoDisplay(_("Segment a CT first (or select a CT and a segmentation)."))
            return
        with reported(_("Could not save the training case."), self.showError) as attempt, slicer.util.WaitCursor():
            record = self.logic.core.saveTrainingCase(volume, segmentation, self.segmentEditorWidget.currentSegmentID(),
                                                 self.ui.caseIdLineEdit.text.strip())
            self.ui.caseIdLineEdit.text = ""
        self.refreshCases()  # after a failure too: the library may have changed on disk
        if not attempt.failed:
            self.ui.casesStatusLabel.text = _("Saved case {id}; {n} case(s) in the library.").format(
                id=record.id, n=len(self.caseRows))

    def onRemoveCase(self):
        row = self.ui.casesTableWidget.currentRow()
        if row < 0:
            return
        caseId = self.caseRows[row].id
        if slicer.util.confirmYesNoDisplay(f"Remove training case {caseId} from the library?"):
            with reported(_("Could not remove the case."), self.showError):
                self.logic.core.library().remove(caseId)
            self.refreshCases()

    # ------------------------------------------------------------------ adapt section
    def onAdapt(self):
        if self.machine.job_kind == "adapt":
            return self.cancelJob()
        p = self._parameterNode
        if p.method == "lora" and not self.ensureLoraPackage():
            return
        with reported(_("Could not start the adaptation."), self.showError), slicer.util.WaitCursor():
            request = adapt_request(self.selectedModel(), p.method, p.gamma, p.iterations, p.adaptDevice)
            job = self.logic.core.startAdaptation(request)
            self.ui.adaptResultWidget.visible = False
            self.ui.curveLabel.clear()
            self._curveEpochs = 0
            self.follow("adapt", job.id, {})

    def showCurve(self, summary):
        if len(summary.curve) == self._curveEpochs:
            return
        self._curveEpochs = len(summary.curve)
        path = write_curve_png(summary.curve, Path(tempfile.gettempdir()) / f"lndgst-curve-{summary.job_id}.png")
        self.ui.curveLabel.setPixmap(qt.QPixmap(str(path)))

    def showAdaptationOutcome(self, result):
        self.outcome = adaptation_outcome(result)
        self.ui.adaptResultLabel.text = self.outcome.text()
        if self.outcome.figure and self.outcome.figure.is_file():
            pixmap = qt.QPixmap(str(self.outcome.figure))
            self.ui.reportFigureLabel.setPixmap(pixmap.scaledToWidth(400, qt.Qt.SmoothTransformation))
        self.ui.useAdaptedButton.text = _("Use {version}").format(version=self.outcome.version)
        self.ui.keepCurrentButton.text = _("Keep {version}").format(version=self.outcome.parent)
        (self.ui.useAdaptedButton if self.outcome.recommended else self.ui.keepCurrentButton).setFocus()
        self.ui.useAdaptedButton.enabled = self.ui.keepCurrentButton.enabled = True
        self.ui.adaptResultWidget.visible = True
        self.refreshModels()

    def onUseAdapted(self):
        with reported(_("Could not activate the adapted model."), self.showError) as attempt:
            self.logic.core.activate(*self.outcome.name_and_version())
            self.ui.adaptStatusLabel.text = _("Now using {version}.").format(version=self.outcome.version)
        if not attempt.failed:  # after a failure the choice stays open
            self.ui.useAdaptedButton.enabled = self.ui.keepCurrentButton.enabled = False
        self.refreshModels()

    def onKeepCurrent(self):
        self.ui.adaptStatusLabel.text = self.outcome.kept_text()
        self.ui.useAdaptedButton.enabled = self.ui.keepCurrentButton.enabled = False

    # ------------------------------------------------------------------ background jobs
    def follow(self, kind, jobId, context):
        self.machine.start(kind)
        self.follower = JobFollower(self.logic.core.jobs, jobId)
        self.jobContext = context
        bar = {"segment": self.ui.segmentProgressBar, "adapt": self.ui.adaptProgressBar}.get(kind)
        if bar is not None:
            bar.value = 0
        self.updateControls()
        self.timer.start()

    def cancelJob(self):
        self.machine.cancel()
        self.follower.cancel()
        self.updateControls()

    def onPoll(self):
        kind = self.machine.job_kind
        try:
            unusedEvents, summary = self.follower.poll()
        except Exception as error:  # once, not at every tick: the poll stops here
            self.timer.stop()
            logging.exception("LymphNodeDGST: following the background job failed")
            self.machine.finish()
            self.follower, self.jobContext = None, {}
            self.updateControls()
            slicer.util.errorDisplay(_("Lost track of the background job: {error}").format(error=error))
            return
        label = {"segment": self.ui.segmentStatusLabel, "adapt": self.ui.adaptStatusLabel}.get(
            kind, self.ui.installStatusLabel)
        bar = {"segment": self.ui.segmentProgressBar, "adapt": self.ui.adaptProgressBar}.get(kind)
        label.text = summary.status_text()
        if bar is not None:
            bar.value = summary.percent
            bar.format = f"%p% {summary.stage or ''}"
        if kind == "adapt":
            self.showCurve(summary)
        if summary.finished:
            self.timer.stop()
            self.finishJob(kind, summary)

    def finishJob(self, kind, summary):
        context, self.jobContext, self.follower = self.jobContext, {}, None
        self.machine.finish()
        try:
            if context.get("sceneClosed"):
                self.ui.segmentStatusLabel.text = _("Segmentation cancelled: the scene was closed.")
            elif summary.state == "done" and "folder" in context:
                self.ui.segmentStatusLabel.text = folder_result_text(summary.result)
            elif summary.state == "done" and kind == "segment":
                self.showSegmentation(context, summary.result)
            elif summary.state == "done" and kind == "adapt":
                self.showAdaptationOutcome(summary.result)
            elif summary.state == "done" and kind == "install":
                self.ui.installStatusLabel.text = _("Installed {version}.").format(version=summary.result["version"])
                self.refreshModels()
            elif summary.state == "failed":
                slicer.util.errorDisplay(failure_text(kind, summary))
        except Exception as error:
            logging.exception("LymphNodeDGST: showing a job's result failed")
            slicer.util.errorDisplay(_("Could not show the result: {error}").format(error=error))
        finally:
            if "files" in context:
                context["files"].remove()
            self.updateControls()

    # ------------------------------------------------------------------ which case next (ranking)
    def setupRankSection(self):
        self.layout.addWidget(section := slicer.util.loadUI(self.resourcePath("UI/LymphNodeDGSTRank.ui")))  # own .ui
        self.rankUi, self.rankRows, self.rankFollower, self.rankContext = slicer.util.childWidgetVariables(section), [], None, {}
        self.rankPreparation = None
        table = self.rankUi.rankTableWidget
        table.setColumnCount(len(RANK_COLUMNS))  # setItem drops items outside the table's columns
        table.setHorizontalHeaderLabels(list(RANK_COLUMNS))
        self.rankTimer = qt.QTimer()  # an object, not a singleShot chain: cleanup() can stop it
        self.rankTimer.setInterval(POLL_INTERVAL_MS)
        self.rankTimer.connect("timeout()", self.onRankPoll)
        self.rankUi.rankLoadedButton.connect("clicked(bool)", lambda: self.onRank(folder=False))
        self.rankUi.rankFolderButton.connect("clicked(bool)", lambda: self.onRank(folder=True))
        table.connect("cellDoubleClicked(int,int)", self.onRankRowActivated)

    def onRank(self, folder):
        if self.rankFollower is not None or self.rankPreparation is not None:  # the buttons read "Cancel ranking"
            return self.cancelRanking()
        chosen = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), RANK_BUTTONS[1]) if folder else True
        if not chosen:
            return
        with reported(_("Could not start the ranking."), self.showError):
            if folder:
                self.rankPreparation = BackgroundCall(lambda: chosen)
            else:  # copies taken here, written to disk on a thread
                snapshot = snapshot_loaded_volumes(slicer.mrmlScene)
                self.rankPreparation = BackgroundCall(write_snapshot_for_ranking, self.logic.core.home, snapshot)
                self.rankUi.rankStatusLabel.text = _("Preparing {n} volume(s) for ranking...").format(n=len(snapshot))
            self.rankUi.rankLoadedButton.text = self.rankUi.rankFolderButton.text = _("Cancel ranking")
            self.rankTimer.start()

    def cancelRanking(self):
        if self.rankFollower is not None:
            self.rankFollower.cancel()
        else:
            self.rankTimer.stop()
            self.rankPreparation = None
            self.rankUi.rankLoadedButton.text, self.rankUi.rankFolderButton.text = RANK_BUTTONS
            self.rankUi.rankStatusLabel.text = _("Ranking cancelled.")

    def onRankPoll(self):
        if self.rankFollower is None:
            preparation = self.rankPreparation
            if preparation is None or not preparation.done:
                return
            self.rankPreparation = None
            try:
                if preparation.error is not None:
                    raise preparation.error
                self.rankFollower, self.rankContext = start_rank_job(
                    self.logic.core.jobs, self.logic.core.home, preparation.result, self.selectedModel(),
                    self._parameterNode.device if self._parameterNode else "auto", python=worker_python())
            except Exception as error:
                self.rankTimer.stop()
                self.rankUi.rankLoadedButton.text, self.rankUi.rankFolderButton.text = RANK_BUTTONS
                self.showError(_("Could not start the ranking."), str(error))
                return
        try:
            unusedEvents, summary = self.rankFollower.poll()
        except Exception as error:  # once: the poll stops here
            self.rankTimer.stop()
            self.rankFollower = None
            self.rankUi.rankLoadedButton.text, self.rankUi.rankFolderButton.text = RANK_BUTTONS
            slicer.util.errorDisplay(_("Lost track of the ranking job: {error}").format(error=error))
            return
        self.rankUi.rankStatusLabel.text = summary.status_text()
        if not summary.finished:
            return
        self.rankTimer.stop()
        self.rankFollower, (self.rankUi.rankLoadedButton.text, self.rankUi.rankFolderButton.text) = None, RANK_BUTTONS
        self.rankRows = rank_rows(summary.result or {}, library_hashes(self.logic.core.library()), self.rankContext)
        self.fillTable(self.rankUi.rankTableWidget, [row.cells() for row in self.rankRows])
        if summary.state == "failed":
            slicer.util.errorDisplay(failure_text(RANK_JOB_KIND, summary))

    def onRankRowActivated(self, row, column):  # load (unless loaded), go to the most doubtful node, segment
        if 0 <= row < len(self.rankRows) and self.rankRows[row].rank is not None:
            with reported(_("Could not open the CT."), self.showError), slicer.util.WaitCursor():
                chosen = self.rankRows[row]
                volume = open_ranked_ct(chosen, slicer.mrmlScene, slicer.util.loadVolume)  # files, DICOM series folders
                self._parameterNode.inputVolume = volume
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
                if (point := doubtful_point_ras(chosen)) is not None:
                    slicer.modules.markups.logic().JumpSlicesToLocation(*point, True)
                if self.machine.job_kind is None:
                    self.onApply()


class LymphNodeDGSTLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic class, holding the plain-Python ModuleLogic (slicer_bridge/module_logic.py) as
    `core`, usable without the widget (and by the self-test). Composition, not a second base class:
    Slicer's ScriptedLoadableModuleLogic.__init__ calls super().__init__(), which a second base
    would receive without its arguments."""

    def __init__(self, home=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = ModuleLogic(home or home_from_setting(qt.QSettings().value(HOME_SETTING, "")), slicer.mrmlScene)

    def getParameterNode(self):
        return LymphNodeDGSTParameterNode(super().getParameterNode())

    def jumpToNode(self, row, volumeNode=None):
        """Centre the slice views on a report row's node (RAS = LPS centroid with x, y negated)."""
        x, y, z = node_centroid_world(row, volumeNode)
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)


class LymphNodeDGSTTest(ScriptedLoadableModuleTest):
    """What runs without torch (the extension build factory's ctest has none), then the whole loop
    on a phantom (segment, correct, save a case, adapt) where torch and nnU-Net are installed."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_scene_and_case_library_without_torch()
        plan = LymphNodeDGSTWidget.installPlan()
        if not plan.ready:  # as TotalSegmentator's self-test does: say what was skipped, pass
            message = _("Skipped the segment-and-adapt loop: {why}").format(why=plan.status_text())
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_segment_save_case_and_adapt()

    def test_scene_and_case_library_without_torch(self):
        from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
        from LymphNodeDGSTLib.slicer_bridge.selftest import scene_and_case_library

        self.delayDisplay(_("Checking the scene side and the case library (no torch needed)"))
        checked = scene_and_case_library(slicer.mrmlScene, CaseLibrary(Path(tempfile.mkdtemp(prefix="lndgst-selftest-"))))
        self.delayDisplay(_("Passed: {checks}").format(checks=", ".join(checked)))

    def test_segment_save_case_and_adapt(self):
        # slicer.testing.runUnitTest loads the test* methods by name (unittest's loadTestsFromName),
        # so this one runs on its own, not through runTest: it must skip where torch is absent.
        plan = LymphNodeDGSTWidget.installPlan()
        if not plan.ready:
            self.skipTest(_("Skipped the segment-and-adapt loop: {why}").format(why=plan.status_text()))
        from LymphNodeDGSTLib.home import Home
        from LymphNodeDGSTLib.slicer_bridge.selftest import segment_save_case_and_adapt

        logic = LymphNodeDGSTLogic(home=Home(Path(tempfile.mkdtemp(prefix="lndgst-selftest-"))))
        outcome = segment_save_case_and_adapt(logic.core, slicer.mrmlScene, logic.jumpToNode, self.delayDisplay,
                                              slicer.app.processEvents)
        self.delayDisplay(_("Test passed: {outcome}").format(outcome=outcome))
