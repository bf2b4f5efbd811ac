"""The panel's .ui loaded by Qt itself (PyQt5 on Qt 5.15, the Qt of Slicer 5.8 and 5.10, offscreen), and every
property, signal signature and method the module's code uses on its widgets checked through Qt's meta-object
system (methods: through the bindings' C++ API, which is what PythonQt wraps too).

This checks Qt's side only: Slicer's own widget classes (qMRMLNodeComboBox, ctkCollapsibleButton, qMRMLWidget,
qSlicerMarkupsPlaceWidget) are loaded as their Qt base classes, so their own API is not checked here, and neither is
PythonQt's binding; the self-test inside a real Slicer (the GitHub Actions workflow) covers those.
"""
from __future__ import annotations

import ast
import io
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from module_helpers import widget_sources

pytestmark = pytest.mark.unit

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"
UI_PATH = MODULE_DIR / "Resources" / "UI" / "CitrusVSlicer.ui"
SOURCES = widget_sources()  # the module file and its panel mixins (CitrusVSlicerPanels/)
SOURCE = "\n".join(SOURCES.values())
# Slicer's classes -> the Qt class each one derives from (ctkCollapsibleButton is a QAbstractButton in CTK).
STAND_INS = {"qMRMLNodeComboBox": "QWidget", "qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QPushButton",
             "qSlicerMarkupsPlaceWidget": "QWidget"}


@pytest.fixture(scope="module")
def panel():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PyQt5.QtWidgets", reason="PyQt5 (the test extra) loads the .ui with Qt")
    from PyQt5 import uic

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["citrusv-ui-test"])
    tree = ET.parse(UI_PATH)
    custom = {}
    for widget in tree.iter("widget"):
        if widget.get("class") in STAND_INS:
            custom[widget.get("name")] = widget.get("class")
            widget.set("class", STAND_INS[widget.get("class")])
            for prop in list(widget.findall("property")):  # Slicer-only properties (nodeTypes, collapsed, ...)
                if prop.get("stdset") != "0" and prop.get("name") not in ("text", "toolTip", "enabled"):
                    widget.remove(prop)
    for section in ("customwidgets", "connections"):  # the connections are Slicer's (mrmlSceneChanged -> setMRMLScene)
        element = tree.getroot().find(section)
        if element is not None:
            tree.getroot().remove(element)
    text = io.StringIO(ET.tostring(tree.getroot(), encoding="unicode"))
    root = uic.loadUi(text)
    yield root, custom, app
    root.deleteLater()


class Uses(ast.NodeVisitor):
    """What the module's code does with `self.ui.<widget>`: reads, writes, calls, signal connections."""

    def __init__(self):
        self.reads, self.writes, self.calls, self.signals, self.signatures = set(), set(), set(), set(), set()

    @staticmethod
    def widget_member(node):
        """(widget, member) for `self.ui.WIDGET.MEMBER`, else None."""
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr != "ui" and \
                isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "ui":
            return node.value.attr, node.attr
        return None

    def visit_Call(self, node):
        target = self.widget_member(node.func)
        if target and target[1] == "connect" and node.args and isinstance(node.args[0], ast.Constant):
            self.signatures.add((target[0], node.args[0].value))
        elif target:
            self.calls.add(target)
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
            signal = self.widget_member(node.func.value)
            if signal:
                self.signals.add(signal)
        self.generic_visit(node)

    def visit_Assign(self, node):
        for target in node.targets:
            member = self.widget_member(target)
            if member:
                self.writes.add(member)
        self.generic_visit(node)

    def visit_Attribute(self, node):
        member = self.widget_member(node)
        if member and isinstance(node.ctx, ast.Load):
            self.reads.add(member)
        self.generic_visit(node)


def code_uses() -> Uses:
    uses = Uses()
    for path, text in SOURCES.items():
        uses.visit(ast.parse(text, filename=str(path)))
    uses.reads = {u for u in uses.reads if u not in uses.calls and u not in uses.signals and u[1] != "connect"}
    return uses


def find(root, name: str):
    from PyQt5 import QtCore

    if root.objectName() == name:
        return root
    found = root.findChild(QtCore.QObject, name)
    assert found is not None, f"{name} is not in the loaded .ui"
    return found


def test_the_ui_loads_and_every_property_the_code_sets_or_reads_exists(panel):
    root, custom, _ = panel
    uses = code_uses()
    assert len(uses.writes) > 15 and len(uses.reads) >= 3, "the code should use the panel's widgets"
    problems = []
    for widget_name, member in sorted(uses.writes | uses.reads):
        widget = find(root, widget_name)
        meta = widget.metaObject()
        index = meta.indexOfProperty(member)
        if index < 0:
            if widget_name in custom:
                continue  # Slicer's own API: not checkable here
            problems.append(f"{widget_name} ({meta.className()}) has no property {member!r}")
        elif (widget_name, member) in uses.writes and not meta.property(index).isWritable():
            problems.append(f"{widget_name}.{member} is read-only in Qt")
    assert not problems, problems


def test_every_signal_and_signature_the_code_connects_exists(panel):
    from PyQt5 import QtCore

    root, custom, _ = panel
    uses = code_uses()
    assert ("examplesComboBox", "activated(int)") in uses.signatures
    problems = []
    for widget_name, signature in sorted(uses.signatures):
        meta = find(root, widget_name).metaObject()
        normalized = QtCore.QMetaObject.normalizedSignature(signature).data().decode()
        index = meta.indexOfSignal(normalized)
        if index < 0 and widget_name not in custom:  # Slicer's own signals (currentNodeChanged(vtkMRMLNode*))
            problems.append(f"{widget_name} ({meta.className()}) has no signal {signature}")
    for widget_name, signal in sorted(uses.signals):
        meta = find(root, widget_name).metaObject()
        names = {bytes(meta.method(i).name()).decode() for i in range(meta.methodCount())
                 if meta.method(i).methodType() == QtCore.QMetaMethod.Signal}
        if signal not in names and widget_name not in custom:
            problems.append(f"{widget_name} ({meta.className()}) has no signal {signal!r}")
    assert not problems, problems


def test_every_method_the_code_calls_exists_on_the_qt_class(panel):
    root, custom, _ = panel
    uses = code_uses()
    problems = [f"{name}.{member}()" for name, member in sorted(uses.calls)
                if name not in custom and not callable(getattr(find(root, name), member, None))]
    assert not problems, problems


def test_the_timer_api_the_panel_relies_on():
    QtCore = pytest.importorskip("PyQt5.QtCore")
    timer = QtCore.QTimer()
    meta = timer.metaObject()
    assert meta.indexOfSignal("timeout()") >= 0 and meta.indexOfProperty("singleShot") >= 0
    for name in ("setSingleShot", "start", "stop"):
        assert callable(getattr(timer, name))
    assert "self.timer.setSingleShot(True)" in SOURCE and "self.timer.timeout.connect(self.onTimer)" in SOURCE
