"""Options declared once. Each option set is a dataclass (`VolumeOptions`, `ImageOptions`, `ServiceConfig`,
`BatchOptions`...) whose fields carry their help, choices, bounds and command-line spelling as metadata
(`option(...)`), as vllm's `FrontendArgs` does. Everything else is derived from the fields:

* the argparse options of a command (`add_options`) and the values back from a parsed command line
  (`from_args`: a field a command does not offer keeps its default — no `getattr(args, name, default)`);
* the service's pydantic request models (`request_model`: types, `Literal` choices, bounds, descriptions, the
  old names a field still accepts, and the dataclass's own `check()` as the model's validator);
* the Slicer module's choice lists (bench/tools/generated_files.py writes them into the module's library).

A value's rule lives once, as the field's `parse` (command-line text -> value) and/or `check` (a value ->
itself, or ValueError): argparse calls both, pydantic calls `check`. Light: no torch, and pydantic only when a
request model is made.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import CitrusVError, InputError

OPTION_KEY = "citrusv_option"


@dataclass(frozen=True)
class Option:
    help: str
    choices: tuple | None = None
    ge: float | None = None             # inclusive bounds of a number
    le: float | None = None
    parse: Callable[[str], Any] | None = None   # command-line text -> value; ValueError / CitrusVError: a usage error
    check: Callable[[Any], Any] | None = None   # the value's rule on every surface: returns the value or raises ValueError
    flag: str | None = None             # the command-line spelling when not --name-with-dashes
    metavar: str | None = None
    cli: bool = True                    # offered on the command line
    api: bool = True                    # a field of the service's request models
    advanced: bool = False              # a research or tuning switch: listed by --help-all, under "advanced"
    tasks: tuple[str, ...] | None = None  # the volume tasks it concerns (None: every task)
    old_names: tuple[str, ...] = ()     # names the HTTP API still accepts (see docs/http-api.md)
    min_length: int | None = None       # the shortest and longest text a request may send
    max_length: int | None = None
    scale: float | None = None          # field value = command-line value x scale (e.g. MiB -> bytes)
    append: bool = False                # a repeatable option collecting a list
    negatable: bool = False             # a bool offered as --name / --no-name
    presets: tuple | None = None        # named values a panel offers (the field takes others too, e.g. CENTER,WIDTH)


def option(default: Any = None, help: str = "", *, default_factory: Callable[[], Any] | None = None,
           **spec) -> Any:
    """A dataclass field whose metadata declares the option (see `Option`)."""
    metadata = {OPTION_KEY: Option(help=help, **spec)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_as(owner: type, name: str, default: Any = dataclasses.MISSING, **changes) -> Any:
    """A field declared like `owner.name` (its help, bounds, rules), for an option two option sets share."""
    source = next(f for f in dataclasses.fields(owner) if f.name == name)
    spec = dataclasses.replace(source.metadata[OPTION_KEY], **changes)
    return dataclasses.field(default=source.default if default is dataclasses.MISSING else default,
                             metadata={OPTION_KEY: spec})


def spec_of(field: dataclasses.Field) -> Option | None:
    return field.metadata.get(OPTION_KEY)


def declared(cls: type, only: typing.Iterable[str] | None = None, surface: str | None = None,
             task: str | None = None) -> list[tuple[dataclasses.Field, Option, Any]]:
    """(field, its Option, its resolved type) for each declared option of `cls`, in declaration order; `surface`
    "cli" or "api" keeps those offered there, `task` those that concern that volume task."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else list(only)
    rows = []
    for field in dataclasses.fields(cls):
        spec = spec_of(field)
        if spec is None or (wanted is not None and field.name not in wanted):
            continue
        if surface is not None and not getattr(spec, surface):
            continue
        if task is not None and spec.tasks is not None and task not in spec.tasks:
            continue
        rows.append((field, spec, hints[field.name]))
    if wanted is not None:
        missing = set(wanted) - {field.name for field, _, _ in rows}
        if missing:
            raise KeyError(f"{cls.__name__} declares no option {sorted(missing)} here")
    return rows


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


# ---------------------------------------------------------------------------------------------- values

def _base_type(hint: Any) -> Any:
    """int | None -> int; tuple[int, int] | None -> tuple[int, int]."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(arguments) == 1:
        return arguments[0]
    return hint


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def bounds_text(spec: Option) -> str:
    if spec.ge is not None and spec.le is not None:
        return f"{spec.ge:,g} to {spec.le:,g}"
    if spec.ge is not None:
        return {0: "0 or more", 1: "a positive number"}.get(spec.ge, f"at least {spec.ge:,g}")
    return f"at most {spec.le:,g}"


def check_value(name: str, spec: Option, value: Any) -> Any:
    """The field's bounds and rule on one value (ValueError with a message that stands on its own)."""
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r}: give a finite number")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"unknown {name.replace('_', ' ')} {value!r}; use one of {', '.join(map(str, spec.choices))}")
    if (spec.ge is not None and value < spec.ge) or (spec.le is not None and value > spec.le):
        raise ValueError(f"{name.replace('_', ' ')} {value:g}: give {bounds_text(spec)}")
    return spec.check(value) if spec.check is not None else value


def check_fields(instance) -> None:
    """Every declared field's choices, bounds and rule, on options made in code (the command line and the
    request models check them as they parse): an InputError naming the field."""
    for field, spec, _ in declared(type(instance)):
        try:
            check_value(field.name, spec, getattr(instance, field.name))
        except (ValueError, CitrusVError) as error:
            raise InputError(str(error)) from None


def _argparse_type(name: str, spec: Option, base: Any) -> Callable[[str], Any]:
    convert = spec.parse or (base if base in (int, float) else str)

    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, CitrusVError) as error:
            if convert in (int, float):
                error = f"{text!r} is not {'an integer' if convert is int else 'a number'}"
            raise argparse.ArgumentTypeError(str(error)) from None
        try:
            return check_value(name, spec, value)
        except (ValueError, CitrusVError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name  # argparse names the type in its own messages
    return parse


# ---------------------------------------------------------------------------------------------- argparse

def flag_of(field: dataclasses.Field, spec: Option) -> str:
    return spec.flag or "--" + field.name.replace("_", "-")


def add_options(container, cls: type, only: typing.Iterable[str] | None = None, task: str | None = None,
                advanced=None, defaults: dict | None = None) -> None:
    """argparse options for the command-line fields of `cls` (`only` those, in that order; `task`: those that
    concern it) into `container`; the advanced ones into `advanced` (a group; default: `container`).
    `defaults` overrides a field's default for this command (e.g. `serve --max-new-tokens`)."""
    rows = declared(cls, only, "cli", task)
    if only is not None:
        rows.sort(key=lambda row: list(only).index(row[0].name))
    for field, spec, hint in rows:
        target = advanced if spec.advanced and advanced is not None else container
        base = float if spec.scale is not None else _base_type(hint)  # 1.5 MiB is a fine size
        default = (defaults or {}).get(field.name, default_of(field))
        if spec.scale is not None and default is not None:
            default = default / spec.scale
        help_text = spec.help
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if base is bool and (_optional(hint) or spec.negatable):
            kwargs |= {"action": argparse.BooleanOptionalAction, "default": default}
        elif base is bool:
            kwargs |= {"action": "store_false" if default else "store_true", "default": default}
        elif spec.append:
            kwargs |= {"action": "append", "default": [], "type": _argparse_type(field.name, spec, str)}
        else:
            kwargs |= {"default": default, "type": _argparse_type(field.name, spec, base)}
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
        if spec.metavar or spec.scale is not None:
            kwargs["metavar"] = spec.metavar or flag_of(field, spec).rsplit("-", 1)[-1].upper()  # --x-mb: MB
        target.add_argument(flag_of(field, spec), **kwargs)


def from_args(cls: type, args: argparse.Namespace, **given):
    """`cls` from a parsed command line: each command-line field the command offered, the rest their defaults
    (`given` wins over both)."""
    values = {}
    for field, spec, _ in declared(cls, surface="cli"):
        if field.name in given or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if spec.scale is not None and value is not None:
            value = type(default_of(field))(value * spec.scale) if default_of(field) is not None else value * spec.scale
        if spec.append:
            value = tuple(value)
        values[field.name] = value
    return cls(**(values | given))


# ---------------------------------------------------------------------------------------------- pydantic

def request_model(cls: type, name: str, only: typing.Iterable[str] | None = None, base=None, doc: str | None = None):
    """A pydantic model of the service's request with the API fields of `cls` (`only` those): the fields'
    types, choices as Literal, bounds, descriptions and old names; the dataclass's `check()` (cross-field rules)
    as the model's validator. `to_dataclass()` gives `cls` back, the other fields at their defaults."""
    from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, create_model, model_validator


    fields = {}
    for field, spec, hint in declared(cls, only, "api"):
        annotation = _base_type(hint)
        if spec.choices is not None:
            annotation = Literal[spec.choices]
        constraints = {key: getattr(spec, key) for key in ("ge", "le", "min_length", "max_length") if getattr(spec, key) is not None}
        if annotation is float:
            constraints["allow_inf_nan"] = False
        if spec.check is not None:
            annotation = typing.Annotated[annotation, AfterValidator(_pydantic_check(spec.check))]
        if _optional(hint):
            annotation = annotation | None
        extra = {}
        if spec.old_names:
            extra["validation_alias"] = AliasChoices(field.name, *spec.old_names)
        default = default_of(field)
        if isinstance(default, tuple) and annotation is not tuple and default == ():
            default = None
        fields[field.name] = (annotation, Field(default, description=spec.help, **constraints, **extra))

    def to_dataclass(self):
        return cls(**{key: getattr(self, key) for key in fields})

    def _checked(self):
        check = getattr(cls, "check", None)
        if check is not None:
            try:
                check(to_dataclass(self))
            except CitrusVError as error:
                raise ValueError(str(error)) from None
        return self

    base = base or type("Strict", (BaseModel,), {"model_config": ConfigDict(extra="forbid")})
    derived = type(f"{name}Base", (base,), {"__module__": cls.__module__, "to_dataclass": to_dataclass,
                                            "_checked": model_validator(mode="after")(_checked)})
    return create_model(name, __base__=derived, __doc__=doc or cls.__doc__, __module__=cls.__module__, **fields)


def _pydantic_check(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(value):
        try:
            return check(value)
        except CitrusVError as error:
            raise ValueError(str(error)) from None
    return run
