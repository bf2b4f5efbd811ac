"""Each option is declared once, as a field of its options dataclass; every surface that offers it — the
command line, the service's request models, the Slicer panel — must offer exactly the fields the dataclass
says it does. `surface_differences` compares one dataclass with one surface; the tests run it on every real
surface, and on surfaces broken on purpose to show that it catches each kind of drift."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from citrusv_backend.cli import build_parser
from citrusv_backend.inference.options import ImageOptions
from citrusv_backend.model_source import ModelOptions
from citrusv_backend.option_fields import declared, flag_of, request_model
from citrusv_backend.refine.server_schemas import RefineRequest, SliceSettings
from citrusv_backend.server.config import ServeSettings, ServiceConfig
from citrusv_backend.server.schemas import ImageRequest, JobOptions
from citrusv_backend.volume.options import ReadOptions, RefineOptions, VolumeOptions

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Arguments of a command that no options dataclass declares: what the command works on and where it writes.
COMMAND_ARGUMENTS = {"help", "help_all", "out", "volume", "prompt", "image", "input_dir", "exit_with_parent",
                     "labelmap", "query", "label", "steps", "include", "exclude", "box"}


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def _cli_surface(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the first option string, for every option of a command."""
    return {action.dest: (action.option_strings or [action.dest])[0] for action in parser._actions}


def surface_differences(cls, cli: dict[str, str] | None = None, api: set[str] | None = None,
                        task: str | None = None, only: set[str] | None = None) -> list[str]:
    """What one surface offers that `cls` does not declare for it, and the reverse. `cli`: a command's
    options (dest -> flag), checked for the dataclass's command-line fields (those of `task`, or `only`);
    `api`: a request model's field names, checked for its API fields (or `only`)."""
    problems = []
    fields = {field.name: (field, spec) for field, spec, _ in declared(cls)}
    if cli is not None:
        wanted = {name for name, (_, spec) in fields.items() if spec.cli and (task is None or spec.tasks is None
                                                                             or task in spec.tasks)}
        wanted = wanted if only is None else wanted & only
        for name in sorted(wanted):
            if name not in cli:
                problems.append(f"{cls.__name__}.{name}: not on the command line")
            elif cli[name] != flag_of(*fields[name]):
                problems.append(f"{cls.__name__}.{name}: spelt {cli[name]} on the command line, declared "
                                f"{flag_of(*fields[name])}")
    if api is not None:
        wanted = {name for name, (_, spec) in fields.items() if spec.api}
        wanted = wanted if only is None else wanted & only
        problems += [f"{cls.__name__}.{name}: not in the request model" for name in sorted(wanted - api)]
        problems += [f"request field {name}: not declared by {cls.__name__}" for name in sorted(api - wanted)]
    return problems


def undeclared_arguments(parser: argparse.ArgumentParser, *classes) -> list[str]:
    """A command's options that neither an options dataclass nor COMMAND_ARGUMENTS explains."""
    known = {field.name for cls in classes for field in dataclasses.fields(cls)} | COMMAND_ARGUMENTS
    return sorted(f"{parser.prog}: {flag}" for dest, flag in _cli_surface(parser).items() if dest not in known)


def _slicer_options():
    path = ROOT / "CitrusVSlicer" / "CitrusVSlicerLib" / "backend_options.py"
    spec = importlib.util.spec_from_file_location("slicer_backend_options", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slicer_differences(slicer) -> list[str]:
    """The panel's choice lists, bounds and job option names against VolumeOptions."""
    fields = {field.name: spec for field, spec, _ in declared(VolumeOptions)}
    expected = {"MODES": fields["mode"].choices, "AXES": fields["axis"].choices, "WINDOWS": fields["window"].presets,
                "PIXEL_BUDGET_MIN": fields["max_pixels"].ge, "PIXEL_BUDGET_MAX": fields["max_pixels"].le,
                "JOB_OPTION_NAMES": tuple(name for name, spec in fields.items() if spec.api)}
    problems = [f"Slicer {name} = {getattr(slicer, name, None)!r}, the backend: {value!r}"
                for name, value in expected.items() if getattr(slicer, name, None) != value]
    problems += [f"Slicer sends {key} as {flag}, the backend declares {flag_of(*_field(VolumeOptions, key))}"
                 for key, flag in slicer.COMMAND_LINE_FLAGS.items() if flag != flag_of(*_field(VolumeOptions, key))]
    return problems


def _field(cls, name):
    return next((field, spec) for field, spec, _ in declared(cls) if field.name == name)


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_every_command_offers_the_declared_options(parser):
    problems = []
    for task in ("segment", "detect", "report"):
        command = _subparser(parser, task)
        problems += surface_differences(VolumeOptions, _cli_surface(command), task=task)
        problems += surface_differences(ReadOptions, _cli_surface(command))
        problems += undeclared_arguments(command, VolumeOptions, ReadOptions, ModelOptions)
    batch = _subparser(parser, "batch")
    from citrusv_backend.batch.options import BatchOptions

    problems += surface_differences(VolumeOptions, _cli_surface(batch)) + surface_differences(BatchOptions, _cli_surface(batch))
    problems += undeclared_arguments(batch, VolumeOptions, ReadOptions, BatchOptions, ModelOptions)
    serve = _subparser(parser, "serve")
    problems += surface_differences(ServiceConfig, _cli_surface(serve)) + surface_differences(ServeSettings, _cli_surface(serve))
    problems += undeclared_arguments(serve, ServiceConfig, ServeSettings, ModelOptions)
    infer = _subparser(parser, "infer")
    problems += surface_differences(ImageOptions, _cli_surface(infer))
    problems += undeclared_arguments(infer, ImageOptions, ModelOptions)
    refine = _subparser(parser, "refine")
    problems += surface_differences(RefineOptions, _cli_surface(refine))
    problems += surface_differences(VolumeOptions, _cli_surface(refine), only={"window", "axis", "slice_range", "max_pixels"})
    problems += undeclared_arguments(refine, VolumeOptions, RefineOptions, ModelOptions)
    for command in ("infer", "segment", "detect", "report", "refine", "batch", "serve", "demo"):
        problems += surface_differences(ModelOptions, _cli_surface(_subparser(parser, command)))
    assert problems == []


def test_every_request_model_offers_the_declared_fields():
    problems = surface_differences(VolumeOptions, api=set(JobOptions.model_fields))
    problems += surface_differences(ImageOptions, api=set(ImageRequest.model_fields) - {"image", "prompt", "mask_format"})
    problems += surface_differences(RefineOptions, api=set(RefineRequest.model_fields) - {"points", "box",
                                                                                           "expected_version"})
    problems += surface_differences(VolumeOptions, api=set(SliceSettings.model_fields),
                                    only={"axis", "window", "slice_range", "min_pixels", "max_pixels", "answer"})
    assert problems == []


def test_the_slicer_panel_offers_the_backend_choices():
    assert slicer_differences(_slicer_options()) == []
    source = (ROOT / "CitrusVSlicer" / "CitrusVSlicer.py").read_text(encoding="utf-8")
    for line in ("mode: Annotated[str, Choice(list(MODES))]", "window: Annotated[str, Choice(list(WINDOWS))]",
                 "axis: Annotated[str, Choice(list(AXES))]"):
        assert line in source, f"the panel's parameter node must take its choices from backend_options: {line}"


def test_a_request_still_says_plane_for_the_axis():
    """The slice axis was `plane` in requests once; it is accepted for a release (docs/http-api.md)."""
    assert JobOptions.model_validate({"plane": "coronal"}).to_volume_options().axis == "coronal"
    assert SliceSettings.model_validate({"plane": "sagittal"}).to_dataclass().axis == "sagittal"


# ---------------------------------------------------------------------------------------------- broken on purpose

@dataclasses.dataclass
class _Grown(VolumeOptions):
    """VolumeOptions with one more declared field that no surface has been given."""

    sharpness: float = dataclasses.field(default=1.0, metadata=dict(dataclasses.fields(VolumeOptions)[0].metadata))


def test_each_kind_of_drift_is_caught(parser):
    segment = _cli_surface(_subparser(parser, "segment"))
    # a field declared but not derived into a surface
    assert surface_differences(_Grown, segment, task="segment") == ["_Grown.sharpness: not on the command line"]
    assert surface_differences(_Grown, api=set(JobOptions.model_fields)) == ["_Grown.sharpness: not in the request model"]
    # a request field nobody declared (hand-written next to the derived ones)
    hand_written = set(JobOptions.model_fields) | {"sharpness"}
    assert surface_differences(VolumeOptions, api=hand_written) == ["request field sharpness: not declared by VolumeOptions"]
    # an option added by hand to a command, and one that went missing or is spelt differently
    extra = argparse.ArgumentParser(prog="citrusv segment", parents=[_subparser(parser, "segment")], add_help=False,
                                    conflict_handler="resolve")
    extra.add_argument("--sharpness", type=float)
    assert undeclared_arguments(extra, VolumeOptions, ReadOptions, ModelOptions) == ["citrusv segment: --sharpness"]
    missing = {dest: flag for dest, flag in segment.items() if dest != "mode"} | {"axis": "--plane"}
    assert surface_differences(VolumeOptions, missing, task="segment") == [
        "VolumeOptions.axis: spelt --plane on the command line, declared --axis",
        "VolumeOptions.mode: not on the command line"]
    # a Slicer choice list edited by hand
    slicer = _slicer_options()
    slicer.MODES = ("propagate", "per-slice")
    assert slicer_differences(slicer) == ["Slicer MODES = ('propagate', 'per-slice'), the backend: "
                                          "('propagate', 'per-slice', 'hybrid')"]
    # and a request model derived from the grown dataclass has the field: derivation, not copying
    assert "sharpness" in request_model(_Grown, "Grown").model_fields


def test_the_panel_asks_for_the_same_options_by_http_and_by_batch():
    """The panel's settings become a job's options (HTTP) and a `citrusv batch` command line (batch): both
    must give the backend the same VolumeOptions."""
    sys.path.insert(0, str(ROOT / "CitrusVSlicer"))
    from CitrusVSlicerLib.batch import batch_command
    from CitrusVSlicerLib.options import task_options

    from citrusv_backend.volume.arguments import volume_options

    options = task_options("hybrid", "lung", "coronal", "2:9", 65535)
    command = batch_command("py", "/in", "/out", "segment", "segment the liver", "tiny", "cpu", options)
    by_batch = volume_options(build_parser().parse_args(command[command.index("citrusv_backend.cli") + 1:]))
    by_http = JobOptions.model_validate(options).to_volume_options()
    assert by_batch == by_http
    assert (by_http.mode, by_http.window, by_http.axis, by_http.slice_range, by_http.max_pixels) == (
        "hybrid", "lung", "coronal", (2, 9), 65535)
    with pytest.raises(ValueError, match="Slice range: slice range 9:2"):
        task_options("hybrid", "lung", "coronal", "9:2", 0)
