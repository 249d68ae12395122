"""The Segment Editor embedded in the panel, wired as Slicer's own Segment Editor module wires it.

Read from Slicer 5.10.0, Modules/Scripted/SegmentEditor/SegmentEditor.py:
- setup (lines 62-71): the editor node is set *before* the scene, "so that the automatic selections
  made when the scene is set are saved"; the effect factory's effectRegistered(QString) signal
  refreshes the effect list, because Python effects register after a module that starts first;
- enter (lines 114-119): installKeyboardShortcuts, editor node again, updateWidgetFromMRML;
- exit (lines 134-137): setActiveEffect(None), uninstallKeyboardShortcuts, removeViewObservations;
- cleanup (line 156): the effectRegistered connection is removed.
No Qt is imported here: the widget, factory and node come from the module file.
"""

from __future__ import annotations

from typing import Any, Callable

EFFECT_REGISTERED = "effectRegistered(QString)"


class EmbeddedSegmentEditor:
    """A qMRMLSegmentEditorWidget (`editor`) inside the module panel."""

    def __init__(self, editor: Any, scene: Any, editor_node: Callable[[], Any], effect_factory: Any):
        self.editor, self._editor_node, self._factory = editor, editor_node, effect_factory
        editor.setMRMLSegmentEditorNode(editor_node())  # before the scene (see above)
        editor.setMRMLScene(scene)
        effect_factory.connect(EFFECT_REGISTERED, self.on_effect_registered)

    def on_effect_registered(self, *unused: Any) -> None:
        self.editor.updateEffectList()

    def select_editor_node(self) -> None:
        """The module's editor node (a new one after the scene was closed)."""
        node = self._editor_node()
        if self.editor.mrmlSegmentEditorNode() is not node:
            self.editor.setMRMLSegmentEditorNode(node)

    def enter(self) -> None:
        self.editor.installKeyboardShortcuts()
        self.select_editor_node()
        self.editor.updateWidgetFromMRML()

    def exit(self) -> None:
        self.editor.setActiveEffect(None)
        self.editor.uninstallKeyboardShortcuts()
        self.editor.removeViewObservations()

    def cleanup(self) -> None:
        self._factory.disconnect(EFFECT_REGISTERED, self.on_effect_registered)
