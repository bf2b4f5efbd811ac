"""Citrus-V answers in their real formats (docs/reference-model.md, "Answer formats"), shared by the parser tests, and where
each box or region is complete (so truncation tests know what must survive a cut)."""
from __future__ import annotations

import re

from citrusv_backend.inference.parsing import Box
from citrusv_backend.inference.reports import Region

# Several boxes: one array, all with the first label; absolute pixels of the resized image.
JSON_ANSWER = (
    "```json\n[\n"
    '\t{"bbox_2d": [120, 88, 412, 390], "label": "right lung"},\n'
    '\t{"bbox_2d": [30, 40, 200, 380], "label": "right lung"},\n'
    '\t{"bbox_2d": [250, 300, 310, 355], "label": "right lung"}\n'
    "]\n```"
)
JSON_BOXES = [
    Box(120, 88, 412, 390, "right lung"),
    Box(30, 40, 200, 380, "right lung"),
    Box(250, 300, 310, 355, "right lung"),
]

LEGACY_ANSWER = (
    "<|object_ref_start|>liver<|object_ref_end|><|box_start|>(112,205),(398,470)<|box_end|>"
    "<|box_start|>(20,30),(60,90)<|box_end|>"
    "<|object_ref_start|>spleen<|object_ref_end|><|box_start|>(400,120),(480,260)<|box_end|>"
)
LEGACY_BOXES = [
    Box(112, 205, 398, 470, "liver"),
    Box(20, 30, 60, 90, "liver"),  # a ref names every box up to the next ref
    Box(400, 120, 480, 260, "spleen"),
]

REPORT_ANSWER = (
    "<think> Step 1: Soft tissue and bony thorax. The soft tissues and bony thorax are unremarkable. "
    'Step 2: Lungs. <bbox>{"Part":"lung","bbox":[50, 68, 424, 326]}</bbox> The lungs are clear '
    "without focal consolidation. "
    'Step 3: Hila and mediastinum. <bbox>{"Part":"mediastinum","bbox":[190, 60, 290, 300]}</bbox> '
    "The mediastinum is within normal limits. "
    "Step 4: Diaphragm and costophrenic angles. "
    '<bbox>{"Part":"left costophrenic angle","bbox":[330, 280, 420, 340]}</bbox> '
    "There is blunting of the left costophrenic angle. "
    'Step 5: Cardiac silhouette. <bbox>{"Part":"heart","bbox":[180, 160, 340, 320]}</bbox> '
    "The heart size is normal. Step 6: Foreign bodies. No foreign bodies. </think>\n"
    "<answer> FINDINGS: The lungs are clear. No pneumothorax. Small left pleural effusion measuring "
    "approx. 3.5 cm. Heart size is normal. IMPRESSION: 1. Small left pleural effusion. "
    "2. No acute cardiopulmonary process. </answer>"
)
REPORT_REGIONS = [
    Region("lung", Box(50, 68, 424, 326, "lung"), 2),
    Region("mediastinum", Box(190, 60, 290, 300, "mediastinum"), 3),
    Region("left costophrenic angle", Box(330, 280, 420, 340, "left costophrenic angle"), 4),
    Region("heart", Box(180, 160, 340, 320, "heart"), 5),
]
REPORT_FINDINGS = (
    "The lungs are clear. No pneumothorax. Small left pleural effusion measuring approx. 3.5 cm. "
    "Heart size is normal."
)
REPORT_IMPRESSION = "1. Small left pleural effusion. 2. No acute cardiopulmonary process."


def ends_of(pattern: str, text: str) -> list[int]:
    return [match.end() for match in re.finditer(pattern, text)]


def complete_before(cut: int, ends: list[int]) -> int:
    """How many items end at or before `cut`."""
    return sum(end <= cut for end in ends)


# Where each box's data is complete: after its object's "}", its second ")" or its bbox JSON's "}".
JSON_BOX_ENDS = ends_of(r"\}", JSON_ANSWER)
LEGACY_BOX_ENDS = ends_of(r"\(\d+,\d+\),\(\d+,\d+\)", LEGACY_ANSWER)
REPORT_REGION_ENDS = ends_of(r"<bbox>\{[^}]*\}", REPORT_ANSWER)
