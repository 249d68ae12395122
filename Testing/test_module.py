"""The Slicer module file and its .ui, checked without a Slicer application (none on CI).

LymphNodeDGST.py only imports inside Slicer (qt, slicer.ScriptedLoadableModule, ...), so it is read
with `ast`: the widgets it uses exist in the .ui, the core names it imports exist, its calls into
the core, its own logic class and slicer.util bind to the real signatures, the parameter node fits
the widgets connectGui binds it to, and nothing heavy is imported when Slicer loads the module.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LymphNodeDGST"
MODULE_FILE = MODULE_DIR / "LymphNodeDGST.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LymphNodeDGST.ui"
TREE = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
UI = ET.parse(UI_FILE).getroot()
CLASSES = {node.name: node for node in TREE.body if isinstance(node, ast.ClassDef)}

QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QSpinBox",
              "QProgressBar", "QTableWidget", "QLineEdit"}
EXPECTED_WIDGETS = {
    "LymphNodeDGST": "qMRMLWidget",
    # sections
    "firstUseCollapsibleButton": "ctkCollapsibleButton", "modelCollapsibleButton": "ctkCollapsibleButton",
    "segmentCollapsibleButton": "ctkCollapsibleButton", "correctCollapsibleButton": "ctkCollapsibleButton",
    "adaptCollapsibleButton": "ctkCollapsibleButton", "advancedCollapsibleButton": "ctkCollapsibleButton",
    # first use
    "installDependenciesButton": "QPushButton", "homeDirectoryButton": "ctkDirectoryButton",
    # model
    "modelsTableWidget": "QTableWidget", "activateButton": "QPushButton", "rollbackButton": "QPushButton",
    "installSourceLineEdit": "QLineEdit", "installButton": "QPushButton",
    "trustCheckpointCheckBox": "QCheckBox", "exportAdapterButton": "QPushButton",
    "installAdapterButton": "QPushButton",
    # segment
    "inputVolumeSelector": "qMRMLNodeComboBox", "outputSegmentationSelector": "qMRMLNodeComboBox",
    "deviceComboBox": "QComboBox", "fastCheckBox": "QCheckBox", "applyButton": "QPushButton",
    "segmentProgressBar": "QProgressBar", "nodesTableWidget": "QTableWidget",
    # correct
    "segmentEditorContainer": "QWidget", "saveCaseButton": "QPushButton",
    "casesTableWidget": "QTableWidget", "removeCaseButton": "QPushButton",
    # adapt
    "adaptButton": "QPushButton", "methodComboBox": "QComboBox", "gammaSpinBox": "QSpinBox",
    "iterationsSpinBox": "QSpinBox", "adaptDeviceComboBox": "QComboBox",
    "adaptProgressBar": "QProgressBar", "curveLabel": "QLabel", "adaptResultWidget": "QWidget",
    "useAdaptedButton": "QPushButton", "keepCurrentButton": "QPushButton",
}
# What the parameter node wrapper's GUI connectors bind each field type to (Slicer's guiConnectors).
CONNECTOR_WIDGETS = {"bool": {"QCheckBox"}, "int": {"QSpinBox", "QSlider"},
                     "float": {"QDoubleSpinBox", "ctkSliderWidget"}, "str": {"QComboBox", "QLineEdit"}}
# Attributes the widget gets from ScriptedLoadableModuleWidget / VTKObservationMixin.
WIDGET_BASE_ATTRIBUTES = {"layout", "parent", "resourcePath", "addObserver", "removeObserver",
                          "removeObservers", "ui"}
TEST_BASE_ATTRIBUTES = {"assertTrue", "assertEqual", "assertIsNotNone", "assertGreater",
                        "assertLess", "delayDisplay", "skipTest"}


def ui_widgets() -> dict[str, str]:
    return {widget.get("name"): widget.get("class") for widget in UI.iter("widget")}


def ui_property(name: str, prop: str) -> ET.Element | None:
    widget = next(w for w in UI.iter("widget") if w.get("name") == name)
    found = next((p for p in widget.findall("property") if p.get("name") == prop), None)
    return None if found is None else next(iter(found))


def self_attribute_chain(node: ast.AST) -> list[str] | None:
    """`self.a.b.c` -> ["a", "b", "c"]; None for anything else."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self":
        return names[::-1]
    return None


def methods(class_name: str) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in CLASSES[class_name].body if isinstance(node, ast.FunctionDef)}


def signature_of(function: ast.FunctionDef) -> inspect.Signature:
    """The call signature of a method from its AST (self dropped; defaults as placeholders)."""
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    kinds = ([inspect.Parameter.POSITIONAL_ONLY] * len(args.posonlyargs)
             + [inspect.Parameter.POSITIONAL_OR_KEYWORD] * len(args.args))
    parameters = [inspect.Parameter(a.arg, kind, default=inspect.Parameter.empty if d is None else None)
                  for a, kind, d in zip(positional, kinds, defaults)]
    if args.vararg:
        parameters.append(inspect.Parameter(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        parameters.append(inspect.Parameter(a.arg, inspect.Parameter.KEYWORD_ONLY,
                                            default=inspect.Parameter.empty if d is None else None))
    if args.kwarg:
        parameters.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    return inspect.Signature(parameters)


def bind(signature: inspect.Signature, call: ast.Call, what: str) -> None:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return  # *args / **kwargs: cannot be counted statically
    try:
        signature.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
    except TypeError as error:
        raise AssertionError(f"line {call.lineno}: {what}{signature}: {error}") from None


def core_imports() -> dict[str, object]:
    """Every name the module file imports from LymphNodeDGSTLib (anywhere), resolved."""
    resolved = {}
    for node in ast.walk(TREE):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("LymphNodeDGSTLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name, None)
                if value is None:  # `from package import submodule`
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                resolved[alias.asname or alias.name] = value
    return resolved


@pytest.fixture(scope="module")
def slicer_core():
    return pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML library) is not installed")


# --------------------------------------------------------------------------- the module file
def test_module_file_defines_the_four_classes_on_slicers_bases():
    bases = {name: [ast.unparse(base) for base in node.bases] for name, node in CLASSES.items()}
    assert bases["LymphNodeDGST"] == ["ScriptedLoadableModule"]
    assert bases["LymphNodeDGSTWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    # one base: Slicer's ScriptedLoadableModuleLogic.__init__ calls super().__init__(), which a second
    # base (ModuleLogic, once) receives without its arguments; the logic holds a ModuleLogic as `core`
    assert bases["LymphNodeDGSTLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["LymphNodeDGSTTest"] == ["ScriptedLoadableModuleTest"]
    decorators = [ast.unparse(d) for d in CLASSES["LymphNodeDGSTParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    assert {"setup", "cleanup", "enter", "exit"} <= set(methods("LymphNodeDGSTWidget"))
    assert "getParameterNode" in methods("LymphNodeDGSTLogic")


def module_constant(name: str):
    return next(ast.literal_eval(n.value) for n in TREE.body if isinstance(n, ast.Assign)
                and ast.unparse(n.targets[0]) == name)


def test_module_metadata():
    """Also catches a title, help or category not marked for translation (slicer.i18n's tr as
    `_`, and translate("qSlicerAbstractCoreModule", ...) for the category, as Slicer 5.10's scripted
    module template does) and a help text without its documentation link."""
    init = methods("LymphNodeDGST")["__init__"]
    calls, values = [], {}
    untranslated = lambda text: text  # noqa: E731 - what tr() returns without a translation
    scope = {"_": untranslated, "translate": lambda context, text: text,
             "DOCUMENTATION_URL": module_constant("DOCUMENTATION_URL")}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("self.parent."):
            name = ast.unparse(node.targets[0]).removeprefix("self.parent.")
            values[name] = eval(compile(ast.Expression(node.value), "metadata", "eval"), scope)
            calls.append((name, {ast.unparse(n.func) for n in ast.walk(node.value) if isinstance(n, ast.Call)}))
    assert values["categories"] == ["Segmentation"]
    assert values["title"] == "Lymph Node DGST"  # what Slicer's module list shows
    assert f"**{values['title']}**" in (REPO / "README.md").read_text(encoding="utf-8")  # README names it so
    assert values["contributors"] and all(values["contributors"])
    assert "lymph nodes" in values["helpText"] and "DGST" in values["helpText"]
    assert f'href="{module_constant("DOCUMENTATION_URL")}"' in values["helpText"]
    assert module_constant("DOCUMENTATION_URL").startswith("https://")
    assert "nnU-Net" in values["acknowledgementText"]
    translated = {name for name, functions in calls if "_" in functions or "translate" in functions}
    assert {"title", "categories", "helpText", "acknowledgementText"} <= translated


def test_user_facing_strings_are_marked_for_translation():
    """Catches an f-string or bare literal shown to the user (message boxes, status labels,
    button texts) that Slicer's translation tools cannot pick up: they must go through _()."""
    shown = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "slicer.util.errorDisplay", "slicer.util.infoDisplay",
                "slicer.util.confirmOkCancelDisplay") and node.args:
            shown.append(node.args[0])
        elif isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).endswith(".text") \
                and ast.unparse(node.targets[0]).startswith("self.ui."):
            shown.append(node.value)
    assert len(shown) > 12
    bare = [f"line {n.lineno}: {ast.unparse(n)}" for n in shown
            if isinstance(n, ast.JoinedStr) or (isinstance(n, ast.Constant) and n.value)]
    assert not bare, bare


def test_every_ui_widget_the_code_uses_is_in_the_ui_file():
    used = {chain[1] for node in ast.walk(TREE)
            if (chain := self_attribute_chain(node)) and len(chain) >= 2 and chain[0] == "ui"}
    assert len(used) > 30
    missing = used - set(ui_widgets())
    assert not missing, f"self.ui.<name> without an objectName in the .ui: {sorted(missing)}"


def test_core_imports_name_real_modules_and_attributes():
    resolved = core_imports()
    assert {"dependencies", "JobFollower", "PanelStateMachine", "ModuleLogic"} <= set(resolved)
    modules = {name: value for name, value in resolved.items() if inspect.ismodule(value)}
    for node in ast.walk(TREE):  # module.attribute uses, e.g. dependencies.plan_installation
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            assert hasattr(modules[node.value.id], node.attr), f"line {node.lineno}: {ast.unparse(node)}"


def test_calls_into_the_core_bind_to_the_real_signatures():
    resolved = core_imports()
    checked = 0
    for call in (n for n in ast.walk(TREE) if isinstance(n, ast.Call)):
        target = None
        if isinstance(call.func, ast.Name) and call.func.id in resolved:
            target = resolved[call.func.id]
        elif isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) \
                and inspect.ismodule(resolved.get(call.func.value.id)):
            target = getattr(resolved[call.func.value.id], call.func.attr)
        if isinstance(target, type) and issubclass(target, BaseException):
            continue  # exceptions take any message
        if callable(target) and not inspect.ismodule(target):
            bind(inspect.signature(target), call, ast.unparse(call.func))
            checked += 1
    assert checked > 30


def unbound(function) -> inspect.Signature:
    """A plain method's signature without `self`."""
    signature = inspect.signature(function)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def test_calls_to_the_logic_and_own_methods_bind():
    from LymphNodeDGSTLib.slicer_bridge.module_logic import ModuleLogic

    logic = dict(methods("LymphNodeDGSTLogic"))
    bridge = {name: member for name, member in vars(ModuleLogic).items()
              if inspect.isfunction(member) and name not in logic}
    logic_attributes = set(logic) | {"core"}
    core_attributes = set(vars(ModuleLogic)) | {"home", "scene", "_segmenter", "_segmenterKey"}
    for class_name, own_extra in (("LymphNodeDGSTWidget", WIDGET_BASE_ATTRIBUTES),
                                  ("LymphNodeDGSTTest", TEST_BASE_ATTRIBUTES)):
        own = methods(class_name)
        for node in ast.walk(CLASSES[class_name]):
            if isinstance(node, ast.Call):
                chain = self_attribute_chain(node.func)
                if chain == ["logic"] or not chain:
                    func = node.func  # `logic.method(...)`: the self-test's own LymphNodeDGSTLogic
                    if isinstance(func, ast.Attribute) and ast.unparse(func.value) == "logic":
                        assert func.attr in logic or func.attr in bridge, ast.unparse(func)
                        bind(signature_of(logic[func.attr]) if func.attr in logic else unbound(bridge[func.attr]),
                             node, ast.unparse(func))
                    continue
                if chain[:2] == ["logic", "core"] and len(chain) == 3:
                    assert chain[2] in bridge, f"ModuleLogic has no {chain[2]}"
                    bind(unbound(bridge[chain[2]]), node, f"logic.core.{chain[2]}")
                elif chain[0] == "logic" and len(chain) == 2:
                    assert chain[1] in logic or chain[1] in bridge, f"LymphNodeDGSTLogic has no {chain[1]}"
                    bind(signature_of(logic[chain[1]]) if chain[1] in logic else unbound(bridge[chain[1]]),
                         node, f"logic.{chain[1]}")
                elif len(chain) == 1:
                    assert chain[0] in own or chain[0] in own_extra, f"{class_name} has no {chain[0]}"
                    if chain[0] in own:
                        bind(signature_of(own[chain[0]]), node, chain[0])
            chain = self_attribute_chain(node) if isinstance(node, ast.Attribute) else None
            if chain and chain[0] == "logic" and len(chain) >= 2:
                assert chain[1] in logic_attributes, f"LymphNodeDGSTLogic has no {chain[1]}"
                if chain[1] == "core" and len(chain) >= 3:
                    assert chain[2] in core_attributes, f"ModuleLogic has no {chain[2]}"


def test_slicer_util_calls_and_mrml_classes_exist_in_slicer(slicer_core):
    """What slicer-core can check: slicer.util (Slicer's own util.py) and MRML classes."""
    import slicer.util
    import vtk

    imported = {alias.name for node in TREE.body if isinstance(node, ast.ImportFrom)
                and node.module == "slicer" for alias in node.names}
    assert imported and all(hasattr(slicer, name) for name in imported)
    checked = set()
    for node in ast.walk(TREE):
        text = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
        if text.startswith("slicer.util."):
            function = getattr(slicer.util, text.removeprefix("slicer.util."), None)
            assert function is not None, f"slicer.util has no {text}"
            bind(inspect.signature(function), node, text)
            checked.add(text)
        elif text.startswith("slicer.mrmlScene."):
            assert hasattr(slicer.vtkMRMLScene, text.removeprefix("slicer.mrmlScene.")), text
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) == "vtk":
            assert hasattr(vtk, node.attr), ast.unparse(node)
    assert {"slicer.util.loadUI", "slicer.util.WaitCursor", "slicer.util.errorDisplay"} <= checked


def module_file_namespace() -> types.SimpleNamespace:
    """The names the module file imports from the core, under the names it gives them."""
    names = {}
    for node in TREE.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("LymphNodeDGSTLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:  # `from package import submodule` needs the submodule imported
                value = getattr(module, alias.name, None) or importlib.import_module(f"{node.module}.{alias.name}")
                names[alias.asname or alias.name] = value
    return types.SimpleNamespace(**names)


def test_no_algorithm_code_when_slicer_loads_the_module():
    allowed = {"logging", "sys", "tempfile", "time", "pathlib", "typing", "qt", "ctk", "vtk", "slicer",
               "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "slicer.util", "slicer.i18n",
               "LymphNodeDGSTLib", "LymphNodeDGSTLib.errors", "LymphNodeDGSTLib.jobs.manager",
               "LymphNodeDGSTLib.adaptation.methods", "LymphNodeDGSTLib.engine.segmentation.backends.names",
               "LymphNodeDGSTLib.slicer_bridge"} | {f"LymphNodeDGSTLib.slicer_bridge.{name}" for name in (
               "environment", "panel_state", "job_following", "model_section", "segment_section",
               "cases_section", "adapt_section", "folder_segmentation", "editor", "reporting",
               "ranking_panel", "module_logic", "background_call")} | {"LymphNodeDGSTLib.demo.demo_archive"}
    top_level = set()
    for node in TREE.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    assert top_level <= allowed, top_level - allowed
    heavy = ("torch", "nnunetv2", "dynamic_network_architectures", "numpy", "SimpleITK", "scipy",
             "matplotlib", "peft", "slicer", "vtk")
    core = sorted(m for m in top_level if m.startswith("LymphNodeDGSTLib.")) + ["LymphNodeDGSTLib.slicer_bridge.dependencies"]
    probe = (f"import sys\nfor name in {core!r}: __import__(name)\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]", f"importing the module's core imports loads {completed.stdout}"


def test_the_module_file_stays_a_thin_shell():
    lines = MODULE_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 760, "logic belongs in LymphNodeDGSTLib/slicer_bridge/, not in the module file"
    algorithm = {"torch", "nnunetv2", "numpy", "scipy"}
    imported_anywhere = {alias.name.split(".")[0] for node in ast.walk(TREE)
                         if isinstance(node, ast.Import) for alias in node.names}
    imported_anywhere |= {node.module.split(".")[0] for node in ast.walk(TREE)
                          if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported_anywhere & algorithm


def test_self_test_runs_the_whole_loop_with_real_calls():
    test = methods("LymphNodeDGSTTest")
    run_calls = {ast.unparse(n.func) for n in ast.walk(test["runTest"]) if isinstance(n, ast.Call)}
    assert {f"self.{name}" for name in test if name.startswith("test_")} <= run_calls
    calls = {ast.unparse(n.func) for n in ast.walk(CLASSES["LymphNodeDGSTTest"]) if isinstance(n, ast.Call)}
    assert "segment_save_case_and_adapt" in calls  # the loop itself is plain Python (selftest.py)
    loop_file = MODULE_FILE.parent / "LymphNodeDGSTLib" / "slicer_bridge" / "selftest.py"
    loop = next(node for node in ast.walk(ast.parse(loop_file.read_text(encoding="utf-8")))
                if isinstance(node, ast.FunctionDef) and node.name == "segment_save_case_and_adapt")
    loop_calls = {ast.unparse(n.func) for n in ast.walk(loop) if isinstance(n, ast.Call)}
    assert {"generate_phantom", "sitk_image_to_volume_node", "logic.ensureDefaultModel",
            "logic.segmentInProcess", "logic.saveTrainingCase", "logic.startAdaptation",
            "adapt_request", "follower.poll"} <= loop_calls


# --------------------------------------------------------------------------- the .ui file
def test_ui_has_the_expected_widgets_and_declares_its_custom_classes():
    widgets = ui_widgets()
    names = [w.get("name") for w in UI.iter("widget")]
    assert len(names) == len(set(names)), "objectNames must be unique"
    wrong = {name: (widgets.get(name), cls) for name, cls in EXPECTED_WIDGETS.items()
             if widgets.get(name) != cls}
    assert not wrong, wrong
    custom = {c.findtext("class") for c in UI.iter("customwidget")}
    assert set(widgets.values()) - QT_CLASSES <= custom
    for name in custom:
        declared = next(c for c in UI.iter("customwidget") if c.findtext("class") == name)
        assert declared.findtext("header") == f"{name}.h"
    assert ui_property("advancedCollapsibleButton", "collapsed").text == "true"
    assert UI.findtext("class") == "LymphNodeDGST"


def test_node_selectors_get_the_scene():
    connections = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in UI.iter("connection")}
    selectors = [name for name, cls in ui_widgets().items() if cls == "qMRMLNodeComboBox"]
    assert selectors
    for name in selectors:
        assert ("LymphNodeDGST", "mrmlSceneChanged(vtkMRMLScene*)", name,
                "setMRMLScene(vtkMRMLScene*)") in connections


def test_parameter_node_fields_fit_the_widgets_connectGui_binds():
    fields = {}
    for node in CLASSES["LymphNodeDGSTParameterNode"].body:
        assert isinstance(node, ast.AnnAssign)
        fields[node.target.id] = node
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0"
                bound[prop.findtext("string")] = widget
    assert set(bound) <= set(fields), set(bound) - set(fields)
    assert set(fields) - set(bound) == {"nodeTable"}  # set by code, not shown in a widget
    panel = module_file_namespace()

    for name, widget in bound.items():
        annotation = fields[name].annotation
        value = fields[name].value
        if isinstance(value, ast.Name):  # a default the panel module defines (ADAPT_DEFAULT_METHOD)
            default = getattr(panel, value.id)
        else:
            default = None if value is None else ast.literal_eval(value)
        if isinstance(annotation, ast.Name) and annotation.id.startswith("vtkMRML"):
            assert widget.get("class") == "qMRMLNodeComboBox", name
            types = [s.text for s in ui_property(widget.get("name"), "nodeTypes").iter("string")]
            assert types == [annotation.id], name
            continue
        if isinstance(annotation, ast.Subscript):  # Annotated[type, validator]
            base, validator = annotation.slice.elts
            base = base.id
            if ast.unparse(validator.func) == "Choice":
                choices = getattr(panel, validator.args[0].args[0].id)
                assert widget.get("class") == "QComboBox", name  # Choice needs a combo box
                assert default in choices, (name, default, choices)
            else:
                assert ast.unparse(validator.func) == "WithinRange"
                low, high = (ast.literal_eval(a) for a in validator.args)
                assert low <= default <= high
                spin = {p: int(ui_property(widget.get("name"), p).text) for p in ("minimum", "maximum", "value")}
                assert spin == {"minimum": low, "maximum": high, "value": default}, name
        else:
            base = annotation.id
        assert widget.get("class") in CONNECTOR_WIDGETS[base], (name, widget.get("class"), base)
