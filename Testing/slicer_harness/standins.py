"""Stand-ins for the compiled parts of Slicer and CTK that a Python process cannot load: a few
widgets, the application object and the module registry.

Each is a thin class (a real QWidget/QObject where Slicer's is one) with only the properties,
signals and methods that our .ui files, our module and Slicer's own Python files use; each names the
header it mirrors. Calling anything else raises AttributeError, so a test fails instead of passing
silently. Where a stand-in keeps state (the node combo box's nodes, the editor's segmentation), the
state lives in the real MRML scene (slicer-core).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtWidgets

from slicer_harness.pythonqt import PythonQtConventions

Signal, Property = QtCore.Signal, QtCore.Property


def _property(kind: type, attribute: str, default: Any, notify=None):
    """A Qt property stored in a Python attribute (so .ui files and `widget.x = ...` can set it)."""
    def read(self):
        return getattr(self, attribute, default)

    def write(self, value):
        setattr(self, attribute, value)
    if notify is None:
        return Property(kind, read, write)
    return Property(kind, read, write, notify=notify)


# ----------------------------------------------------------------------------------------- CTK
class ctkCollapsibleButton(PythonQtConventions, QtWidgets.QWidget):
    """Libs/Widgets/ctkCollapsibleButton.h: a section whose `collapsed` hides its contents."""

    contentsCollapsed = Signal(bool)
    text = _property(str, "_text", "")

    def _get_collapsed(self) -> bool:
        return getattr(self, "_collapsed", False)

    def _set_collapsed(self, value: bool) -> None:
        if bool(value) != self._get_collapsed():
            setattr(self, "_collapsed", bool(value))
            self.contentsCollapsed.emit(bool(value))

    collapsed = Property(bool, _get_collapsed, _set_collapsed)


class ctkDirectoryButton(PythonQtConventions, QtWidgets.QWidget):
    """Libs/Widgets/ctkDirectoryButton.h: a folder chooser; `directoryChanged(QString)`."""

    directoryChanged = Signal(str)

    def _get(self) -> str:
        return getattr(self, "_directory", "")

    def _set(self, value: str) -> None:
        if str(value) != self._get():
            setattr(self, "_directory", str(value))
            self.directoryChanged.emit(str(value))

    directory = Property(str, _get, _set)


class _TypeOnly(QtWidgets.QWidget):
    """CTK classes that Slicer's parameter-node connectors compare widget types with; our panel
    creates none of them, so they exist only to answer "not this type"."""

    def __init__(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} is not stood in: the panel should not create it")


CTK_TYPE_ONLY = ("ctkCheckBox", "ctkSliderWidget", "ctkDoubleSlider", "ctkRangeWidget", "ctkDoubleRangeSlider",
                 "ctkPathLineEdit", "ctkColorPickerButton", "ctkCheckablePushButton", "ctkComboBox",
                 "ctkDoubleSpinBox", "ctkMessageBox")


SLICER_TYPE_ONLY = ("qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox")


def slicer_type_only_classes() -> dict[str, type]:
    """Slicer's compiled widget classes that its parameter-node connectors compare types with."""
    return {name: type(name, (_TypeOnly,), {"__module__": "slicer"}) for name in SLICER_TYPE_ONLY}


def make_ctk_module() -> types.ModuleType:
    module = types.ModuleType("ctk", "Stand-ins for the CTK widgets the panel uses (see slicer_harness.standins).")
    module.ctkCollapsibleButton, module.ctkDirectoryButton = ctkCollapsibleButton, ctkDirectoryButton
    for name in CTK_TYPE_ONLY:
        setattr(module, name, type(name, (_TypeOnly,), {"__module__": "ctk"}))
    return module


# ----------------------------------------------------------------------------------------- qMRML
class qMRMLWidget(PythonQtConventions, QtWidgets.QWidget):
    """Libs/MRML/Widgets/qMRMLWidget.h: holds the scene; `mrmlSceneChanged(vtkMRMLScene*)`."""

    mrmlSceneChanged = Signal(object)

    def setMRMLScene(self, scene) -> None:
        setattr(self, "_scene", scene)
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return getattr(self, "_scene", None)


class qMRMLNodeComboBox(PythonQtConventions, QtWidgets.QWidget):
    """Libs/MRML/Widgets/qMRMLNodeComboBox.h: lists the scene's nodes of `nodeTypes`; with
    noneEnabled false it selects the first one, as Slicer's does, and follows nodes added and removed."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)
    nodeTypes = _property(list, "_node_types", [])
    noneEnabled = _property(bool, "_none_enabled", False)
    addEnabled = _property(bool, "_add_enabled", True)
    removeEnabled = _property(bool, "_remove_enabled", True)
    renameEnabled = _property(bool, "_rename_enabled", False)
    showChildNodeTypes = _property(bool, "_show_child_node_types", True)
    noneDisplay = _property(str, "_none_display", "None")

    def setMRMLScene(self, scene) -> None:
        old = getattr(self, "_scene", None)
        for tag in getattr(self, "_observations", []):
            old.RemoveObserver(tag)
        setattr(self, "_scene", scene)
        setattr(self, "_observations", [] if scene is None else [
            scene.AddObserver(scene.NodeAddedEvent, self._on_scene_changed),
            scene.AddObserver(scene.NodeRemovedEvent, self._on_scene_changed),
            scene.AddObserver(scene.EndCloseEvent, self._on_scene_changed)])
        self._on_scene_changed()

    def mrmlScene(self):
        return getattr(self, "_scene", None)

    def nodes(self) -> list:
        scene = self.mrmlScene()
        found = []
        for node_type in self.nodeTypes if scene is not None else ():
            collection = scene.GetNodesByClass(node_type)
            found += [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [n for n in found if self.showChildNodeTypes or n.GetClassName() in self.nodeTypes]

    def nodeCount(self) -> int:
        return len(self.nodes())

    def currentNode(self):
        node_id = getattr(self, "_current_id", None)
        scene = self.mrmlScene()
        return scene.GetNodeByID(node_id) if scene is not None and node_id else None

    def currentNodeID(self) -> str:
        return getattr(self, "_current_id", None) or ""

    def setCurrentNode(self, node) -> None:
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, node_id: str) -> None:
        if (node_id or None) == getattr(self, "_current_id", None):
            return
        setattr(self, "_current_id", node_id or None)
        self.currentNodeChanged.emit(self.currentNode())
        self.currentNodeIDChanged.emit(node_id or "")

    def _on_scene_changed(self, *unused) -> None:
        nodes = self.nodes()
        if self.currentNode() not in nodes:
            self.setCurrentNode(None if self.noneEnabled or not nodes else nodes[0])
        elif self.currentNode() is None and nodes and not self.noneEnabled:
            self.setCurrentNode(nodes[0])


class qMRMLSegmentEditorWidget(PythonQtConventions, QtWidgets.QWidget):
    """Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h: what Slicer's Segment
    Editor module and our panel call. The segmentation, source volume and selected segment live in
    the real vtkMRMLSegmentEditorNode, as in Slicer."""

    def setMRMLScene(self, scene) -> None:
        setattr(self, "_scene", scene)

    def mrmlScene(self):
        return getattr(self, "_scene", None)

    def setMRMLSegmentEditorNode(self, node) -> None:
        setattr(self, "_editor_node", node)

    def mrmlSegmentEditorNode(self):
        return getattr(self, "_editor_node", None)

    def setSegmentationNode(self, node) -> None:
        self._node().SetAndObserveSegmentationNode(node)

    def segmentationNode(self):
        return self._node().GetSegmentationNode() if self.mrmlSegmentEditorNode() else None

    def setSourceVolumeNode(self, node) -> None:
        self._node().SetAndObserveSourceVolumeNode(node)

    def sourceVolumeNode(self):
        return self._node().GetSourceVolumeNode() if self.mrmlSegmentEditorNode() else None

    def currentSegmentID(self) -> str:
        selected = self._node().GetSelectedSegmentID() if self.mrmlSegmentEditorNode() else None
        if selected:
            return selected
        segmentation = self.segmentationNode()
        if segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments():
            return segmentation.GetSegmentation().GetNthSegmentID(0)
        return ""

    def setCurrentSegmentID(self, segment_id: str) -> None:
        self._node().SetSelectedSegmentID(segment_id)

    def updateEffectList(self) -> None:
        setattr(self, "effect_list_updates", getattr(self, "effect_list_updates", 0) + 1)

    def installKeyboardShortcuts(self) -> None:
        setattr(self, "shortcuts_installed", True)

    def uninstallKeyboardShortcuts(self) -> None:
        setattr(self, "shortcuts_installed", False)

    def updateWidgetFromMRML(self) -> None:
        pass  # nothing shown here besides what the editor node holds

    def setActiveEffect(self, effect) -> None:
        setattr(self, "active_effect", effect)

    def removeViewObservations(self) -> None:
        setattr(self, "view_observations_removed", True)

    def _node(self):
        node = self.mrmlSegmentEditorNode()
        if node is None:
            raise AssertionError("the Segment Editor widget is used before it has an editor node")
        return node


class qSlicerSegmentEditorEffectFactory(PythonQtConventions, QtCore.QObject):
    """Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorEffectFactory.h: a
    singleton; `effectRegistered(QString)` when a (Python) effect registers."""

    effectRegistered = Signal(str)
    _instance = None

    @classmethod
    def instance(cls) -> "qSlicerSegmentEditorEffectFactory":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


class qSlicerScriptedLoadableModuleWidget(PythonQtConventions, QtWidgets.QWidget):
    """Base/QTGUI/qSlicerAbstractModuleWidget.h: the panel a module's widget fills; `isEntered`."""

    isEntered = _property(bool, "_entered", False)


# ----------------------------------------------------------------------------------------- application
class ScriptedModule:
    """Base/QTCore/qSlicerScriptedLoadableModule.h (+ qSlicerAbstractCoreModule.h): the `parent`
    a scripted module's class fills in, and what slicer.modules.NAME answers."""

    __slots__ = ("title", "categories", "dependencies", "contributors", "helpText", "acknowledgementText",
                 "icon", "path", "widgetRepresentation_", "_logic")

    def __init__(self, path: Path, logic: Any = None):
        self.path, self._logic = str(path), logic

    def logic(self):
        if self._logic is None:
            raise AttributeError("this stand-in module has no logic")
        return self._logic


class MarkupsLogic:
    """Modules/Loadable/Markups/Logic/vtkSlicerMarkupsLogic.h: JumpSlicesToLocation, recorded."""

    def __init__(self):
        self.jumps: list[tuple[float, float, float, bool]] = []

    def JumpSlicesToLocation(self, x: float, y: float, z: float, centered: bool, viewGroup: int = -1) -> None:
        self.jumps.append((float(x), float(y), float(z), bool(centered)))


class Modules:
    """slicer.modules: one attribute per loaded module (lower-case name)."""

    def __init__(self, modules: dict[str, ScriptedModule]):
        self.__dict__.update(modules)


class ModuleManager(PythonQtConventions, QtCore.QObject):
    """Base/QTCore/qSlicerModuleManager.h: `moduleAboutToBeUnloaded(QString)` at a reload or exit."""

    moduleAboutToBeUnloaded = Signal(str)


class IOManager:
    """Base/QTCore/qSlicerCoreIOManager.h: loadNodes for a volume file, as slicer.util.loadVolume
    calls it; the file is read with SimpleITK into a real volume node."""

    def __init__(self, scene):
        self.scene = scene

    def loadNodes(self, file_type: str, properties: dict, loaded_nodes=None) -> bool:
        import SimpleITK as sitk

        from LymphNodeDGSTLib.slicer_bridge.mrml import sitk_image_to_volume_node
        if file_type != "VolumeFile":
            raise AssertionError(f"the harness loads volumes only, not {file_type}")
        path = Path(properties["fileName"])
        node = sitk_image_to_volume_node(sitk.ReadImage(str(path)), self.scene,
                                         properties.get("name") or path.name.split(".")[0])
        if loaded_nodes is not None:
            loaded_nodes.AddItem(node)
        return True


class Application(PythonQtConventions, QtCore.QObject):
    """Base/QTGUI/qSlicerApplication.h (+ qSlicerCoreApplication.h): what slicer.app answers in our
    module and in Slicer's util.py; testing mode on, as under Slicer's ctest, so message boxes are
    logged and answered instead of shown."""

    applicationName = _property(str, "_application_name", "3D Slicer (harness)")

    def __init__(self, scene, settings_factory):
        super().__init__()
        setattr(self, "_scene", scene)
        setattr(self, "_settings", settings_factory)
        setattr(self, "_module_manager", ModuleManager())
        setattr(self, "_io_manager", IOManager(scene))

    def translate(self, context: str, text: str) -> str:
        return text

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self, *args) -> None:
        QtWidgets.QApplication.processEvents()

    def moduleManager(self) -> ModuleManager:
        return self._module_manager

    def ioManager(self) -> IOManager:
        return self._io_manager

    def userSettings(self):
        return self._settings()

    def settings(self):
        return self._settings()

    def mrmlScene(self):
        return self._scene

    def mainWindow(self):
        return None  # no main window: Slicer's util then logs messages without a parent window

    def layoutManager(self):
        return None  # no views without a main window (as Slicer with --no-main-window): nothing to fit

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True)
