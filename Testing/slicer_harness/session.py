"""Load the module the way Slicer loads it, with Slicer 5.10.0's own Python files, real MRML
(slicer-core) and real Qt widgets, and drive it the way a user does.

`SlicerSession` installs `qt`, `ctk` and the `slicer` package's Python parts into sys.modules (and
takes them out again on close, so that other tests see the plain slicer-core package):
- from ../shared/slicer-5.10.0, unedited: ScriptedLoadableModule.py, util.py, i18n.py, testing.py and
  the parameterNodeWrapper package (with its GUI connectors);
- slicer.mrmlScene: a real vtkMRMLScene; slicer.vtkMRML* classes: slicer-core's;
- qt: PySide6 with PythonQt's conventions (slicer_harness.pythonqt);
- ctk, slicer.qMRML*, slicer.app, slicer.modules: the stand-ins of slicer_harness.standins.
Then `open_module()` executes LymphNodeDGST.py, constructs its module class with a module parent
as qSlicerScriptedLoadableModule does, and its widget inside a panel, calls setup() and enter().
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable

from PySide6 import QtCore, QtWidgets

from slicer_harness import pythonqt, standins

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "LymphNodeDGST"
SLICER_SOURCE = REPO.parent / "shared" / "slicer-5.10.0"
SLICER_PYTHON = SLICER_SOURCE / "Base" / "Python" / "slicer"
REAL_FILES = ("i18n", "util", "ScriptedLoadableModule", "testing")
MODULE_NAME = "LymphNodeDGST"


def application() -> QtWidgets.QApplication:
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["slicer-harness"])
    return app


class MessageLog(logging.Handler):
    """What slicer.util's message boxes said (in testing mode they log instead of showing)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


class SlicerSession:
    """One Slicer-like process: the modules installed, the module opened, events processed."""

    def __init__(self, settings_folder: Path):
        if not SLICER_PYTHON.is_dir():
            raise FileNotFoundError(f"Slicer's Python sources are not at {SLICER_SOURCE}")
        self.app = application()
        self.settings_folder = settings_folder
        self._saved_modules: dict[str, Any] = {}
        self._saved_slicer_attributes: dict[str, Any] = {}
        self.messages = MessageLog()
        self.module = self.widget = self.panel = None

    # ------------------------------------------------------------------ installing Slicer's parts
    def install(self) -> "SlicerSession":
        QtCore.QCoreApplication.setOrganizationName("LymphNodeDGST-harness")
        QtCore.QCoreApplication.setApplicationName("slicer-harness")
        QtCore.QSettings.setDefaultFormat(QtCore.QSettings.Format.IniFormat)
        QtCore.QSettings.setPath(QtCore.QSettings.Format.IniFormat, QtCore.QSettings.Scope.UserScope,
                                 str(self.settings_folder))
        import slicer  # slicer-core: the real MRML library

        self.slicer = slicer
        self.qt = pythonqt.make_qt_module()
        self.ctk = standins.make_ctk_module()
        pythonqt.UiLoader.custom_widgets = {
            "ctkCollapsibleButton": standins.ctkCollapsibleButton, "ctkDirectoryButton": standins.ctkDirectoryButton,
            "qMRMLNodeComboBox": standins.qMRMLNodeComboBox, "qMRMLWidget": standins.qMRMLWidget}
        self._swap_module("qt", self.qt)
        self._swap_module("ctk", self.ctk)
        self.scene = slicer.vtkMRMLScene()
        # Slicer's Segmentations module registers its editor node class when the application starts
        # (qSlicerSegmentationsModule::setup); a bare slicer-core scene does not know it.
        self.scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
        self.markups = standins.MarkupsLogic()
        self.module_parent = standins.ScriptedModule(MODULE_DIR / f"{MODULE_NAME}.py")
        self.modules = standins.Modules({
            MODULE_NAME.lower(): self.module_parent,
            "markups": standins.ScriptedModule(Path("Markups"), self.markups)})
        self.application = standins.Application(self.scene, lambda: self.qt.QSettings())
        for name, value in (("app", self.application), ("mrmlScene", self.scene), ("modules", self.modules),
                            ("qMRMLWidget", standins.qMRMLWidget),
                            ("qMRMLNodeComboBox", standins.qMRMLNodeComboBox),
                            ("qMRMLSegmentEditorWidget", standins.qMRMLSegmentEditorWidget),
                            ("qSlicerSegmentEditorEffectFactory", standins.qSlicerSegmentEditorEffectFactory)):
            self._swap_slicer_attribute(name, value)
        for name, value in standins.slicer_type_only_classes().items():
            self._swap_slicer_attribute(name, value)
        for name in REAL_FILES:
            self._swap_slicer_attribute(name, self._load_real(f"slicer.{name}", SLICER_PYTHON / f"{name}.py"))
        self._swap_slicer_attribute("parameterNodeWrapper", self._load_real(
            "slicer.parameterNodeWrapper", SLICER_PYTHON / "parameterNodeWrapper" / "__init__.py", package=True))
        logging.getLogger().addHandler(self.messages)
        logging.getLogger().setLevel(logging.INFO)
        # An exception in a slot (a button's, a QTimer's) does not reach the caller: PySide6 hands
        # it to sys.excepthook, as PythonQt prints it in Slicer. Kept here, it fails the test at
        # the next processing of events.
        self.slot_errors: list[str] = []
        self._saved_excepthook = sys.excepthook
        sys.excepthook = lambda kind, error, trace: self.slot_errors.append(
            "".join(traceback.format_exception(kind, error, trace)))
        return self

    def _load_real(self, name: str, path: Path, package: bool = False) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[str(path.parent)] if package else None)
        module = importlib.util.module_from_spec(spec)
        self._swap_module(name, module)
        spec.loader.exec_module(module)
        return module

    def _swap_module(self, name: str, module: Any) -> None:
        self._saved_modules.setdefault(name, sys.modules.get(name))
        sys.modules[name] = module

    def _swap_slicer_attribute(self, name: str, value: Any) -> None:
        self._saved_slicer_attributes.setdefault(name, getattr(self.slicer, name, _MISSING))
        setattr(self.slicer, name, value)

    def close(self) -> None:
        """Unload the module as Slicer does at exit (cleanup), then take our parts out again."""
        try:
            if self.widget is not None:
                self.application.moduleManager().moduleAboutToBeUnloaded.emit(MODULE_NAME)
                self.widget = None
            if self.panel is not None:
                self.panel.deleteLater()
                self.panel = None
            self.process_events()
        finally:
            self._restore()

    def _restore(self) -> None:
        logging.getLogger().removeHandler(self.messages)
        sys.excepthook = self._saved_excepthook
        for name in [n for n in sys.modules if n.startswith("slicer.parameterNodeWrapper.")]:
            self._saved_modules.setdefault(name, None)
        for name, saved in self._saved_modules.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved
        for name, saved in self._saved_slicer_attributes.items():
            if saved is _MISSING:
                if hasattr(self.slicer, name):
                    delattr(self.slicer, name)
            else:
                setattr(self.slicer, name, saved)
        self._saved_modules, self._saved_slicer_attributes = {}, {}
        sys.modules.pop(MODULE_NAME, None)

    # ------------------------------------------------------------------ the module
    def load_module_file(self) -> types.ModuleType:
        """Execute LymphNodeDGST.py as Slicer's scripted-module factory does (its folder on sys.path)."""
        if str(MODULE_DIR) not in sys.path:
            sys.path.insert(0, str(MODULE_DIR))
        return self._load_real(MODULE_NAME, MODULE_DIR / f"{MODULE_NAME}.py")

    def open_module(self) -> Any:
        """Construct the module and its widget, then setup() and enter(): a user opening the module."""
        self.python_module = self.load_module_file()
        self.module = getattr(self.python_module, MODULE_NAME)(self.module_parent)
        self.panel = standins.qSlicerScriptedLoadableModuleWidget()
        self.panel.setLayout(self.qt.QVBoxLayout())
        self.widget = getattr(self.python_module, f"{MODULE_NAME}Widget")(self.panel)
        self.widget.setup()
        self.panel.resize(500, 1400)
        self.panel.show()  # Slicer shows the module panel when the module is selected
        self.enter()
        return self.widget

    def enter(self) -> None:
        self.panel.isEntered = True
        self.widget.enter()

    def exit(self) -> None:
        self.widget.exit()
        self.panel.isEntered = False

    # ------------------------------------------------------------------ driving it
    def process_events(self, seconds: float = 0.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
            if self.slot_errors:
                raise AssertionError("an exception in a Qt slot:\n" + self.slot_errors.pop(0))
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Run the event loop (QTimer polls included) until `condition()` is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process_events()
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                             f"messages: {self.messages.errors()[-3:]}")

    @staticmethod
    def click(button) -> None:
        if not button.enabled:
            raise AssertionError(f"{QtCore.QObject.objectName(button) or button.text!r} is disabled")
        button.click()


_MISSING = object()
