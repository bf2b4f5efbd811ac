"""Coded meaning of a segment name for DICOM: category, type and laterality modifier (SNOMED CT).

The codes are DICOM's own context groups as pydicom ships them: CID 7151 (anatomical structures), CID 7159
(lesions and other abnormal structures) and CID 7166 (tissue types). "left lung" is type Lung with the
modifier Left, as Slicer's terminologies and dcmqi code it. A name that none of them holds is coded
Tissue / Tissue (Slicer's default for a new segment); its label still says what it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Abnormal structures first: CID 7151 also lists a few of them (Nodule) as anatomy.
CATEGORIES = ((codes.cid7159, codes.SCT.MorphologicallyAbnormalStructure), (codes.cid7151, codes.SCT.AnatomicalStructure),
              (codes.cid7166, codes.SCT.Tissue))
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right, "bilateral": codes.SCT.RightAndLeft,
              "both": codes.SCT.RightAndLeft}
SYNONYMS = {"tumour": "neoplasm", "tumor": "neoplasm", "tumours": "neoplasm", "tumors": "neoplasm", "masses": "mass"}
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class SegmentCodes:
    category: Code
    type: Code
    modifier: Code | None = None     # laterality
    anatomic: bool = False           # the type is an anatomical structure (a finding site)

    def slicer_terminology(self) -> str:
        """The same codes as Slicer writes them in a segment's terminology tag."""
        def text(code):
            return f"{code.scheme_designator}^{code.value}^{code.meaning}" if code else "^^"
        return (f"Segmentation category and type - DICOM master list~{text(self.category)}~{text(self.type)}~"
                f"{text(self.modifier)}~Anatomic codes - DICOM master list~^^~^^")


def _keyword(words: list[str]) -> str:
    return "".join(word.capitalize() for word in words)


def _lookup(words: list[str]) -> SegmentCodes | None:
    candidates = [words, [SYNONYMS.get(w, w) for w in words]]
    if words and words[-1].endswith("s"):
        candidates.append(words[:-1] + [words[-1][:-1]])  # "kidneys" -> Kidney
    for candidate in candidates:
        keyword = _keyword(candidate)
        for group, category in CATEGORIES:
            if keyword in group.dir():
                code = getattr(group, keyword)
                return SegmentCodes(category, code, anatomic=category == codes.SCT.AnatomicalStructure)
    return None


def segment_codes(name: str) -> SegmentCodes:
    words = _WORD.findall(name.lower())
    modifier = None
    if words and words[0] in LATERALITY:
        modifier, words = LATERALITY[words[0]], words[1:]
    found = _lookup(words)
    if found is None and len(words) > 1:  # "spiculated nodule" -> Nodule, "lesion in the left lobe" -> Lesion
        phrases = [words[a:a + n] for n in range(len(words) - 1, 0, -1) for a in range(len(words) - n + 1)]
        found = next((hit for hit in map(_lookup, phrases) if hit), None)
    if found is None:
        return SegmentCodes(codes.SCT.Tissue, codes.SCT.Tissue, modifier)
    return SegmentCodes(found.category, found.type, modifier, found.anatomic)
