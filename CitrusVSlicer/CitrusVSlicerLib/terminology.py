"""Segment names -> Slicer terminology entries, as Slicer's own anatomy list codes them.

Slicer's "3D Slicer General Anatomy list" (Modules/Loadable/Terminologies/Resources/
SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json, v5.8.1 and v5.10.0) codes organs without laterality
(Lung SCT 39607008, Kidney 64033007) and carries the side as a type modifier (Left SCT 7771000, Right SCT
24028007) on the types that allow one. The string is Slicer's serialisation
(vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry):
  context~category~type~type modifier~region context~region~region modifier, each code as SCHEME^VALUE^MEANING.
"""
from __future__ import annotations

import re

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
CATEGORY = ("SCT", "123037004", "Anatomical Structure")
SIDES = {"left": ("SCT", "7771000", "Left"), "right": ("SCT", "24028007", "Right")}

# name -> (SCT code, meaning exactly as in Slicer's list, whether the list allows a Left/Right modifier)
TYPES = {
    "liver": ("10200004", "Liver", False),
    "spleen": ("78961009", "Spleen", False),
    "heart": ("80891009", "Heart", False),
    "lung": ("39607008", "Lung", True),
    "upper lobe of lung": ("45653009", "Upper lobe of lung", True),
    "lower lobe of lung": ("90572001", "Lower lobe of lung", True),
    "middle lobe of right lung": ("72481006", "Middle lobe of right lung", False),
    "kidney": ("64033007", "Kidney", True),
    "pancreas": ("15776009", "Pancreas", False),
    "aorta": ("15825003", "Aorta", False),
    "stomach": ("69695003", "Stomach", False),
    "gallbladder": ("28231008", "Gallbladder", False),
    "brain": ("12738006", "Brain", False),
    "bladder": ("89837001", "Bladder", False),
    "prostate": ("41216001", "Prostate", False),
}
SYNONYMS = {"lungs": "lung", "kidneys": "kidney", "urinary bladder": "bladder", "gall bladder": "gallbladder",
            "upper lung lobe": "upper lobe of lung", "lower lung lobe": "lower lobe of lung",
            "right middle lobe": "middle lobe of right lung", "middle lobe": "middle lobe of right lung"}
_SIDE = re.compile(r"^(left|right)\s+(.*)$")


def _code(triple) -> str:
    return "^".join(triple)


def parse_name(name: str, laterality: str | None = None) -> tuple[str | None, str | None]:
    """('lung', 'left') from 'Left lung' (or from 'lung' with laterality 'left'); (None, None) if unknown."""
    text = " ".join((name or "").strip().lower().split())
    side = None
    match = _SIDE.match(text)
    if match:
        side, text = match.group(1), match.group(2)
    text = SYNONYMS.get(text, text)
    if text not in TYPES:
        return None, None
    if side is None and (laterality or "").lower() in SIDES:
        side = laterality.lower()
    return text, side


def terminology_entry(name: str, laterality: str | None = None) -> str | None:
    """Slicer's serialised terminology entry for a segment name, or None for names not in the list."""
    organ, side = parse_name(name, laterality)
    if organ is None:
        return None
    code, meaning, sided = TYPES[organ]
    modifier = _code(SIDES[side]) if side and sided else "^^"
    return "~".join([CONTEXT, _code(CATEGORY), _code(("SCT", code, meaning)), modifier, REGION_CONTEXT, "^^", "^^"])
