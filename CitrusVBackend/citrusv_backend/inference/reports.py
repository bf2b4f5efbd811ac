"""Parser for Citrus-V's chain-of-thought reports, and the language of their findings.

The format (docs/reference-model.md, "Answer formats"):
``<think> Step 1: ... <bbox>{"Part":"lung","bbox":[50, 68, 424, 326]}</bbox> ... </think>``
then ``<answer> FINDINGS: ... IMPRESSION: ... </answer>``. As for boxes (`parsing.py`), nothing here raises
on any input: what could not be read is listed in ``problems``. FINDINGS and IMPRESSION are split into
sentences (or numbered items), each with its laterality, location and negation.
Pure standard library on purpose: the Slicer side imports it too.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Iterator

# The report's <bbox> JSON is read with the same lenient reader as detection answers.
from .parsing import Box, _as_text, _box_from_candidate, _collapse_space, _drop_cut_tag, _scan_json, _ToDict

__all__ = ["Region", "ReportStep", "Finding", "ParsedReport", "parse_report", "parse_finding", "split_sentences",
           "split_items", "detect_laterality", "detect_location", "is_negated"]


@dataclass
class Region(_ToDict):
    """A ``<bbox>`` of a report: the anatomical part the model looked at, and where."""

    part: str
    box: Box
    step: int | None = None


@dataclass
class ReportStep(_ToDict):
    number: int | None
    text: str
    regions: list[Region] = field(default_factory=list)


@dataclass
class Finding(_ToDict):
    """One sentence (or numbered item) of the FINDINGS or IMPRESSION section."""

    text: str
    laterality: str | None = None  # "left", "right", "bilateral" or None
    location: str | None = None  # canonical anatomical term, e.g. "lung", "costophrenic angle"
    negated: bool = False  # "No pleural effusion.", "without ...", "no evidence of ..."


@dataclass
class ParsedReport(_ToDict):
    steps: list[ReportStep] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    findings_text: str | None = None  # None: no FINDINGS section; "": the heading with nothing after
    impression_text: str | None = None
    findings: list[Finding] = field(default_factory=list)
    impression: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Report answers: think / answer split
# --------------------------------------------------------------------------------------------------


def _tag_pattern(name: str, closing: bool) -> re.Pattern:
    slash = r"/\s*" if closing else ""
    return re.compile(rf"<\s*{slash}{name}\s*>", re.I)


_THINK_OPEN, _THINK_CLOSE = _tag_pattern("think", False), _tag_pattern("think", True)
_ANSWER_OPEN, _ANSWER_CLOSE = _tag_pattern("answer", False), _tag_pattern("answer", True)

_STEP_MARKER = re.compile(r"\bstep\s*(\d{1,3})\b\s*[:.)\-–]?", re.I)
_HEADING = re.compile(
    r"\b(?P<name>(?i:findings|impressions?))\s*\**\s*:\s*\**"  # "FINDINGS:", "Impression :", "**Findings:**"
    r"|\b(?P<caps>FINDINGS|IMPRESSIONS?)[ \t]*(?=\r?\n)"  # an all-caps heading on its own line
)


def parse_report(text: str) -> ParsedReport:
    """Steps, regions and FINDINGS / IMPRESSION of a report answer (with or without its tags)."""
    report = ParsedReport()
    text = _drop_cut_tag(_as_text(text, report.problems))
    think, answer = _split_think_and_answer(text, report.problems)
    region_numbers = itertools.count(1)
    report.steps = _parse_steps(think, region_numbers, report.problems)
    report.regions = [region for step in report.steps for region in step.regions]
    answer_regions, answer = _extract_regions(answer, None, region_numbers, report.problems)
    report.regions += answer_regions
    report.findings_text, report.impression_text = _split_sections(answer, report.problems)
    report.findings = _findings_of(report.findings_text)
    report.impression = _findings_of(report.impression_text)
    return report


def _split_think_and_answer(text: str, problems: list[str]) -> tuple[str, str]:
    answer_open = _ANSWER_OPEN.search(text)
    head = text[:answer_open.start()] if answer_open else text
    think, rest, had_think_tag = _take_think(head, answer_open is not None, problems)
    if answer_open:
        answer, untagged_think = _tag_body(text, answer_open, _ANSWER_CLOSE, "answer", problems), rest
    else:
        answer, untagged_think = _answer_from_untagged(rest)
    return (think if had_think_tag else untagged_think), answer


def _take_think(head: str, answer_follows: bool, problems: list[str]) -> tuple[str, str, bool]:
    """(think text, text after it, whether there was a <think> tag)."""
    think_open = _THINK_OPEN.search(head)
    if think_open is None:
        return "", head, False
    think_close = _THINK_CLOSE.search(head, think_open.end())
    if think_close is None:
        cause = "missing </think> before <answer>" if answer_follows else "answer cut off?"
        problems.append(f"<think> is not closed ({cause})")
        return head[think_open.end():], "", True
    return head[think_open.end():think_close.start()], head[think_close.end():], True


def _tag_body(text: str, opening: re.Match, closing: re.Pattern, name: str, problems: list[str]) -> str:
    close = closing.search(text, opening.end())
    if close is None:
        problems.append(f"<{name}> is not closed (answer cut off?)")
        return text[opening.end():]
    return text[opening.end():close.start()]


def _answer_from_untagged(text: str) -> tuple[str, str]:
    """(answer, reasoning) of a text without <answer>: the answer starts at the first heading."""
    heading = _HEADING.search(text)
    if heading is not None:
        return text[heading.start():], text[:heading.start()]
    if _STEP_MARKER.search(text):
        return "", text  # only reasoning, e.g. cut before the answer
    return text, ""


# --------------------------------------------------------------------------------------------------
# Report answers: steps and regions
# --------------------------------------------------------------------------------------------------

_BBOX_TAG = re.compile(
    r"<\s*bbox\s*>(?P<body>.*?)"
    r"(?:(?P<closed><\s*/\s*bbox\s*>)|(?=<\s*/?\s*(?:bbox|think|answer)\s*>)|\Z)",
    re.S | re.I,
)


def _parse_steps(think: str, region_numbers: Iterator[int], problems: list[str]) -> list[ReportStep]:
    steps = []
    for number, chunk in _step_chunks(think):
        regions, chunk_text = _extract_regions(chunk, number, region_numbers, problems)
        chunk_text = _collapse_space(chunk_text)
        if number is None and not chunk_text and not regions:
            continue  # nothing before "Step 1"
        steps.append(ReportStep(number, chunk_text, regions))
    return steps


def _step_chunks(think: str) -> list[tuple[int | None, str]]:
    """(step number, raw text) pieces; text before "Step 1" (or without steps) has number None."""
    markers = list(_STEP_MARKER.finditer(think))
    if not markers:
        return [(None, think)]
    chunks: list[tuple[int | None, str]] = [(None, think[:markers[0].start()])]
    ends = [marker.start() for marker in markers[1:]] + [len(think)]
    chunks += [(int(marker.group(1)), think[marker.end():end]) for marker, end in zip(markers, ends)]
    return chunks


def _extract_regions(
    text: str, step: int | None, region_numbers: Iterator[int], problems: list[str]
) -> tuple[list[Region], str]:
    """Regions of the <bbox> tags in ``text``, and the text without those tags."""
    regions = []
    for match in _BBOX_TAG.finditer(text):
        regions += _regions_of_tag(match, step, region_numbers, problems)
    return regions, _BBOX_TAG.sub(" ", text)


def _regions_of_tag(
    match: re.Match, step: int | None, region_numbers: Iterator[int], problems: list[str]
) -> list[Region]:
    scan = _scan_json(match.group("body"))
    if not scan.candidates:
        name = f"region {next(region_numbers)}"
        if match.group("closed") is None:
            problems.append(f"{name}: <bbox> cut off before its box (answer truncated?), skipped")
        else:
            problems.append(f"{name}: no box in <bbox>{_collapse_space(match.group('body'))}</bbox>")
        return []
    regions = []
    for candidate in scan.candidates:
        box = _box_from_candidate(candidate, f"region {next(region_numbers)}", problems)
        if box is not None:
            regions.append(Region(box.label or "", box, step))
    return regions


# --------------------------------------------------------------------------------------------------
# Report answers: FINDINGS / IMPRESSION
# --------------------------------------------------------------------------------------------------

_FULL_HEADINGS = ("FINDINGS", "IMPRESSIONS")
_LAST_WORD = re.compile(r"(?:^|\s)([A-Z]{3,})\s*\Z")


def _split_sections(answer: str, problems: list[str]) -> tuple[str | None, str | None]:
    findings_heading = _first_heading(answer, "F")
    impression_heading = _first_heading(answer, "I")
    if findings_heading is None and impression_heading is None:
        return _unheaded_answer(answer, problems), None
    if findings_heading is None:
        problems.append("no FINDINGS section")
    if impression_heading is None:
        problems.append("no IMPRESSION section (answer cut off?)")
    findings = _section(answer, findings_heading, impression_heading)
    impression = _section(answer, impression_heading, findings_heading)
    return findings, impression


def _unheaded_answer(answer: str, problems: list[str]) -> str | None:
    text = _clean_section(answer)
    if not text:
        problems.append("no FINDINGS or IMPRESSION: the answer is empty or missing (answer cut off?)")
        return None
    problems.append("no FINDINGS/IMPRESSION heading: the whole answer is taken as findings")
    return text


def _first_heading(answer: str, initial: str) -> re.Match | None:
    for match in _HEADING.finditer(answer):
        word = match.group("name") or match.group("caps")
        if word[0].upper() == initial:
            return match
    return None


def _section(answer: str, own: re.Match | None, other: re.Match | None) -> str | None:
    if own is None:
        return None
    end = other.start() if other is not None and other.start() > own.start() else len(answer)
    return _clean_section(answer[own.end():end])


def _clean_section(text: str) -> str:
    text = text.strip().strip("*").strip()
    return _drop_cut_heading(text)


def _drop_cut_heading(text: str) -> str:
    """Drops a heading cut by truncation at the end ("... is normal. IMPRESS")."""
    match = _LAST_WORD.search(text)
    if match and any(heading.startswith(match.group(1)) for heading in _FULL_HEADINGS):
        return text[:match.start()].rstrip()
    return text


def _findings_of(section: str | None) -> list[Finding]:
    if not section:
        return []
    return [parse_finding(sentence) for item in split_items(section) for sentence in split_sentences(item)]


# --------------------------------------------------------------------------------------------------
# Sentences and list items
# --------------------------------------------------------------------------------------------------

_NUMBERED_MARKER = re.compile(r"(?:\A|(?<=\s))\(?\d{1,2}[.)](?=\s)")
_NUMBERED_LIST_START = re.compile(r"\A\s*\(?1[.)]\s|\n\s*\(?\d{1,2}[.)]\s")
_BULLET_MARKER = re.compile(r"(?m)^[ \t]*[-•*][ \t]+")
# Sentence ends: punctuation before a space or the end; or "clear.Heart" when the model forgot the space.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|\Z)|(?<=[a-z]{2})\.(?=[A-Z][a-z])")
_ABBREVIATIONS = frozenset(
    {"approx", "appr", "e.g", "i.e", "vs", "cf", "dr", "fig", "incl", "mr", "mrs", "st"}
)


def split_items(text: str) -> list[str]:
    """Items of a numbered ("1. ... 2. ...") or bulleted list; the whole text when it is not a list."""
    if _NUMBERED_LIST_START.search(text):
        pieces = _NUMBERED_MARKER.split(text)
    elif _BULLET_MARKER.search(text):
        pieces = _BULLET_MARKER.split(text)
    else:
        pieces = [text]
    return [_collapse_space(piece) for piece in pieces if piece.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``; keeps "3.5 cm", "approx. 2 cm" and "e.g. the" inside their sentence."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if _ends_with_abbreviation(text[start:match.start()]) or _next_is_lowercase(text, match.end()):
            continue
        sentences.append(text[start:match.end()])
        start = match.end()
    sentences.append(text[start:])
    return [_collapse_space(sentence) for sentence in sentences if sentence.strip()]


def _ends_with_abbreviation(text: str) -> bool:
    words = text.split()
    return bool(words) and words[-1].lstrip("(").lower() in _ABBREVIATIONS


def _next_is_lowercase(text: str, position: int) -> bool:
    rest = text[position:].lstrip()
    return bool(rest) and rest[0].islower()


# --------------------------------------------------------------------------------------------------
# Finding attributes: laterality, location, negation
# --------------------------------------------------------------------------------------------------

_BILATERAL = re.compile(r"\b(?:bilateral(?:ly)?|both|bibasilar|bibasal)\b", re.I)
# "L"/"R" only as capital single letters, and not "L-spine" or "L1" (a vertebra).
_LEFT = re.compile(r"(?i:\b(?:left|lt)\b)|\bL\b(?![-/'])")
_RIGHT = re.compile(r"(?i:\b(?:right|rt)\b)|\bR\b(?![-/'])")

_NEGATION = re.compile(
    r"\b(?:no|not|without|negative\s+for|free\s+of|absence\s+of|absent|none)\b", re.I
)
# Phrases with a negation word that do not deny the finding ("effusion cannot be excluded").
_NOT_A_NEGATION = re.compile(
    r"\b(?:can\s*not|could\s+not|not)(?:\s+be)?\s+(?:excluded|ruled\s+out)"
    r"|\bno\s+(?:significant\s+|interval\s+)?change\b",
    re.I,
)

_LOCATION_TERMS: tuple[tuple[str, str], ...] = (
    ("costophrenic angle", r"costophrenic(?:\s+(?:angles?|recess(?:es)?|sulc[iu]s?))?|cp\s+angles?"),
    ("cardiac silhouette", r"cardiac\s+silhouette"),
    ("cardiomediastinal silhouette", r"cardiomediastinal(?:\s+(?:silhouette|contours?))?"),
    ("heart", r"hearts?|cardiac|cardiomegaly"),
    ("lung", r"lungs?|pulmonary|(?:upper|middle|lower)\s+lobes?|lingula|lung\s+fields?"),
    ("pleura", r"pleura[el]?|pneumothora(?:x|ces)"),
    ("mediastinum", r"mediastin(?:um|al)"),
    ("hilum", r"hil(?:um|a|ar)|perihilar"),
    ("diaphragm", r"(?:hemi)?diaphragms?|diaphragmatic"),
    ("trachea", r"tracheal?"),
    ("aorta", r"aort(?:a|ic)"),
    ("spine", r"spine|spinal|vertebrae?|vertebral"),
    ("rib", r"ribs?"),
    ("clavicle", r"clavicles?|clavicular"),
    ("sternum", r"stern(?:um|al)"),
    ("shoulder", r"shoulders?"),
    ("bones", r"bony\s+thorax|osseous\s+structures?|bones?|bony|osseous|skeletal"),
    ("soft tissue", r"soft[\s-]+tissues?"),
    ("liver", r"liver|hepatic"),
    ("gallbladder", r"gall\s*bladder"),
    ("spleen", r"spleen|splenic"),
    ("pancreas", r"pancrea(?:s|tic)"),
    ("kidney", r"kidneys?|renal"),
    ("adrenal gland", r"adrenals?(?:\s+glands?)?"),
    ("bladder", r"(?:urinary\s+)?bladder"),
    ("stomach", r"stomach|gastric"),
    ("bowel", r"bowels?|intestin(?:e|es|al)|colon|colonic"),
    ("esophagus", r"o?esophag(?:us|eal)"),
    ("brain", r"brain|cerebral|cerebrum"),
    ("thyroid", r"thyroid"),
    ("breast", r"breasts?"),
    ("abdomen", r"abdomen|abdominal"),
    ("pelvis", r"pelvis|pelvic"),
)
_LOCATIONS = tuple((name, re.compile(rf"\b(?:{pattern})\b", re.I)) for name, pattern in _LOCATION_TERMS)


def detect_laterality(text: str) -> str | None:
    """"left", "right", "bilateral" (both sides, or "both"/"bilateral") or None; whole words only."""
    if _BILATERAL.search(text):
        return "bilateral"
    left, right = bool(_LEFT.search(text)), bool(_RIGHT.search(text))
    if left and right:
        return "bilateral"
    return "left" if left else "right" if right else None


def detect_location(text: str) -> str | None:
    """The canonical name of the first anatomical term in ``text`` (the longest one at a tie)."""
    best: tuple[int, int, str] | None = None
    for name, pattern in _LOCATIONS:
        match = pattern.search(text)
        if match and (best is None or (match.start(), -len(match.group())) < best[:2]):
            best = (match.start(), -len(match.group()), name)
    return best[2] if best else None


def is_negated(text: str) -> bool:
    """Whether the sentence denies its finding ("No pleural effusion", "without", "no evidence of")."""
    return bool(_NEGATION.search(_NOT_A_NEGATION.sub(" ", text)))


def parse_finding(sentence: str) -> Finding:
    text = _collapse_space(sentence)
    return Finding(text, detect_laterality(text), detect_location(text), is_negated(text))
