"""The Slicer extension packaging: ExtensionsIndex entry, CMake metadata, module build lists, icons.

The CMake files are checked twice: statically (always), and by configuring them with CMake
against a stand-in for Slicer's CMake package that records what the extension declares (when
CMake and a C++ compiler are available).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LymphNodeDGST"
GITHUB = "https://github.com/lymphnode-dgst/SlicerLymphNodeDGST"
RAW_FILES = "https://raw.githubusercontent.com/lymphnode-dgst/SlicerLymphNodeDGST/main/"
WIDGET_FILES = {"LymphNodeDGST.py", "Resources/UI/LymphNodeDGST.ui"}  # written with the widget

# Properties the ExtensionsIndex catalog schema v1.0.1 allows ("additionalProperties": false).
CATALOG_PROPERTIES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


def _catalog_entry() -> dict:
    return json.loads((REPO / "Resources" / "LymphNodeDGST.json").read_text())


def _cmake_sets(path: Path) -> dict[str, str]:
    """`set(NAME "value")` / `set(NAME value)` pairs of a CMake file (comments ignored)."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    return {
        match.group(1): match.group(2) if match.group(2) is not None else match.group(3).strip()
        for match in re.finditer(r'\bset\(\s*(\w+)\s+(?:"([^"]*)"|([^)]*))\)', text)
    }


def test_extensions_index_entry_follows_the_catalog_schema():
    entry = _catalog_entry()
    assert entry["$schema"] == (
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
        "slicer-extension-catalog-entry-schema-v1.0.1.json#"
    )
    assert CATALOG_REQUIRED <= set(entry)
    assert set(entry) <= set(CATALOG_PROPERTIES), set(entry) - set(CATALOG_PROPERTIES)
    for key, value in entry.items():
        assert isinstance(value, CATALOG_PROPERTIES[key]), key
    assert entry["tier"] in (1, 3, 5)
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"] == f"{GITHUB}.git"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["build_subdirectory"] == "."


def test_extension_cmake_metadata_is_complete_and_consistent():
    text = (REPO / "CMakeLists.txt").read_text()
    sets = _cmake_sets(REPO / "CMakeLists.txt")
    entry = _catalog_entry()
    # Slicer 5.10's extension template asks 3.20.6...3.22.6 and SlicerConfig.cmake refuses an older
    # minimum; catches the 3.16.3...3.19.7 this file once carried from an older template.
    minimum = re.search(r"cmake_minimum_required\(VERSION (\d+)\.(\d+)\.(\d+)\.\.\.(\d+)\.(\d+)\.(\d+) FATAL_ERROR\)", text)
    assert minimum, "cmake_minimum_required(VERSION min...max FATAL_ERROR) as in Slicer's template"
    assert tuple(map(int, minimum.groups()[:3])) >= (3, 20, 6)
    assert re.search(r"\bproject\(LymphNodeDGST\)", text)

    assert sets["EXTENSION_HOMEPAGE"] == GITHUB
    assert entry["scm_url"].removesuffix(".git") == sets["EXTENSION_HOMEPAGE"]
    assert sets["EXTENSION_CATEGORY"] == entry["category"]
    assert sets["EXTENSION_CONTRIBUTORS"].strip()
    description = sets["EXTENSION_DESCRIPTION"]
    assert "lymph" in description.lower() and "DGST" in description
    assert "5.10" in description  # users must learn the minimum Slicer version before installing
    assert sets["EXTENSION_ICONURL"] == RAW_FILES + "LymphNodeDGST.png"
    assert sets["EXTENSION_SCREENSHOTURLS"].startswith(RAW_FILES)
    assert sets["EXTENSION_DEPENDS"].split(";") == entry["build_dependencies"] == ["PyTorch"]

    calls = re.findall(r"^\s*(\w+)\(", re.sub(r"#[^\n]*", "", text), flags=re.MULTILINE)
    expected_order = ["find_package", "include", "add_subdirectory", "include", "include"]
    structural = [call for call in calls if call in {"find_package", "include", "add_subdirectory"}]
    assert structural == expected_order
    assert "find_package(Slicer REQUIRED)" in text
    assert "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(LymphNodeDGST)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text


def test_module_cmake_builds_a_scripted_module_with_generic_tests():
    text = re.sub(r"#[^\n]*", "", (MODULE_DIR / "CMakeLists.txt").read_text())
    assert _cmake_sets(MODULE_DIR / "CMakeLists.txt")["MODULE_NAME"] == "LymphNodeDGST"
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.DOTALL)
    assert call, "slicerMacroBuildScriptedModule(...) not called"
    words = call.group(1).split()
    assert words[:2] == ["NAME", "${MODULE_NAME}"]
    assert "WITH_GENERIC_TESTS" in words
    assert "SCRIPTS" in words and "RESOURCES" in words
    unittest = r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)"
    assert re.search(rf"if\(BUILD_TESTING\).*{unittest}.*endif\(\)", text, flags=re.DOTALL)


def test_icons_are_128_pixel_pngs():
    module_icon = MODULE_DIR / "Resources" / "Icons" / "LymphNodeDGST.png"
    for path in (REPO / "LymphNodeDGST.png", module_icon):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path
            colours = image.convert("RGBA").getcolors(maxcolors=128 * 128)
            assert len(colours) > 50, f"{path} looks blank"


def test_screenshot_urls_point_at_pictures_in_this_repository():
    """Catches a screenshot URL naming a file that does not exist (ExtensionsIndex's
    scripts/check_description_files.py validate_image_url downloads each one and wants an image)."""
    urls = _cmake_sets(REPO / "CMakeLists.txt")["EXTENSION_SCREENSHOTURLS"].split()
    assert urls
    for url in urls:
        assert url.startswith(RAW_FILES) and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif"))
        local = REPO / url.removeprefix(RAW_FILES)
        assert local.is_file(), f"{url}: no {local.relative_to(REPO)}"
        with Image.open(local) as image:
            assert image.format == "PNG" and image.width >= 600 and local.stat().st_size < 300_000


def test_apache_license_at_the_root_and_as_spdx_in_pyproject():
    """Catches a missing root LICENSE (ExtensionsIndex's check_license_file looks for LICENSE,
    LICENSE.txt, COPYING, ... in the repository root) and pyproject's deprecated license table."""
    import tomllib

    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


# --- configuring the CMake files for real ----------------------------------------------------

_FAKE_SLICER_CONFIG = """
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/CPack.cmake")
"""
# Same argument signatures as Slicer's macros; they record instead of building.
_FAKE_USE_SLICER = """
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY
    "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
  endif()
  file(APPEND "${LNDGST_RECORD}" "module_name=${MY_NAME}\\n")
  file(APPEND "${LNDGST_RECORD}" "module_dir=${CMAKE_CURRENT_SOURCE_DIR}\\n")
  file(APPEND "${LNDGST_RECORD}" "generic_tests=${MY_WITH_GENERIC_TESTS}\\n")
  foreach(script ${MY_SCRIPTS})
    file(APPEND "${LNDGST_RECORD}" "script=${script}\\n")
  endforeach()
  foreach(resource ${MY_RESOURCES})
    file(APPEND "${LNDGST_RECORD}" "resource=${resource}\\n")
  endforeach()
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;SLICER_ARGS" "" ${ARGN})
  file(APPEND "${LNDGST_RECORD}" "unittest=${MY_SCRIPT}\\n")
endfunction()
"""
_FAKE_GENERATE_CONFIG = """
foreach(name HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  file(APPEND "${LNDGST_RECORD}" "EXTENSION_${name}=${EXTENSION_${name}}\\n")
endforeach()
"""


def _configure_with_fake_slicer(tmp_path: Path) -> dict[str, list[str]]:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if not any(shutil.which(compiler) for compiler in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler: project() cannot be configured")
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(_FAKE_SLICER_CONFIG)
    (fake / "UseSlicer.cmake").write_text(_FAKE_USE_SLICER)
    (fake / "GenerateConfig.cmake").write_text(_FAKE_GENERATE_CONFIG)
    (fake / "CPack.cmake").write_text("")
    record = tmp_path / "record.txt"
    result = subprocess.run(
        [
            "cmake", "-S", str(REPO), "-B", str(tmp_path / "build"),
            f"-DSlicer_DIR={fake}", f"-DLNDGST_RECORD={record}", "-DBUILD_TESTING=ON",
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    recorded: dict[str, list[str]] = {}
    for line in record.read_text().splitlines():
        key, _, value = line.partition("=")
        recorded.setdefault(key, []).append(value)
    return recorded


@pytest.fixture(scope="session")  # not module: xdist interleaves modules (re-ran it)
def configured(tmp_path_factory) -> dict[str, list[str]]:
    return _configure_with_fake_slicer(tmp_path_factory.mktemp("cmake"))


def test_cmake_configures_and_declares_the_extension(configured):
    assert configured["EXTENSION_HOMEPAGE"] == [GITHUB]
    assert configured["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert configured["EXTENSION_ICONURL"] == [RAW_FILES + "LymphNodeDGST.png"]
    assert configured["EXTENSION_CATEGORY"] == ["Segmentation"]
    for name in ("CONTRIBUTORS", "DESCRIPTION", "SCREENSHOTURLS"):
        assert configured[f"EXTENSION_{name}"][0], name
    assert configured["module_name"] == ["LymphNodeDGST"]
    assert Path(configured["module_dir"][0]) == MODULE_DIR
    assert configured["generic_tests"] == ["TRUE"]
    assert configured["unittest"] == ["LymphNodeDGST.py"]


def test_module_ships_the_whole_core_package_and_its_resources(configured):
    scripts, resources = configured["script"], configured["resource"]
    core = sorted(
        path.relative_to(MODULE_DIR).as_posix()
        for path in (MODULE_DIR / "LymphNodeDGSTLib").rglob("*.py")
    )
    assert "LymphNodeDGSTLib/__init__.py" in core and "LymphNodeDGSTLib/slicer_bridge/mrml.py" in core
    assert sorted(s for s in scripts if s.startswith("LymphNodeDGSTLib/")) == core
    assert "LymphNodeDGST.py" in scripts
    assert "Resources/Icons/LymphNodeDGST.png" in resources
    assert "Resources/UI/LymphNodeDGST.ui" in resources
    missing = [
        name for name in scripts + resources
        if name not in WIDGET_FILES and not (MODULE_DIR / name).is_file()
    ]
    assert not missing, f"listed in the module CMakeLists but absent: {missing}"


def test_widget_files_are_listed_and_exist(configured):
    listed = set(configured["script"] + configured["resource"])
    assert WIDGET_FILES <= listed
    present = {name for name in WIDGET_FILES if (MODULE_DIR / name).is_file()}
    if not present:
        pytest.skip(f"the module widget is not written yet: {sorted(WIDGET_FILES)}")
    assert present == WIDGET_FILES, f"absent: {sorted(WIDGET_FILES - present)}"
