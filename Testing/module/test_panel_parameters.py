"""The panel's parameters: its bounded numbers match what the backend accepts, and the displays that a closed scene
leaves without a parameter node do not read it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from module_helpers import widget_method

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CitrusVSlicer"
MODULE_SOURCE = (MODULE_DIR / "CitrusVSlicer.py").read_text()


# ---------------------------------------------------------------------------------------------- bounded numbers

def _parameter_fields() -> dict:
    tree = ast.parse(MODULE_SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CitrusVSlicerParameterNode")
    return {s.target.id: s.annotation for s in cls.body if isinstance(s, ast.AnnAssign)}


def _connector_range(annotation) -> tuple:
    """The spin box range Slicer's connector sets (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py,
    QSliderOrSpinBoxToIntConnector): WithinRange's bounds, else -2**31 .. 2**31-1."""
    from CitrusVSlicerLib import options

    for call in ast.walk(annotation):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "WithinRange":
            values = [eval(compile(ast.Expression(arg), "<range>", "eval"), vars(options)) for arg in call.args]
            return tuple(values)
    return (-(2**31), 2**31 - 1)


@pytest.mark.unit
def test_every_bound_number_has_the_range_the_backend_accepts():
    from citrusv_backend.server.schemas import JobOptions
    from CitrusVSlicerLib.options import PIXEL_BUDGET_MIN, task_options

    ui = MODULE_DIR / "Resources" / "UI" / "CitrusVSlicer.ui"
    import xml.etree.ElementTree as ET

    numbers = {name: annotation for name, annotation in _parameter_fields().items()
               if ast.unparse(annotation).split("[")[-1].split(",")[0].strip("] ") in ("int", "float")
               or ast.unparse(annotation) in ("int", "float")}
    assert "maxPixels" in numbers
    for name, annotation in numbers.items():
        low, high = _connector_range(annotation)
        assert (low, high) != (-(2**31), 2**31 - 1), f"{name} has no WithinRange: the spin box gets +-2**31"
        widget = next(w for w in ET.parse(ui).iter("widget") if any(
            p.get("name") == "SlicerParameterName" and p.find("string").text == name for p in w.findall("property")))
        ui_range = tuple(int(widget.find(f"property[@name='{b}']/number").text) for b in ("minimum", "maximum"))
        assert ui_range == (low, high), f"{name}: the .ui says {ui_range}, the annotation {(low, high)}"
    low, high = _connector_range(numbers["maxPixels"])
    assert task_options("propagate", "auto", "axial", "", 0) == {"mode": "propagate", "window": "auto", "axis": "axial"}
    for value in (PIXEL_BUDGET_MIN, high):
        JobOptions.model_validate(task_options("propagate", "auto", "axial", "", value))  # the backend takes it
    for value in (1, PIXEL_BUDGET_MIN - 1, -5, high + 1):
        with pytest.raises(ValueError, match="Max pixels"):
            task_options("propagate", "auto", "axial", "", value)


# ---------------------------------------------------------------------------------------------- displays without a parameter node

@pytest.mark.unit
def test_batch_updates_and_the_remote_status_line_need_no_parameter_node_and_are_not_overwritten():
    """Read from the module source (the widget needs Slicer's Qt): the batch's display reads the run itself, never
    the parameter node that a closed scene leaves None; the remote status line is only written by Test connection."""
    for name in ("updateBatch", "onOpenBatchResults"):
        assert "_parameterNode" not in ast.unparse(widget_method(name)), name
    status = widget_method("updateBackendStatus")
    first = status.body[0] if not isinstance(status.body[0], ast.Expr) else status.body[1]
    assert ast.unparse(first).startswith("if self.isRemote():") and isinstance(first.body[0], ast.Return)
