"""Parsers for Citrus-V's detection and segmentation answers: boxes and [SEG] tokens.

The formats (docs/reference-model.md, "Answer formats"):

* detection: JSON in a ```json fenced block, ``[{"bbox_2d": [x1, y1, x2, y2], "label": "heart"}]``, in
  absolute pixels of the Qwen-resized image; or the legacy Qwen form
  ``<|object_ref_start|>heart<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``;
* segmentation: one ``[SEG]`` token per mask.
Reports (``<think>``/``<answer>``) are parsed in `reports.py`, which reuses the lenient JSON reader here.

Model text is untrusted: max_tokens cuts it anywhere, its JSON is only JSON-like, formats get mixed.
So no parser here raises on any input: each returns what it could read and lists, in ``problems``,
what it could not (human-readable, e.g. "box 2: expected 4 numbers, got 3").
Pure standard library on purpose: the Slicer side imports it too.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Box", "ParsedBoxes", "parse_boxes", "scale_boxes", "count_seg_tokens"]


# --------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers, ready for ``json.dumps``."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class Box(_ToDict):
    """An axis-aligned box in pixels; corners are reordered so that x1 <= x2 and y1 <= y2."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None

    def __post_init__(self) -> None:
        self.x1, self.x2 = sorted((float(self.x1), float(self.x2)))
        self.y1, self.y2 = sorted((float(self.y1), float(self.y2)))


@dataclass
class ParsedBoxes(_ToDict):
    boxes: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _as_text(text: Any, problems: list[str]) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    if text is not None:
        problems.append(f"expected the answer as text, got {type(text).__name__}")
    return ""


def _to_float(value: Any) -> float | None:
    """A finite float from a number or a numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _collapse_space(text: str) -> str:
    return " ".join(text.split())


# A tag cut by the end of the answer ("...</thi", "<bb"): drop it so it does not leak into the text.
_CUT_TAG = re.compile(r"<\s*/?\s*[A-Za-z_|]*\Z")


def _drop_cut_tag(text: str) -> str:
    return _CUT_TAG.sub("", text)


# --------------------------------------------------------------------------------------------------
# Lenient JSON reading
# --------------------------------------------------------------------------------------------------


class _Partial:
    """Marks a container that the end of the text cut off."""


class _PartialList(list, _Partial):
    pass


class _PartialDict(dict, _Partial):
    pass


class _EndOfText(Exception):
    """The text ended inside a scalar (a string or a bare word)."""


class _JsonSyntaxError(Exception):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


_SPACE = re.compile(r"\s*")
_BARE_TOKEN = re.compile(r"""[^,:\[\]{}"']+""")
_STRING_CLOSERS = frozenset(",:]}")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
_MAX_DEPTH = 32
_BARE_CONSTANTS = {"true": True, "false": False, "null": None, "none": None}


class _LenientJsonReader:
    """Reads one JSON-like value the way LLMs write it: single quotes, bare words, trailing or missing
    commas, NaN. At the end of the text it returns the containers read so far as _Partial* instead of
    failing, so that a cut answer keeps every object completed before the cut."""

    def __init__(self, text: str, position: int) -> None:
        self.text = text
        self.position = position
        self.depth = 0

    def read_value(self) -> Any:
        char = self._next_char()
        if char is None:
            raise _EndOfText
        if char in "{[":
            return self._read_container(char)
        if char in "\"'":
            return self._read_string()
        return self._read_bare()

    def _next_char(self) -> str | None:
        self.position = _SPACE.match(self.text, self.position).end()
        return self.text[self.position] if self.position < len(self.text) else None

    def _read_container(self, char: str) -> Any:
        # Bounded depth: "[[[[..." in a long answer must not reach Python's recursion limit.
        if self.depth >= _MAX_DEPTH:
            raise _JsonSyntaxError("nested too deeply", self.position)
        self.depth += 1
        value = self._read_object() if char == "{" else self._read_array()
        self.depth -= 1
        return value

    def _read_array(self) -> list:
        self.position += 1
        items: list = []
        while True:
            char = self._next_char()
            if char is None:
                return _PartialList(items)
            if char in ",]":
                self.position += 1
                if char == "]":
                    return items
                continue
            try:
                item = self.read_value()
            except _EndOfText:
                return _PartialList(items)
            items.append(item)
            if isinstance(item, _Partial):
                return _PartialList(items)

    def _read_object(self) -> dict:
        self.position += 1
        members: dict = {}
        while True:
            char = self._next_char()
            if char is None:
                return _PartialDict(members)
            if char in ",}":
                self.position += 1
                if char == "}":
                    return members
                continue
            try:
                key = self._read_key()
                if self._next_char() is None:
                    return _PartialDict(members)
                if self.text[self.position] != ":":
                    raise _JsonSyntaxError(f"expected ':' after key {key!r}", self.position)
                self.position += 1
                value = self.read_value()
            except _EndOfText:
                return _PartialDict(members)
            members[key] = value
            if isinstance(value, _Partial):
                return _PartialDict(members)

    def _read_key(self) -> str:
        if self.text[self.position] in "\"'":
            return self._read_string()
        value = self._read_bare()
        return str(value)

    def _read_string(self) -> str:
        quote = self.text[self.position]
        self.position += 1
        chars: list[str] = []
        while self.position < len(self.text):
            char = self.text[self.position]
            self.position += 1
            if char == "\\":
                chars.append(self._read_escape())
            elif char == quote and self._quote_closes_string():
                return "".join(chars)
            elif char == "\n":
                # JSON strings hold no raw newline: this quote was prose ("can't"). Failing here keeps
                # the retries of _scan_json linear in the line length instead of the text length.
                raise _JsonSyntaxError("unterminated string", self.position - 1)
            else:
                chars.append(char)
        raise _EndOfText

    def _quote_closes_string(self) -> bool:
        # A quote followed by more words is an apostrophe ('patient's heart'), not the string's end.
        after = _SPACE.match(self.text, self.position).end()
        return after >= len(self.text) or self.text[after] in _STRING_CLOSERS

    def _read_escape(self) -> str:
        if self.position >= len(self.text):
            raise _EndOfText
        char = self.text[self.position]
        self.position += 1
        if char != "u":
            return _ESCAPES.get(char, char)
        digits = self.text[self.position:self.position + 4]
        if len(digits) < 4:
            raise _EndOfText
        try:
            decoded = chr(int(digits, 16))
        except ValueError:
            return "u"
        self.position += 4
        return decoded

    def _read_bare(self) -> Any:
        match = _BARE_TOKEN.match(self.text, self.position)
        if match is None:
            raise _JsonSyntaxError(f"unexpected {self.text[self.position]!r}", self.position)
        if match.end() >= len(self.text):
            raise _EndOfText  # a number at the very end may have lost digits
        self.position = match.end()
        return _bare_value(match.group().strip())


def _bare_value(token: str) -> Any:
    """true/false/null, a number (NaN and Infinity included), or the word itself as a string."""
    if token.lower() in _BARE_CONSTANTS:
        return _BARE_CONSTANTS[token.lower()]
    try:
        return float(token)
    except ValueError:
        return token


# --------------------------------------------------------------------------------------------------
# From JSON values to box candidates
# --------------------------------------------------------------------------------------------------

_BOX_KEYS = ("bbox_2d", "bbox", "box", "bbox2d", "bounding_box", "box_2d")
_LABEL_KEYS = ("label", "part", "name", "category", "class")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class _Candidate:
    """Something that was meant to be one box, before validation."""

    coordinates: Any  # list or string of coordinates; None when cut off before them
    label: Any = None
    cut_off: bool = False


@dataclass
class _JsonScan:
    candidates: list[_Candidate] = field(default_factory=list)
    cut_off: bool = False  # the JSON ran into the end of the text
    syntax_errors: list[str] = field(default_factory=list)


def _box_candidates(value: Any) -> list[_Candidate]:
    if isinstance(value, dict):
        return _candidates_in_object(value)
    if isinstance(value, list):
        if _looks_like_coordinates(value):
            return [_Candidate(list(value), None, isinstance(value, _Partial))]
        return [candidate for item in value for candidate in _box_candidates(item)]
    return []


def _candidates_in_object(members: dict) -> list[_Candidate]:
    by_key = {str(key).strip().lower(): value for key, value in members.items()}
    box_key = next((key for key in _BOX_KEYS if key in by_key), None)
    cut_off = isinstance(members, _Partial)
    if box_key is not None:
        return [_Candidate(by_key[box_key], _first_label(by_key), cut_off)]
    nested = [candidate for value in members.values() for candidate in _box_candidates(value)]
    if not nested and cut_off:
        return [_Candidate(None, None, True)]  # cut before its coordinates: still a lost box
    return nested


def _first_label(by_key: dict) -> str | None:
    for key in _LABEL_KEYS:
        value = by_key.get(key)
        if value is not None and not isinstance(value, (list, dict)):
            text = str(value).strip()
            if text:
                return text
    return None


def _looks_like_coordinates(items: list) -> bool:
    """A bare list of numbers, e.g. [x1, y1, x2, y2] (but not ["SEG"], which is prose in brackets)."""
    scalars = all(not isinstance(item, (list, dict)) for item in items)
    numeric = any(_to_float(item) is not None or isinstance(item, float) for item in items)
    return bool(items) and scalars and numeric


_CONTAINER_START = re.compile(r"[\[{]")
_RETRY_BUDGET_PER_CHAR = 4
_MALFORMED = object()


def _scan_json(text: str) -> _JsonScan:
    """Box candidates in every JSON-like container of ``text``, left to right. A malformed container is
    retried from its inner containers so that one bad object does not hide the good ones."""
    scan = _JsonScan()
    position = 0
    # Retries re-read text; the budget keeps pathological answers ("['[a' [a' ...") from going quadratic.
    budget = _RETRY_BUDGET_PER_CHAR * len(text) + 4096
    while (match := _CONTAINER_START.search(text, position)) is not None:
        start = match.start()
        if budget < 0:
            scan.syntax_errors.append(f"gave up reading JSON at character {start}: too malformed")
            break
        value, end = _read_json_at(text, start, scan)
        budget -= end - start
        found = [] if value is _MALFORMED else _box_candidates(value)
        partial = isinstance(value, _Partial)
        if value is _MALFORMED or (partial and not found):
            scan.cut_off |= partial  # a partial without boxes may be a stray bracket or quote in prose
            position = start + 1  # so look inside it
            continue
        scan.candidates.extend(found)
        if partial:
            scan.cut_off = True
            break
        position = end
    return scan


def _read_json_at(text: str, start: int, scan: _JsonScan) -> tuple[Any, int]:
    """The value that starts at ``start`` and where it ends; _MALFORMED (noted in scan) if unreadable."""
    reader = _LenientJsonReader(text, start)
    try:
        return reader.read_value(), reader.position
    except _JsonSyntaxError as error:
        _note_syntax_error(scan, text, start, error)
        return _MALFORMED, reader.position


def _note_syntax_error(scan: _JsonScan, text: str, start: int, error: _JsonSyntaxError) -> None:
    # Report only errors in JSON that was about boxes, once per position (inner retries fail there too).
    message = f"malformed JSON at character {error.position}: {error}"
    if "box" in text[start:error.position + 1].lower() and message not in scan.syntax_errors:
        scan.syntax_errors.append(message)


def _box_from_candidate(candidate: _Candidate, name: str, problems: list[str]) -> Box | None:
    """Validates one candidate; ``name`` ("box 2", "region 1") prefixes its problems."""
    if candidate.cut_off:
        problems.append(f"{name}: cut off before it was complete (answer truncated?), skipped")
        return None
    values = _coordinate_values(candidate.coordinates)
    if values is None:
        kind = type(candidate.coordinates).__name__
        problems.append(f"{name}: coordinates should be a list of 4 numbers, got {kind}, skipped")
        return None
    if len(values) != 4:
        problems.append(f"{name}: expected 4 numbers, got {len(values)}, skipped")
        return None
    numbers = [_to_float(value) for value in values]
    for value, number in zip(values, numbers):
        if number is None:
            problems.append(f"{name}: coordinate {value!r} is not a finite number, skipped")
            return None
    label = None if candidate.label is None else str(candidate.label).strip() or None
    return Box(*numbers, label=label)  # type: ignore[arg-type]


def _coordinate_values(coordinates: Any) -> list | None:
    if isinstance(coordinates, str):
        return _NUMBER.findall(coordinates)  # "10, 20, 30, 40" or "(10,20),(30,40)"
    if not isinstance(coordinates, list):
        return None
    if coordinates and all(isinstance(pair, list) and len(pair) == 2 for pair in coordinates):
        return [value for pair in coordinates for value in pair]  # [[x1, y1], [x2, y2]]
    return coordinates


# --------------------------------------------------------------------------------------------------
# Detection answers
# --------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*(?P<body>.*?)(?:```|\Z)", re.S)

# Ref text runs to its end token, to the next special token or to the end of a cut answer.
_LEGACY_TOKEN = re.compile(
    r"<\|object_ref_start\|>(?P<ref>.*?)(?:<\|object_ref_end\|>|(?=<\|)|\Z)"
    r"|<\|box_start\|>(?P<box>.*?)(?:(?P<closed><\|box_end\|>)|(?=<\|)|\Z)",
    re.S,
)


def parse_boxes(text: str) -> ParsedBoxes:
    """Boxes of a detection answer, in the model's resized-image pixels (see ``scale_boxes``).

    Reads the fenced (or bare) JSON form and the legacy ``<|box_start|>`` form, in any mix. Boxes that
    cannot be trusted (wrong arity, non-finite numbers, cut by truncation) are skipped with a problem.
    """
    result = ParsedBoxes()
    text = _as_text(text, result.problems)
    numbering = itertools.count(1)
    legacy, remaining_text = _parse_legacy_boxes(text)
    json_scans = [_scan_json(segment) for segment in _json_segments(remaining_text)]
    candidates = legacy + [candidate for scan in json_scans for candidate in scan.candidates]
    for candidate in candidates:
        box = _box_from_candidate(candidate, f"box {next(numbering)}", result.problems)
        if box is not None:
            result.boxes.append(box)
    for scan in json_scans:
        result.problems.extend(scan.syntax_errors)
    if any(scan.cut_off for scan in json_scans) and not any(c.cut_off for c in candidates):
        result.problems.append("the JSON is cut off (answer truncated?)")
    return result


def _json_segments(text: str) -> list[str]:
    """The bodies of the fenced blocks, or the whole text when there is no fence."""
    bodies = [match.group("body") for match in _FENCE.finditer(text)]
    return bodies if bodies else [text]


def _parse_legacy_boxes(text: str) -> tuple[list[_Candidate], str]:
    """Candidates of the ``<|box_start|>`` form, and the text with those tokens removed."""
    candidates: list[_Candidate] = []
    label: str | None = None
    for match in _LEGACY_TOKEN.finditer(text):
        if match.group("ref") is not None:
            label = match.group("ref").strip() or None  # names every box up to the next ref
        else:
            candidates.append(_legacy_candidate(match, label))
    return candidates, _LEGACY_TOKEN.sub(" ", text)


def _legacy_candidate(match: re.Match, label: str | None) -> _Candidate:
    body = _drop_cut_tag(match.group("box"))  # "(398,470)<|box_e": the numbers are whole
    # Without <|box_end|>, trust the numbers only if the last pair was closed: "(30,4" may be "(30,45)".
    complete = match.group("closed") is not None or body.rstrip().endswith((")", "]"))
    return _Candidate(body, label, cut_off=not complete)


def scale_boxes(
    boxes: list[Box], resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> list[Box]:
    """Boxes from resized-image pixels to original-image pixels, clipped to [0, W] x [0, H].

    x scales by W_orig / W_resized and y by H_orig / H_resized (Qwen's resize does not keep the aspect
    ratio exactly). Returns new boxes; raises ValueError on a non-positive size (a caller bug, not model
    text).
    """
    resized_h, resized_w = _positive_size(resized_hw, "resized_hw")
    original_h, original_w = _positive_size(original_hw, "original_hw")
    scale_x, scale_y = original_w / resized_w, original_h / resized_h
    return [
        Box(
            _clip(box.x1 * scale_x, original_w),
            _clip(box.y1 * scale_y, original_h),
            _clip(box.x2 * scale_x, original_w),
            _clip(box.y2 * scale_y, original_h),
            label=box.label,
        )
        for box in boxes
    ]


def _positive_size(size_hw: tuple[int, int], name: str) -> tuple[float, float]:
    height, width = (float(value) for value in size_hw)
    if not (height > 0 and width > 0 and math.isfinite(height) and math.isfinite(width)):
        raise ValueError(f"{name} must be two positive sizes (height, width), got {size_hw!r}")
    return height, width


def _clip(value: float, upper: float) -> float:
    return min(max(value, 0.0), upper)


def count_seg_tokens(text: str, seg_token: str = "[SEG]") -> int:
    """How many masks the answer announces (one per ``[SEG]``; exact, case-sensitive match)."""
    if not isinstance(text, str) or not seg_token:
        return 0
    return text.count(seg_token)
