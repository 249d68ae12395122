"""The pieces of the Slicer panel that follow Slicer 5.10's own behaviour, tested without Qt:
the embedded Segment Editor's wiring, failures that do not skip the refresh after them, and the
self-test's part that needs no torch (on real MRML from slicer-core)."""

from __future__ import annotations

import ast
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.slicer_bridge.editor import EFFECT_REGISTERED, EmbeddedSegmentEditor
from LymphNodeDGSTLib.slicer_bridge.reporting import reported

REPO = Path(__file__).resolve().parents[1]
MODULE_TREE = ast.parse((REPO / "LymphNodeDGST" / "LymphNodeDGST.py").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- Segment Editor
class EffectFactory:
    """qSlicerSegmentEditorEffectFactory: effects register at any time and each registration
    emits effectRegistered(QString) (qSlicerSegmentEditorEffectFactory.h line 62)."""

    def __init__(self):
        self.effects, self.slots = ["Paint", "Erase"], []

    def connect(self, signal, slot):
        assert signal == "effectRegistered(QString)"
        self.slots.append(slot)

    def disconnect(self, signal, slot):
        self.slots.remove(slot)

    def register(self, name):  # a Python effect (Slicer's or an extension's) arriving later
        self.effects.append(name)
        for slot in list(self.slots):
            slot(name)


class EditorWidget:
    """qMRMLSegmentEditorWidget as far as the wiring shows: the effect list is read from the
    factory only when updateEffectList is called; the selections it makes when it gets the scene
    are stored in its editor node, so they are kept only if that node is set first
    (SegmentEditor.py v5.10.0 lines 62-64)."""

    def __init__(self, factory):
        self.factory, self.calls, self.node, self.scene = factory, [], None, None
        self.effects, self.shortcuts, self.active_effect = list(factory.effects), False, "Paint"
        self.selections_saved = None

    def setMRMLSegmentEditorNode(self, node):
        self.calls.append("setMRMLSegmentEditorNode")
        self.node = node

    def mrmlSegmentEditorNode(self):
        return self.node

    def setMRMLScene(self, scene):
        self.calls.append("setMRMLScene")
        self.scene, self.selections_saved = scene, self.node is not None

    def updateEffectList(self):
        self.effects = list(self.factory.effects)

    def installKeyboardShortcuts(self):
        self.shortcuts = True

    def uninstallKeyboardShortcuts(self):
        self.shortcuts = False

    def setActiveEffect(self, effect):
        self.active_effect = effect

    def updateWidgetFromMRML(self):
        self.calls.append("updateWidgetFromMRML")

    def removeViewObservations(self):
        self.calls.append("removeViewObservations")


def test_embedded_segment_editor_is_wired_as_slicers_segment_editor_module():
    """Catches: the scene set before the editor node (the editor's automatic selections are then
    lost), Python effects registered after the module started never shown, keyboard shortcuts not
    installed on enter or left installed after exit, and a factory connection left after cleanup."""
    factory, nodes = EffectFactory(), ["editor node 1"]
    widget = EditorWidget(factory)
    editor = EmbeddedSegmentEditor(widget, "scene", lambda: nodes[-1], factory)
    assert widget.calls == ["setMRMLSegmentEditorNode", "setMRMLScene"] and widget.selections_saved

    factory.register("Wrap Solidify")
    assert "Wrap Solidify" in widget.effects

    editor.enter()
    assert widget.shortcuts and widget.calls[-1] == "updateWidgetFromMRML"
    editor.exit()
    assert not widget.shortcuts and widget.active_effect is None
    assert widget.calls[-1] == "removeViewObservations"

    nodes.append("editor node 2")  # the scene was closed: a new singleton node
    editor.select_editor_node()
    assert widget.node == "editor node 2"
    editor.cleanup()
    assert factory.slots == []


def test_module_delegates_the_editor_to_the_bridge_on_setup_enter_exit_and_cleanup():
    """Catches the module wiring the editor by hand again (or forgetting one of the four hooks)."""
    widget = next(n for n in MODULE_TREE.body if isinstance(n, ast.ClassDef) and n.name == "LymphNodeDGSTWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    calls = {name: {ast.unparse(c.func) for c in ast.walk(f) if isinstance(c, ast.Call)} for name, f in methods.items()}
    assert "EmbeddedSegmentEditor" in calls["setup"]
    assert "slicer.qSlicerSegmentEditorEffectFactory.instance" in calls["setup"]
    assert "self.segmentEditorWidget.setMRMLScene" not in calls["setup"]
    assert {"enter": "self.editor.enter", "exit": "self.editor.exit",
            "cleanup": "self.editor.cleanup"}.items() <= {k: next(iter({c for c in v if c.startswith("self.editor.")}), "")
                                                          for k, v in calls.items()}.items()


# --------------------------------------------------------------------------- failures
@contextmanager
def slicer_5_10_try_with_error_display(message, shown):
    """slicer.util.tryWithErrorDisplay of Slicer 5.10.0 (util.py lines 3368-3409): on an
    exception it shows errorDisplay(message + error, detailedText=traceback) and then re-raises."""
    try:
        yield
    except Exception as error:
        shown.append(f"{message}\n\n{error}")
        raise


def test_a_failed_action_shows_one_message_and_the_refresh_after_it_runs():
    """Catches: code after the block skipped after a failure (what Slicer's tryWithErrorDisplay
    does, as the first half shows), a traceback escaping to Qt, and a UserInputError shown with a
    traceback instead of just its message."""
    shown, refreshed = [], []

    def on_remove_case_with(context):
        with context:
            raise RuntimeError("the case folder is read-only")
        refreshed.append(True)

    with pytest.raises(RuntimeError):  # Slicer's: dialog, then the exception goes on
        on_remove_case_with(slicer_5_10_try_with_error_display("Could not remove the case.", shown))
    assert refreshed == [] and len(shown) == 1

    errors = []
    on_remove_case_with(reported("Could not remove the case.", lambda text, details: errors.append((text, details))))
    assert refreshed == [True]
    assert errors[0][0] == "Could not remove the case.\n\nthe case folder is read-only"
    assert "Traceback" in errors[0][1] and "RuntimeError" in errors[0][1]

    with reported("Could not start.", lambda text, details: errors.append((text, details))) as attempt:
        raise UserInputError("Select the CT volume to segment.")
    assert attempt.failed and errors[-1] == ("Could not start.\n\nSelect the CT volume to segment.", "")
    with reported("unused", lambda *a: pytest.fail("no failure")) as attempt:
        pass
    assert not attempt.failed


def test_the_module_uses_no_re_raising_error_display_and_no_wait_cursor_over_a_dialog():
    """Catches tryWithErrorDisplay coming back into the module, PyTorchUtils asked to show its
    own confirmation (under our wait cursor), and installTorch called without nnU-Net's range."""
    calls = [n for n in ast.walk(MODULE_TREE) if isinstance(n, ast.Call)]
    names = {ast.unparse(c.func) for c in calls}
    assert not any(name.endswith("tryWithErrorDisplay") for name in names)
    assert "slicer.util.pip_install" not in names  # pip runs through dependencies.run_pip
    install = [c for c in calls if ast.unparse(c.func).endswith("PyTorchUtilsLogic().installTorch")]
    assert len(install) == 1
    keywords = {k.arg: ast.unparse(k.value) for k in install[0].keywords}
    assert keywords == {"askConfirmation": "False", "torchVersionRequirement": "requirement"}
    adapt = next(f for f in ast.walk(MODULE_TREE) if isinstance(f, ast.FunctionDef) and f.name == "onAdapt")
    order = [ast.unparse(c.func) for c in sorted((c for c in ast.walk(adapt) if isinstance(c, ast.Call)),
                                                 key=lambda c: (c.lineno, c.col_offset))]
    assert order.index("self.ensureLoraPackage") < order.index("self.logic.core.startAdaptation")


# --------------------------------------------------------------------------- self-test
def test_self_test_part_without_torch_passes_on_real_mrml_with_torch_absent(tmp_path):
    """Runs the self-test's no-torch part on slicer-core's MRML in a Python where importing torch
    fails, as on the extension build factory. Catches a torch import creeping into it and a
    broken scene round trip, terminology or case save."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    probe = ("import sys; sys.modules['torch'] = None; sys.modules['nnunetv2'] = None\n"
             "import slicer\n"
             "from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary\n"
             "from LymphNodeDGSTLib.slicer_bridge.selftest import scene_and_case_library\n"
             f"print(scene_and_case_library(slicer.vtkMRMLScene(), CaseLibrary({str(tmp_path / 'cases')!r})))\n")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "training case" in completed.stdout
