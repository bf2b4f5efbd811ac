"""From a user's prompt to the targets to segment or detect: "segment the liver and the spleen" -> liver, spleen.

Each target is asked with the phrasing of the reference's data ("Please help segment the {target} in this
scan."; detection: the reference eval's "Locate the {target}, output its bbox coordinates using JSON format."),
so one prompt with several targets gives one segment per target. Coordination is read the way radiologists
write it:

* shared heads: "the left and right kidneys" -> left kidney, right kidney; "the upper and lower lobes of the
  left lung" -> upper lobe of the left lung, lower lobe of the left lung; "lung and liver lesions" -> lung
  lesions, liver lesions; a leading side applies to the rest ("left upper and lower lobes");
* shared modifiers before a part name: "the hepatic artery and vein" -> hepatic artery, hepatic vein;
* "both kidneys" / "bilateral lungs" -> left kidney, right kidney;
* compound names stay whole: "head and neck tumor", "portal vein and splenic vein" (a single BTCV label);
* a location phrase ("in the left and right lungs") qualifies its target and is not split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import InputError
from ...model.processor import IMAGE_TAG

# The reference's queries (MeCoVQA-G rows read by eval/eval_segmentation.py, projects/inference.py) start with
# "<image>\n": the image block, then a newline, then the question.
QUERY_TEMPLATE = "<image>\nPlease help segment the {target} in this scan."
# eval/eval_detection.py (bbox_format "json", the default), verbatim; `<image>` marks the image's position.
DETECT_TEMPLATE = "<image>\nLocate the {target}, output its bbox coordinates using JSON format."

_ACTION = r"(?:segment|find|locate|detect|outline|delineate|contour|mask|show|mark|identify|label|draw)"
_VERB = rf"(?:please\s+)?(?:(?:can|could|would)\s+you\s+)?(?:help\s+(?:me\s+)?)?(?:to\s+)?{_ACTION}(?:\s+and\s+{_ACTION})?"
_MASK_FOR = r"(?:please\s+)?(?:provide|give(?:\s+me)?|generate|create|produce|draw)\s+(?:a\s+|the\s+)?" \
            r"(?:masks?|segmentations?|contours?|outlines?)\s+(?:for|of)"
_LEAD = re.compile(rf"^\s*(?:{_MASK_FOR}|{_VERB})\s+(?:out\s+)?", re.IGNORECASE)
_TAIL = re.compile(r"\s+(?:in|on|from|within|of)\s+(?:this|the|these|each|that)\s+(?:given\s+)?"
                   r"(?:scan|image|volume|study|ct|cta|mri?|pet|series|slices?|exam|picture)\b.*$", re.IGNORECASE)
_TAIL_ALONE = re.compile(r"\s+(?:using|with|as)\s+(?:json|a\s+mask|masks?|bounding\s+box(?:es)?|boxes)\b.*$", re.IGNORECASE)
_SPLIT = re.compile(r"\s*(?:,\s*(?:and|&)\s+|,\s*|\s+and\s+|\s*&\s*|;\s*|\s+as\s+well\s+as\s+)", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:all\s+the|any\s+of\s+the|the|a|an|all|any)(?:\s+|$)", re.IGNORECASE)
_LOCATION = re.compile(r"\s+(?:in|of|within|involving|near|at|along|around|inside|on|from)\s+", re.IGNORECASE)
# "..., and the spleen": a new noun phrase (an article, then no side or position word) even after a location.
_NEW_PHRASE = re.compile(r"\s*,?\s+and\s+(?=(?:the|a|an)\s+(?!(?:left|right|upper|middle|lower|superior|inferior|"
                         r"anterior|posterior)\b))", re.IGNORECASE)

# Names that contain "and" but are one structure or one label.
COMPOUND_NAMES = ("head and neck", "portal vein and splenic vein", "ear, nose and throat", "ear nose and throat",
                  "hepatic and portal veins")
_COMPOUND_MARK = "\u2060"  # a word joiner stands in for " and " inside a compound while splitting

# Words that describe a position or side, never a structure on their own ("left and right kidneys").
MODIFIERS = {"left", "right", "upper", "middle", "lower", "superior", "inferior", "anterior", "posterior", "medial",
             "lateral", "internal", "external", "common", "proximal", "distal", "ascending", "descending",
             "transverse", "sigmoid", "main", "greater", "lesser", "frontal", "parietal", "temporal", "occipital",
             "central", "peripheral", "deep", "superficial", "first", "second", "third", "fourth", "cervical",
             "thoracic", "lumbar", "sacral"}
SIDES = {"left", "right"}
# Heads that need a modifier to name something ("the hepatic artery and vein").
PART_HEADS = {"vein", "veins", "artery", "arteries", "duct", "ducts", "lobe", "lobes", "nerve", "nerves", "gland",
              "glands", "cortex", "medulla", "ventricle", "ventricles", "atrium", "atria", "muscle", "muscles"}
# Findings that attach to an organ ("lung and liver lesions").
FINDING_HEADS = {"lesion", "lesions", "tumor", "tumors", "tumour", "tumours", "nodule", "nodules", "mass", "masses",
                 "metastasis", "metastases", "cyst", "cysts", "cancer", "cancers", "stone", "stones", "calculi"}
_IRREGULAR_SINGULAR = {"atria": "atrium", "ovaries": "ovary", "arteries": "artery", "femora": "femur",
                       "metastases": "metastasis", "masses": "mass", "calculi": "calculus", "vertebrae": "vertebra"}


@dataclass(frozen=True)
class Target:
    name: str    # what the segment is called, e.g. "left lung"
    query: str   # what the model is asked

    def detect_query(self) -> str:
        return DETECT_TEMPLATE.format(target=self.name)


def parse_targets(prompt: str) -> list[Target]:
    """Targets named in `prompt`; a prompt that is not a 'segment X' request is asked as it is."""
    # An `<image>` tag (the reference's query form) marks where the image goes, not a target: it is left out of
    # the names; a prompt asked as it is keeps it, and the processor puts the image there.
    text = prompt.replace(IMAGE_TAG, " ").strip().rstrip(".?!").strip() if isinstance(prompt, str) else ""
    if not text:
        raise InputError("the prompt is empty; say what to segment, e.g. 'segment the liver and the spleen'")
    if not _LEAD.match(text):
        return [Target(name=_short_name(text), query=prompt.strip())]
    names = target_names(_LEAD.sub("", text, count=1))
    if not names:
        raise InputError(f"no target found in {prompt!r}; say what to segment, e.g. 'segment the liver'")
    return [Target(name=name, query=QUERY_TEMPLATE.format(target=name)) for name in names]


def detection_targets(prompt: str) -> list[Target]:
    """Targets of a detection prompt: "detect the kidneys" or just "kidneys" (the template needs a name); a
    question ("Is there a nodule?") is asked as it is."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; say what to detect, e.g. 'the liver' or 'detect the kidneys'")
    text = prompt.strip().rstrip(".?!").strip()
    if not _LEAD.match(text) and (prompt.strip().endswith("?") or len(text.split()) > 6):
        return [Target(name=_short_name(text), query=prompt.strip())]   # a question, not a name: asked as it is
    names = target_names(_LEAD.sub("", text, count=1))
    if not names:
        raise InputError(f"no target found in {prompt!r}; say what to detect, e.g. 'the liver'")
    return [Target(name=name, query=DETECT_TEMPLATE.format(target=name)) for name in names]


def target_names(body: str) -> list[str]:
    """The structures named in a noun phrase list such as "the left and right kidneys and the spleen"."""
    body = _protect_compounds(_TAIL_ALONE.sub("", _TAIL.sub("", body.strip())))
    names: list[str] = []
    for phrase in _NEW_PHRASE.split(body):
        head_part, location = _split_location(phrase)
        conjuncts = [_ARTICLE.sub("", part).strip() for part in _SPLIT.split(head_part)]
        conjuncts = [part for part in conjuncts if part]
        distributed = _distribute(conjuncts, one_each=location.lower().startswith(" of "))
        if location and distributed:
            shared = len(conjuncts) == 1 or _shares_head(conjuncts)
            distributed = [f"{n}{location}" for n in distributed] if shared else distributed[:-1] + [distributed[-1] + location]
        names += distributed
    return list(dict.fromkeys(_restore_compounds(name) for name in names if name))


def _protect_compounds(text: str) -> str:
    for compound in COMPOUND_NAMES:
        pattern = re.compile(re.escape(compound).replace(r"\ ", r"\s+"), re.IGNORECASE)
        text = pattern.sub(lambda m: re.sub(r"\s+", _COMPOUND_MARK, m.group(0)).replace(",", "," + _COMPOUND_MARK), text)
    return text


def _restore_compounds(text: str) -> str:
    return text.replace("," + _COMPOUND_MARK + _COMPOUND_MARK, ", ").replace(_COMPOUND_MARK, " ")


def _split_location(text: str) -> tuple[str, str]:
    """'nodules in the left and right lungs' -> ('nodules', ' in the left and right lungs'): a location
    qualifies what comes before it and is not split."""
    match = _LOCATION.search(text)
    return (text[:match.start()], text[match.start():]) if match else (text, "")


def _words(text: str) -> list[str]:
    return text.split()


def _shares_head(conjuncts: list[str]) -> bool:
    return len(conjuncts) > 1 and all(_all_modifiers(c) or _is_bare_organ(c, conjuncts[-1]) for c in conjuncts[:-1])


def _all_modifiers(text: str) -> bool:
    return bool(_words(text)) and all(w.lower() in MODIFIERS for w in _words(text))


def _is_bare_organ(conjunct: str, last: str) -> bool:
    """'lung' in 'lung and liver lesions': one word, and the last conjunct is '<organ> <finding>'."""
    last_words = _words(last)
    return (len(_words(conjunct)) == 1 and len(last_words) == 2 and last_words[1].lower() in FINDING_HEADS
            and conjunct.lower() != last_words[0].lower() and conjunct.lower() not in FINDING_HEADS)


def _distribute(conjuncts: list[str], one_each: bool = False) -> list[str]:
    """Conjuncts -> names, sharing a head or a modifier where the phrase does. Plural heads become singular
    when each name means one structure: sides of a paired organ, or parts "of" one organ (`one_each`)."""
    if not conjuncts:
        return []
    if len(conjuncts) == 1:
        return _both_sides(conjuncts[0])
    last_words = _words(conjuncts[-1])
    if _shares_head(conjuncts):
        if not all(_all_modifiers(c) for c in conjuncts[:-1]):
            finding = last_words[-1]                                  # "lung and liver lesions"
            return [f"{c} {finding}" for c in conjuncts[:-1]] + [conjuncts[-1]]
        lead = 0
        while lead < len(last_words) - 1 and last_words[lead].lower() in MODIFIERS:
            lead += 1
        first_words = _words(conjuncts[0])
        side = first_words[0] if len(first_words) > 1 and first_words[0].lower() in SIDES else None
        modifiers = [_words(c) for c in conjuncts[:-1]] + [last_words[:lead]]
        sided = all(any(w.lower() in SIDES | {"middle"} for w in words) or side for words in modifiers)
        head_words = last_words[lead:]
        if one_each or sided:
            head_words = head_words[:-1] + [_singular(head_words[-1])]
        head = " ".join(head_words)
        return [_with_side(" ".join(words + [head]), side) for words in modifiers]
    first_words = _words(conjuncts[0])
    if len(first_words) >= 2 and all(len(_words(c)) == 1 and c.lower() in PART_HEADS for c in conjuncts[1:]):
        modifier = " ".join(first_words[:-1])                         # "the hepatic artery and vein"
        return [conjuncts[0]] + [f"{modifier} {c}" for c in conjuncts[1:]]
    return [name for c in conjuncts for name in _both_sides(c)]


def _with_side(name: str, side: str | None) -> str:
    if side is None or any(w.lower() in SIDES for w in _words(name)):
        return name
    return f"{side} {name}"


def _both_sides(name: str) -> list[str]:
    """'both kidneys' / 'bilateral lungs' -> left kidney, right kidney; anything else as it is."""
    match = re.match(r"^(?:both|bilateral)\s+(?:the\s+)?(.+)$", name, re.IGNORECASE)
    if not match:
        return [name]
    words = _words(match.group(1))
    head = " ".join(words[:-1] + [_singular(words[-1])])
    return [f"left {head}", f"right {head}"]


def _singular(word: str) -> str:
    lower = word.lower()
    if lower in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[lower]
    if lower.endswith("ies") and len(lower) > 4:
        return word[:-3] + "y"
    if lower.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if lower.endswith("s") and not lower.endswith(("ss", "us", "is", "as", "os")):
        return word[:-1]
    return word


def _short_name(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
