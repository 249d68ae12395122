"""A `qt` module with the PythonQt conventions Slicer's Python code relies on, over PySide6's real
Qt widgets on the offscreen platform.

PythonQt (Slicer's binding) differs from PySide6 in what our module and Slicer's own files use:
- a Qt property reads and writes as an attribute, and wins over a method of the same name
  (`button.enabled = False`, `label.text`, `table.rowCount`), and `name` is the objectName;
- `widget.connect("clicked(bool)", slot)` and `disconnect(...)` take the C++ signature;
- enums sit under `qt.Qt` and the classes (`qt.Qt.SmoothTransformation`, `qt.QFile.ReadOnly`);
- file dialogs' static functions return a path string.
Each QObject class is a thin subclass of the PySide6 class with those conventions
(`PythonQtConventions`), created on first use and reused, so `type(widget) == qt.QCheckBox` holds
for a widget the .ui loader made, as Slicer's parameter-node connectors require. Classes that are not
QObjects (QPixmap, QIcon, QTableWidgetItem, ...) are PySide6's own.

The file dialogs are the one seam: a test states the answers in advance (`FileDialogs.answer`),
and a dialog nobody expected fails the test.
"""

from __future__ import annotations

import os
import types
import xml.etree.ElementTree as ET
from typing import Any, Callable

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

_SPECIAL = ("connect", "disconnect")


class PythonQtConventions:
    """Mixin for a PySide6 QObject class: Qt properties as attributes, PythonQt's connect."""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            meta = QtCore.QObject.metaObject(self)
            index = meta.indexOfProperty(name)
            if index >= 0:
                return meta.property(index).read(self)
            if name in _SPECIAL:
                return object.__getattribute__(self, "_pythonqt_" + name)
            if name == "name":
                return QtCore.QObject.objectName(self)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        meta = QtCore.QObject.metaObject(self)
        index = meta.indexOfProperty(name)
        if index >= 0:
            if isinstance(value, tuple):  # PythonQt converts any sequence to a QStringList/QVariantList
                value = list(value)
            if not meta.property(index).write(self, value):
                raise AttributeError(f"{type(self).__name__}.{name} cannot be set to {value!r}")
            return
        if name == "name":
            QtCore.QObject.setObjectName(self, value)
            return
        super().__setattr__(name, value)

    def _pythonqt_connect(self, signature: str, slot: Callable) -> bool:
        signal_of(self, signature).connect(slot)
        return True

    def _pythonqt_disconnect(self, signature: str, slot: Callable | None = None) -> bool:
        signal = signal_of(self, signature)
        try:
            signal.disconnect(slot) if slot is not None else signal.disconnect()
        except (RuntimeError, TypeError):
            return False
        return True


def signal_of(obj: QtCore.QObject, signature: str):
    """The bound PySide6 signal for a C++ signature such as "cellClicked(int,int)"."""
    name = signature.split("(", 1)[0].strip()
    signal = QtCore.QObject.__getattribute__(obj, name)
    if not isinstance(signal, QtCore.SignalInstance):
        raise AttributeError(f"{type(obj).__name__} has no signal {signature}")
    return signal


_WRAPPED: dict[type, type] = {}


def pythonqt_class(cls: type) -> type:
    """The PythonQt-convention subclass of a PySide6 QObject class (one per class)."""
    if cls not in _WRAPPED:
        _WRAPPED[cls] = type(cls.__name__, (PythonQtConventions, cls), {"__module__": "qt"})
    return _WRAPPED[cls]


class FileDialogs:
    """QFileDialog's static functions, answered from a queue the test fills first."""

    answers: list[tuple[str, str]] = []
    asked: list[tuple[str, str]] = []

    @classmethod
    def answer(cls, kind: str, path: str) -> None:
        """Queue the path the next `kind` dialog (open, save, directory) returns ('' = cancelled)."""
        cls.answers.append((kind, str(path)))

    @classmethod
    def _take(cls, kind: str, caption: str) -> str:
        cls.asked.append((kind, caption))
        if not cls.answers or cls.answers[0][0] != kind:
            raise AssertionError(f"unexpected {kind} file dialog '{caption}' (queued: {cls.answers})")
        return cls.answers.pop(0)[1]

    @classmethod
    def getOpenFileName(cls, parent=None, caption="", directory="", filter="", *rest) -> str:
        return cls._take("open", caption)

    @classmethod
    def getSaveFileName(cls, parent=None, caption="", directory="", filter="", *rest) -> str:
        return cls._take("save", caption)

    @classmethod
    def getExistingDirectory(cls, parent=None, caption="", directory="", *rest) -> str:
        return cls._take("directory", caption)


class UiLoader(QtUiTools.QUiLoader):
    """QUiLoader making PythonQt-convention widgets, the stand-ins for Slicer's and CTK's compiled
    widgets, and the .ui's own signal-slot connections (which name C++ types such as
    `vtkMRMLScene*` that PySide6 cannot resolve, so they are made here the way Qt would)."""

    custom_widgets: dict[str, type] = {}

    def createWidget(self, class_name: str, parent=None, name: str = "") -> QtWidgets.QWidget:
        if class_name in self.custom_widgets:
            widget = self.custom_widgets[class_name](parent)
        elif hasattr(QtWidgets, class_name):
            widget = pythonqt_class(getattr(QtWidgets, class_name))(parent)
        else:
            raise AssertionError(f"the .ui uses {class_name}, which neither Qt nor a stand-in provides")
        QtCore.QObject.setObjectName(widget, name)
        return widget

    def load(self, device, parent=None):
        if not device.isOpen():
            device.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        root = ET.fromstring(bytes(device.readAll()))
        connections = root.find("connections")
        if connections is not None:
            root.remove(connections)
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(ET.tostring(root)))
        buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        widget = super().load(buffer, parent)
        if widget is not None and connections is not None:
            _connect_as_designed(widget, connections)
        return widget


def _connect_as_designed(root: QtWidgets.QWidget, connections: ET.Element) -> None:
    by_name = {QtCore.QObject.objectName(w): w for w in root.findChildren(QtCore.QObject)}
    by_name[QtCore.QObject.objectName(root)] = root
    for connection in connections.iter("connection"):
        sender, receiver = by_name[connection.findtext("sender")], by_name[connection.findtext("receiver")]
        slot_name = connection.findtext("slot").split("(", 1)[0]
        signal_of(sender, connection.findtext("signal")).connect(getattr(receiver, slot_name))


def make_qt_module() -> types.ModuleType:
    """The `qt` module: PySide6's classes by their Qt names, QObjects with PythonQt's conventions."""
    module = types.ModuleType("qt", __doc__)

    def lookup(name: str) -> Any:
        if name == "QFileDialog":
            return FileDialogs
        if name == "QUiLoader":
            return UiLoader
        if name == "Qt":
            return QtCore.Qt
        for source in (QtWidgets, QtGui, QtCore):
            cls = getattr(source, name, None)
            if cls is not None:
                if isinstance(cls, type) and issubclass(cls, QtCore.QObject):
                    return pythonqt_class(cls)
                return cls
        raise AttributeError(f"module 'qt' has no attribute '{name}'")

    module.__getattr__ = lookup
    return module
