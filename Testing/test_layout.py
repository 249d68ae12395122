"""The package layout, read from the source: subpackages by layer, no import circles.

Every import statement counts, lazy ones inside functions included, so that a layer cannot reach
up by hiding an import in a function body.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "LymphNodeDGST" / "LymphNodeDGSTLib"
PACKAGE = "LymphNodeDGSTLib"

# Lower numbers are lower layers; a module may import its own layer and any lower one.
LAYERS = {"(root)": 0, "engine": 1, "adaptation": 2, "jobs": 3, "demo": 4,
          "slicer_bridge": 5, "cli": 5}
ROOT_MODULES = {"home", "errors", "atomic", "progress"}
ENTRY_POINTS = {f"{PACKAGE}.__main__"}  # `python -m LymphNodeDGSTLib` is a face, like cli


def module_names() -> dict[str, Path]:
    names = {}
    for path in LIB.rglob("*.py"):
        parts = path.relative_to(LIB.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports (a package import resolves to its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "(root)"


@functools.cache  # parsed once per process, not once per parametrized case
def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(path, name, known) for name, path in known.items()}


def test_subpackages_follow_the_data():
    """Catches a module dropped back beside the others at the top, or a new top-level folder."""
    top_level = {path.stem for path in LIB.glob("*.py")} - {"__init__", "__main__"}
    assert top_level == ROOT_MODULES
    folders = {path.parent.name for path in LIB.glob("*/__init__.py")}
    assert folders == set(LAYERS) - {"(root)"}


@pytest.mark.parametrize("name", sorted(module_names()))
def test_no_module_imports_a_higher_layer(name):
    """Catches e.g. the engine importing adaptation (snapshot_state once lived in weight_stats and
    architectures imported it), jobs importing the command line, or the panel importing cli."""
    if name in ENTRY_POINTS:
        return
    own = layer_of(name)
    for target in graph()[name]:
        if target == PACKAGE:
            continue
        other = layer_of(target)
        assert LAYERS[other] < LAYERS[own] or other == own, (
            f"{name} ({own}) imports {target} ({other}): a lower layer reaches up")


def test_root_modules_import_nothing_of_ours():
    for name, targets in graph().items():
        if layer_of(name) == "(root)" and name not in ENTRY_POINTS and name != PACKAGE:
            assert targets <= {PACKAGE}, f"{name} imports {targets}"


def test_no_import_circles():
    """Catches the two circles this layout opened: cli -> demo -> jobs_cli -> cli (demo borrowed
    follow_job from the command line) and jobs <-> worker (check_kind_name)."""
    edges = graph()
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in edges.get(node, ()):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


# Inside a layer the rooms follow the data too: images and the model store below the segmenter
# (CT -> label), the segmenter below cohorts (many CTs); the case library (label -> case) below
# the rest of adaptation (cases -> version).
ROOMS = {"engine.images": 1, "engine.store": 1, "engine.segmentation": 2, "engine.cohort": 3,
         "adaptation.cases": 1, "adaptation": 2}


def room_of(name: str) -> str | None:
    parts = name.split(".")
    for depth in (3, 2):
        room = ".".join(parts[1:depth])
        if room in ROOMS and len(parts) > depth - 1:
            return room
    return None


def test_rooms_inside_the_engine_and_adaptation_follow_the_data():
    """Catches e.g. the model store importing the segmenter, the segmenter importing cohort
    batches, or the case library importing the trainer."""
    for name, targets in graph().items():
        own = room_of(name)
        if own is None:
            continue
        for target in targets:
            other = room_of(target)
            if other is None or other == own or other.split(".")[0] != own.split(".")[0]:
                continue
            assert ROOMS[other] < ROOMS[own], f"{name} ({own}) imports {target} ({other})"
