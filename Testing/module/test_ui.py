"""The panel's .ui file against the code: widgets the code uses exist with the right class, and every
parameter-node setting is bound to a widget (read statically: the module file needs Slicer to import)."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from module_helpers import widget_source

pytestmark = pytest.mark.unit

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"
UI = ET.parse(MODULE_DIR / "Resources" / "UI" / "CitrusVSlicer.ui")
SOURCE = widget_source()  # the module file and its panel mixins (CitrusVSlicerPanels/)
TREE = ast.parse((MODULE_DIR / "CitrusVSlicer.py").read_text())

# Naming convention of the panel: the suffix says the class (and the code relies on that class's API).
CLASS_BY_SUFFIX = {"Button": "QPushButton", "ComboBox": "QComboBox", "LineEdit": "QLineEdit", "Selector": "qMRMLNodeComboBox",
                   "ProgressBar": "QProgressBar", "TextEdit": "QPlainTextEdit", "Label": "QLabel", "CheckBox": "QCheckBox",
                   "SpinBox": "QSpinBox", "CollapsibleButton": "ctkCollapsibleButton"}


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


def used_widget_names() -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", SOURCE))


def parameter_fields() -> list[str]:
    cls = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "CitrusVSlicerParameterNode")
    return [stmt.target.id for stmt in cls.body if isinstance(stmt, ast.AnnAssign)]


def bound_parameters() -> dict[str, str]:
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    return bound


def suffix_class(name: str) -> str | None:
    for suffix in sorted(CLASS_BY_SUFFIX, key=len, reverse=True):
        if name.endswith(suffix):
            return CLASS_BY_SUFFIX[suffix]
    return None


def test_every_widget_the_code_uses_exists_with_the_right_class():
    widgets = ui_widgets()
    used = used_widget_names()
    assert len(used) > 25, "the panel code should use the .ui widgets"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in code but absent from the .ui: {missing}"
    wrong = {name: widgets[name] for name in used if suffix_class(name) and widgets[name] != suffix_class(name)}
    assert not wrong, f"widgets whose class does not match their name: {wrong}"


def test_every_setting_is_bound_to_a_widget_and_vice_versa():
    fields = parameter_fields()
    bound = bound_parameters()
    assert len(fields) >= 15
    assert sorted(set(fields) - set(bound)) == [], "settings without a widget"
    assert sorted(set(bound) - set(fields)) == [], "widgets bound to unknown settings"


def test_bound_widget_classes_fit_the_setting_types():
    cls = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "CitrusVSlicerParameterNode")
    types = {stmt.target.id: ast.unparse(stmt.annotation) for stmt in cls.body if isinstance(stmt, ast.AnnAssign)}
    bound = bound_parameters()
    for name, annotation in types.items():
        widget = bound[name]
        if annotation.startswith("vtkMRML"):
            assert widget == "qMRMLNodeComboBox", name
        elif "Choice" in annotation:
            assert widget == "QComboBox", name
        elif annotation == "bool":
            assert widget == "QCheckBox", name
        elif annotation == "int" or annotation.startswith("Annotated[int"):
            assert widget == "QSpinBox", name
        else:
            assert widget == "QLineEdit", name


def test_choices_match_the_combo_box_items():
    """A Choice value missing from its combo box would make the binding silently fall back."""
    from CitrusVSlicerLib import backend_options

    cls = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "CitrusVSlicerParameterNode")
    module_constants = {n.targets[0].id: ast.literal_eval(n.value) for n in TREE.body
                        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
                        and isinstance(n.value, (ast.List, ast.Constant))}
    bound_widgets = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound_widgets[prop.find("string").text] = widget
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and "Choice" in ast.unparse(stmt.annotation):
            choice = next(n for n in ast.walk(stmt.annotation) if isinstance(n, ast.Call))
            argument = choice.args[0]
            # Literal lists, the module's constants, or the generated backend_options' (the backend's choices)
            namespace = {**vars(backend_options), **module_constants}
            values = eval(compile(ast.Expression(argument), "<choice>", "eval"), namespace)
            items = [i.find("property/string").text for i in bound_widgets[stmt.target.id].findall("item")]
            assert items == list(values), stmt.target.id
