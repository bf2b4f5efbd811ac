"""From a user's prompt to the targets to segment: "segment the liver and the spleen" -> liver, spleen.

Each target is asked with the phrasing of the reference's segmentation data ("Please help segment the
{target} in this scan."), so one prompt with several targets gives one segment per target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from ..model.processor import IMAGE_TAG

QUERY_TEMPLATE = "Please help segment the {target} in this scan."
_VERB = r"(?:please\s+)?(?:help\s+(?:me\s+)?)?(?:segment|find|locate|detect|outline|delineate|contour|mask|show|mark|identify)"
_LEAD = re.compile(rf"^\s*{_VERB}\s+(?:out\s+)?", re.IGNORECASE)
_TAIL = re.compile(r"\s+(?:in|on|from|within)\s+(?:this|the|these|each)\s+(?:scan|image|volume|study|ct|mri?|pet|series|slices?)\b.*$",
                   re.IGNORECASE)
_SPLIT = re.compile(r"\s*(?:,\s*(?:and\s+)?|\s+and\s+|\s*&\s*|;\s*)", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:the|a|an|all|any)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    name: str    # what the segment is called, e.g. "left lung"
    query: str   # what the model is asked


def parse_targets(prompt: str) -> list[Target]:
    """Targets named in `prompt`; a prompt that is not a 'segment X' request is asked as it is."""
    # An `<image>` tag (the reference's query form) marks where the image goes, not a target: it is left out of
    # the names; a prompt asked as it is keeps it, and the processor puts the image there.
    text = prompt.replace(IMAGE_TAG, " ").strip().rstrip(".?!").strip() if isinstance(prompt, str) else ""
    if not text:
        raise InputError("the prompt is empty; say what to segment, e.g. 'segment the liver and the spleen'")
    if not _LEAD.match(text):
        return [Target(name=_short_name(text), query=prompt.strip())]
    body = _TAIL.sub("", _LEAD.sub("", text, count=1))
    names = [_ARTICLE.sub("", part).strip() for part in _SPLIT.split(body)]
    names = [name for name in names if name]
    if not names:
        raise InputError(f"no target found in {prompt!r}; say what to segment, e.g. 'segment the liver'")
    unique = list(dict.fromkeys(names))
    return [Target(name=name, query=QUERY_TEMPLATE.format(target=name)) for name in unique]


def _short_name(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
