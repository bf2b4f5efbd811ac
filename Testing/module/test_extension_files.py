"""Static checks of the Slicer extension's files: what the Slicer build and the ExtensionsIndex checks rely on.

No Slicer is needed: the CMake files, JSON entry, .ui XML, icon and module source are parsed as text.
A file missing from CitrusVSlicer/CMakeLists.txt is silently left out of the installed extension, and a widget
name or parameter name that drifts between the .ui and the code only fails inside Slicer, so both are
checked here.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from module_helpers import WIDGET_CLASS, widget_classes, widget_source

pytestmark = pytest.mark.unit

REPO_DIR = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "CitrusVSlicer"
MODULE_DIR = REPO_DIR / "CitrusVSlicer"
MODULE_NAME = "CitrusVSlicer"
TOP_CMAKE = REPO_DIR / "CMakeLists.txt"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
MODULE_SCRIPT = MODULE_DIR / f"{MODULE_NAME}.py"
MODULE_UI = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
MODULE_ICON = MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png"
INDEX_ENTRY = REPO_DIR / f"{EXTENSION_NAME}.json"
PARAMETER_NODE_CLASS = f"{MODULE_NAME}ParameterNode"
RAW_URL_PREFIX = "https://raw.githubusercontent.com/citrusv-slicer/SlicerCitrusV/main/"


# --- small CMake reader ---------------------------------------------------------------------------------


def cmake_code(path: Path) -> str:
    """The file's text without comments (a '#' outside a quoted string starts a comment)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        in_quotes = False
        for index, char in enumerate(line):
            if char == '"':
                in_quotes = not in_quotes
            elif char == "#" and not in_quotes:
                line = line[:index]
                break
        lines.append(line)
    return "\n".join(lines)


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command name in lower case, arguments) for every command call; quoted arguments are unquoted."""
    commands = []
    # Quoted arguments may hold parentheses, so they are matched as whole strings.
    call = re.compile(r'\b([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:"(?:[^"\\]|\\.)*"|[^()"])*)\)')
    for match in call.finditer(cmake_code(path)):
        arguments = [
            quoted if quoted or bare == "" else bare
            for quoted, bare in re.findall(r'"((?:[^"\\]|\\.)*)"|(\S+)', match.group(2))
        ]
        commands.append((match.group(1).lower(), arguments))
    return commands


def cmake_variables(path: Path) -> dict[str, list[str]]:
    """Values of every set(NAME values...) in the file, the last one winning as in CMake."""
    return {arguments[0]: arguments[1:] for name, arguments in cmake_commands(path) if name == "set" and arguments}


def resolve(value: str, variables: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        name = match.group(1)
        assert name in variables, f"${{{name}}} is used but never set"
        return variables[name]

    return re.sub(r"\$\{([A-Za-z0-9_]+)\}", substitute, value)


def module_cmake_listed_files() -> dict[str, set[str]]:
    """The module's MODULE_PYTHON_SCRIPTS and MODULE_PYTHON_RESOURCES, paths relative to CitrusVSlicer/."""
    variables = cmake_variables(MODULE_CMAKE)
    assert variables.get("MODULE_NAME") == [MODULE_NAME]
    scalars = {"MODULE_NAME": MODULE_NAME}
    return {
        key: {resolve(entry, scalars) for entry in variables.get(key, [])}
        for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES")
    }


# --- CMake: every file is listed and exists ---------------------------------------------------------------


def test_module_cmake_lists_every_python_file():
    listed_scripts = module_cmake_listed_files()["MODULE_PYTHON_SCRIPTS"]
    python_files = {
        path.relative_to(MODULE_DIR).as_posix()
        for path in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert f"{MODULE_NAME}.py" in python_files
    missing = sorted(python_files - listed_scripts)
    assert not missing, f"not in MODULE_PYTHON_SCRIPTS of {MODULE_CMAKE} (would not be installed): {missing}"


def test_module_cmake_lists_every_resource():
    listed_resources = module_cmake_listed_files()["MODULE_PYTHON_RESOURCES"]
    resource_files = {
        path.relative_to(MODULE_DIR).as_posix()
        for path in (MODULE_DIR / "Resources").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert resource_files, "CitrusVSlicer/Resources is empty"
    missing = sorted(resource_files - listed_resources)
    assert not missing, f"not in MODULE_PYTHON_RESOURCES of {MODULE_CMAKE} (would not be installed): {missing}"


def test_every_file_listed_in_module_cmake_exists():
    listed = module_cmake_listed_files()
    all_listed = listed["MODULE_PYTHON_SCRIPTS"] | listed["MODULE_PYTHON_RESOURCES"]
    assert {f"{MODULE_NAME}.py", f"Resources/UI/{MODULE_NAME}.ui", f"Resources/Icons/{MODULE_NAME}.png"} <= all_listed
    absent = sorted(entry for entry in all_listed if not (MODULE_DIR / entry).is_file())
    assert not absent, f"listed in {MODULE_CMAKE} but absent: {absent}"


def test_module_cmake_builds_scripted_module_with_tests():
    commands = cmake_commands(MODULE_CMAKE)
    build_calls = [arguments for name, arguments in commands if name == "slicermacrobuildscriptedmodule"]
    assert len(build_calls) == 1, "expected one slicerMacroBuildScriptedModule() call"
    arguments = build_calls[0]
    assert arguments[arguments.index("NAME") + 1] == "${MODULE_NAME}"
    assert arguments[arguments.index("SCRIPTS") + 1] == "${MODULE_PYTHON_SCRIPTS}"
    assert arguments[arguments.index("RESOURCES") + 1] == "${MODULE_PYTHON_RESOURCES}"
    assert "WITH_GENERIC_TESTS" in arguments
    unittests = [arguments for name, arguments in commands if name == "slicer_add_python_unittest"]
    assert ["SCRIPT", "${MODULE_NAME}.py"] in unittests, "the module's self-test is not registered with ctest"
    for subdirectory in (arguments[0] for name, arguments in commands if name == "add_subdirectory"):
        assert (MODULE_DIR / subdirectory / "CMakeLists.txt").is_file(), f"add_subdirectory({subdirectory}) has no CMakeLists.txt"


# --- top-level CMake and the ExtensionsIndex entry ---------------------------------------------------------


def test_project_name_matches_index_entry_and_module_is_added():
    commands = cmake_commands(TOP_CMAKE)
    projects = [arguments for name, arguments in commands if name == "project"]
    assert len(projects) == 1, "expected one project() call"
    # The ExtensionsIndex check requires project(<name>) == the JSON file's name.
    assert projects[0][0] == INDEX_ENTRY.stem == EXTENSION_NAME
    subdirectories = [arguments[0] for name, arguments in commands if name == "add_subdirectory"]
    assert MODULE_DIR.name in subdirectories
    for subdirectory in subdirectories:
        assert (REPO_DIR / subdirectory / "CMakeLists.txt").is_file(), f"add_subdirectory({subdirectory}) has no CMakeLists.txt"
    command_names = [name for name, _ in commands]
    assert command_names[0] == "cmake_minimum_required"
    for required in ("find_package", "include"):
        assert required in command_names
    includes = [arguments[0] for name, arguments in commands if name == "include"]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert ["Slicer", "REQUIRED"] in [arguments for name, arguments in commands if name == "find_package"]


def test_extension_metadata_is_complete():
    variables = cmake_variables(TOP_CMAKE)
    required = (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    )
    empty = [name for name in required if not " ".join(variables.get(name, [])).strip()]
    assert not empty, f"EXTENSION_* variables missing or empty in {TOP_CMAKE}: {empty}"
    # The model runs in its own Python environment, so the extension needs no other Slicer extension.
    assert variables["EXTENSION_DEPENDS"] == ["NA"]
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert variables["EXTENSION_HOMEPAGE"][0].startswith("https://github.com/citrusv-slicer/SlicerCitrusV")
    for url in variables["EXTENSION_ICONURL"] + variables["EXTENSION_SCREENSHOTURLS"]:
        assert url.startswith(RAW_URL_PREFIX), f"{url} is not a raw file URL in the extension's repository"
        assert url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), f"{url} is not an image"
    # The catalog icon is the module icon itself, so it cannot go stale.
    icon_path = variables["EXTENSION_ICONURL"][0].removeprefix(RAW_URL_PREFIX)
    assert (REPO_DIR / icon_path).resolve() == MODULE_ICON.resolve()


def test_index_entry_json():
    raw = INDEX_ENTRY.read_bytes()
    assert b"\r" not in raw, "the ExtensionsIndex requires LF line endings"
    entry = json.loads(raw)
    for key in ("$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_url", "tier"):
        assert key in entry, f"{INDEX_ENTRY.name} lacks {key}"
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == []
    assert entry["build_subdirectory"] == "."
    assert entry["scm_url"] == "https://github.com/citrusv-slicer/SlicerCitrusV.git"
    assert entry["tier"] in range(1, 6)
    # The category shown by the catalog comes from CMake; both must agree.
    assert cmake_variables(TOP_CMAKE)["EXTENSION_CATEGORY"] == [entry["category"]]


# --- resources -----------------------------------------------------------------------------------------------


def test_icon_is_128_pixel_png():
    header = MODULE_ICON.read_bytes()[:33]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    length, chunk_type = struct.unpack(">I4s", header[8:16])
    assert (length, chunk_type) == (13, b"IHDR")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", header[16:26])
    assert (width, height) == (128, 128)
    assert bit_depth == 8 and color_type == 6, "expected 8-bit RGBA"


def ui_root() -> ElementTree.Element:
    return ElementTree.parse(MODULE_UI).getroot()


def test_ui_file_has_qmrmlwidget_root_and_scene_connections():
    root = ui_root()
    top_widget = root.find("widget")
    assert top_widget is not None and top_widget.get("class") == "qMRMLWidget"
    custom_classes = {element.findtext("class") for element in root.iter("customwidget")}
    used_classes = {widget.get("class") for widget in root.iter("widget")}
    custom_used = {name for name in used_classes if name.startswith(("qMRML", "ctk", "qSlicer"))}
    assert custom_used <= custom_classes, f"<customwidgets> lacks {sorted(custom_used - custom_classes)}"
    # Every MRML widget gets the scene through the top-level widget's mrmlSceneChanged signal.
    scene_receivers = {
        connection.findtext("receiver")
        for connection in root.iter("connection")
        if connection.findtext("sender") == top_widget.get("name")
        and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml_widgets = {widget.get("name") for widget in root.iter("widget") if widget.get("class").startswith("qMRML")}
    mrml_widgets.discard(top_widget.get("name"))
    assert mrml_widgets, "the panel has no MRML widget"
    assert mrml_widgets <= scene_receivers, f"not connected to the scene: {sorted(mrml_widgets - scene_receivers)}"


def test_widget_names_used_in_code_exist_in_ui():
    ui_widget_names = {widget.get("name") for widget in ui_root().iter("widget")}
    used_names = set(re.findall(r"\bself\.ui\.([A-Za-z_][A-Za-z0-9_]*)", widget_source()))
    missing = sorted(used_names - ui_widget_names)
    assert not missing, f"the panel's code uses self.ui.<name> for widgets absent from {MODULE_UI.name}: {missing}"


def test_the_widget_inherits_every_panel_mixin_and_no_method_is_defined_twice():
    """The panel's sections live in CitrusVSlicerPanels/ (a package: Slicer takes only the module folder's own .py
    files for modules). A mixin the widget does not inherit would be dead code that the .ui checks still read, and a
    method defined in two of them would silently shadow the other."""
    classes = widget_classes()
    panels = {name for name in classes if name != WIDGET_CLASS}
    assert len(panels) >= 5, f"expected the panel's sections as mixins, found {sorted(panels)}"
    widget_bases = {ast.unparse(base) for base in classes[WIDGET_CLASS].bases}
    assert panels <= widget_bases, f"{WIDGET_CLASS} does not inherit {sorted(panels - widget_bases)}"
    defined: dict[str, list[str]] = {}
    for name, cls in classes.items():
        for node in cls.body:
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(name)
    twice = {method: owners for method, owners in defined.items() if len(owners) > 1}
    assert not twice, f"methods defined in more than one of the widget's classes: {twice}"


def parameter_node_fields() -> set[str]:
    tree = ast.parse(MODULE_SCRIPT.read_text(encoding="utf-8"))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == PARAMETER_NODE_CLASS]
    assert len(classes) == 1, f"{PARAMETER_NODE_CLASS} not defined at module level"
    decorators = {ast.unparse(decorator) for decorator in classes[0].decorator_list}
    assert decorators & {"parameterNodeWrapper", "slicer.parameterNodeWrapper.parameterNodeWrapper"}
    return {
        statement.target.id
        for statement in classes[0].body
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
    }


def test_ui_parameter_names_are_parameter_node_fields():
    fields = parameter_node_fields()
    bound_names = {
        prop.findtext("string")
        for prop in ui_root().iter("property")
        if prop.get("name") == "SlicerParameterName"
    }
    assert bound_names, f"no widget in {MODULE_UI.name} is bound to the parameter node"
    unknown = sorted(bound_names - fields)
    assert not unknown, f"SlicerParameterName values not declared in {PARAMETER_NODE_CLASS}: {unknown}"


# --- module source and license --------------------------------------------------------------------------------


def test_module_script_parses_and_defines_the_slicer_classes():
    tree = ast.parse(MODULE_SCRIPT.read_text(encoding="utf-8"), filename=str(MODULE_SCRIPT))
    class_bases = {
        node.name: {ast.unparse(base) for base in node.bases} for node in tree.body if isinstance(node, ast.ClassDef)
    }
    # Slicer finds these classes by name: <Module>, <Module>Widget, <Module>Logic, <Module>Test.
    expected = {
        MODULE_NAME: "ScriptedLoadableModule",
        f"{MODULE_NAME}Widget": "ScriptedLoadableModuleWidget",
        f"{MODULE_NAME}Logic": "ScriptedLoadableModuleLogic",
        f"{MODULE_NAME}Test": "ScriptedLoadableModuleTest",
    }
    for class_name, base in expected.items():
        assert base in class_bases.get(class_name, set()), f"{class_name}({base}) not defined"


def test_license_is_apache_2():
    text = (REPO_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # The complete text, not just the short header: all nine sections, the end marker and the appendix.
    assert "9. Accepting Warranty or Additional Liability." in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
