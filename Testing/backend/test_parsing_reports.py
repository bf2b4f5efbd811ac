"""Report parser (citrusv_backend.inference.reports), on the real report format (docs/reference-model.md, "Answer formats"),
its truncations at every position, malformed variants, and the language of findings."""
from __future__ import annotations

import json
import re

import pytest

from citrus_answers import (REPORT_ANSWER, REPORT_FINDINGS, REPORT_IMPRESSION, REPORT_REGION_ENDS, REPORT_REGIONS,
                            complete_before)
from citrusv_backend.inference.parsing import Box
from citrusv_backend.inference.reports import (
    Finding,
    ParsedReport,
    Region,
    ReportStep,
    detect_laterality,
    detect_location,
    is_negated,
    parse_finding,
    parse_report,
    split_items,
    split_sentences,
)

pytestmark = pytest.mark.unit

def test_fixture_ends_match_the_answers():
    assert len(REPORT_REGION_ENDS) == len(REPORT_REGIONS)


# --------------------------------------------------------------------------------------------------
# parse_report: the real answer
# --------------------------------------------------------------------------------------------------


def test_report_steps():
    report = parse_report(REPORT_ANSWER)
    assert [step.number for step in report.steps] == [1, 2, 3, 4, 5, 6]
    assert report.steps[0] == ReportStep(
        1, "Soft tissue and bony thorax. The soft tissues and bony thorax are unremarkable.", []
    )
    assert report.steps[1].text == "Lungs. The lungs are clear without focal consolidation."
    assert report.steps[1].regions == [REPORT_REGIONS[0]]
    assert "<bbox>" not in " ".join(step.text for step in report.steps)


def test_report_regions():
    report = parse_report(REPORT_ANSWER)
    assert report.regions == REPORT_REGIONS
    assert report.problems == []


def test_report_sections():
    report = parse_report(REPORT_ANSWER)
    assert report.findings_text == REPORT_FINDINGS
    assert report.impression_text == REPORT_IMPRESSION


def test_report_findings():
    report = parse_report(REPORT_ANSWER)
    assert report.findings == [
        Finding("The lungs are clear.", None, "lung", False),
        Finding("No pneumothorax.", None, "pleura", True),
        Finding("Small left pleural effusion measuring approx. 3.5 cm.", "left", "pleura", False),
        Finding("Heart size is normal.", None, "heart", False),
    ]


def test_report_numbered_impression():
    report = parse_report(REPORT_ANSWER)
    assert report.impression == [
        Finding("Small left pleural effusion.", "left", "pleura", False),
        Finding("No acute cardiopulmonary process.", None, None, True),
    ]


def test_report_to_dict_is_json():
    data = json.loads(json.dumps(parse_report(REPORT_ANSWER).to_dict()))
    assert data["regions"][0] == {
        "part": "lung",
        "box": {"x1": 50.0, "y1": 68.0, "x2": 424.0, "y2": 326.0, "label": "lung"},
        "step": 2,
    }
    assert data["impression"][0]["laterality"] == "left"
    assert data["steps"][5]["number"] == 6


# --------------------------------------------------------------------------------------------------
# parse_report: variants and damage
# --------------------------------------------------------------------------------------------------


def test_report_without_tags():
    report = parse_report("FINDINGS: The heart is enlarged. IMPRESSION: Cardiomegaly.")
    assert report.findings_text == "The heart is enlarged."
    assert report.impression_text == "Cardiomegaly."
    assert report.steps == [] and report.regions == []
    assert report.problems == []


def test_report_heading_case_variations():
    report = parse_report("<answer>Findings: Lungs are clear.\nIMPRESSION : Normal chest.</answer>")
    assert report.findings_text == "Lungs are clear."
    assert report.impression_text == "Normal chest."


def test_report_markdown_and_line_headings():
    report = parse_report("**Findings:** Mild cardiomegaly.\n\nIMPRESSION\n- Cardiomegaly.\n- No effusion.")
    assert report.findings_text == "Mild cardiomegaly."
    assert [finding.text for finding in report.impression] == ["Cardiomegaly.", "No effusion."]


def test_report_steps_without_think_tag():
    report = parse_report(
        'Step 1: Lungs. <bbox>{"Part": "lung", "bbox": [1, 2, 3, 4]}</bbox> Clear. '
        "FINDINGS: Clear lungs. IMPRESSION: Normal."
    )
    assert [step.number for step in report.steps] == [1]
    assert report.regions == [Region("lung", Box(1, 2, 3, 4, "lung"), 1)]
    assert report.findings_text == "Clear lungs."


def test_report_bbox_with_single_quotes_and_bbox_2d_key():
    report = parse_report(
        "<think>Step 1: Heart. <bbox>{'Part': 'heart', 'bbox_2d': [180, 160, 340, 320]}</bbox></think>"
        "<answer>FINDINGS: Normal heart. IMPRESSION: Normal.</answer>"
    )
    assert report.regions == [Region("heart", Box(180, 160, 340, 320, "heart"), 1)]
    assert report.problems == []


def test_report_bbox_broken_mid_json_keeps_the_rest():
    report = parse_report(
        '<think> Step 1: Lungs. <bbox>{"Part":"lung","bbox":[50, 68</bbox> Clear lungs. '
        'Step 2: Heart. <bbox>{"Part":"heart","bbox":[180, 160, 340, 320]}</bbox> Normal. </think>'
        "<answer> FINDINGS: Normal. IMPRESSION: Normal. </answer>"
    )
    assert report.regions == [Region("heart", Box(180, 160, 340, 320, "heart"), 2)]
    assert report.problems == ["region 1: cut off before it was complete (answer truncated?), skipped"]
    assert report.steps[0].text == "Lungs. Clear lungs."
    assert report.findings_text == "Normal." and report.impression_text == "Normal."


def test_report_bbox_with_wrong_arity_and_empty_bbox():
    report = parse_report(
        '<think>Step 1: <bbox>{"Part":"lung","bbox":[1, 2, 3]}</bbox> Step 2: <bbox></bbox></think>'
        "<answer>FINDINGS: x. IMPRESSION: y.</answer>"
    )
    assert report.regions == []
    assert report.problems == [
        "region 1: expected 4 numbers, got 3, skipped",
        "region 2: no box in <bbox></bbox>",
    ]


def test_report_missing_close_think_before_answer():
    report = parse_report(
        "<think> Step 1: Lungs clear. <answer> FINDINGS: Clear. IMPRESSION: Normal. </answer>"
    )
    assert [step.text for step in report.steps] == ["Lungs clear."]
    assert report.impression_text == "Normal."
    assert report.problems == ["<think> is not closed (missing </think> before <answer>)"]


def test_report_without_headings_takes_the_answer_as_findings():
    report = parse_report("<answer> The lungs are clear. No effusion. </answer>")
    assert report.findings_text == "The lungs are clear. No effusion."
    assert report.impression_text is None
    assert [finding.negated for finding in report.findings] == [False, True]
    assert len(report.problems) == 1 and "heading" in report.problems[0]


def test_report_missing_impression_is_a_problem():
    report = parse_report("<answer>FINDINGS: Clear lungs.</answer>")
    assert report.findings_text == "Clear lungs."
    assert report.impression_text is None
    assert report.problems == ["no IMPRESSION section (answer cut off?)"]


def test_report_cut_heading_is_dropped():
    report = parse_report("<answer> FINDINGS: The heart size is normal. IMPRESS")
    assert report.findings_text == "The heart size is normal."
    assert "<answer> is not closed (answer cut off?)" in report.problems


def test_report_empty_or_none():
    for value in ("", None):
        report = parse_report(value)  # type: ignore[arg-type]
        assert isinstance(report, ParsedReport)
        assert report.findings_text is None and report.steps == []
        assert report.problems  # nothing to read is worth saying


# --------------------------------------------------------------------------------------------------
# parse_report: truncation at every position
# --------------------------------------------------------------------------------------------------

FINDINGS_START = REPORT_ANSWER.index("FINDINGS:") + len("FINDINGS:")
IMPRESSION_HEADING = REPORT_ANSWER.index("IMPRESSION:")
STEP_STARTS = [match.end() for match in re.finditer(r"Step \d", REPORT_ANSWER)]


@pytest.mark.parametrize("cut", range(len(REPORT_ANSWER) + 1))
def test_truncated_report(cut):
    report = parse_report(REPORT_ANSWER[:cut])
    assert report.regions == REPORT_REGIONS[:complete_before(cut, REPORT_REGION_ENDS)]
    numbers = [step.number for step in report.steps if step.number is not None]
    assert numbers == list(range(1, complete_before(cut, STEP_STARTS) + 1))
    if cut < len(REPORT_ANSWER):
        assert report.problems, "a cut answer is reported"
    if FINDINGS_START <= cut <= IMPRESSION_HEADING:
        assert REPORT_FINDINGS.startswith(report.findings_text or "")
    if cut >= IMPRESSION_HEADING + len("IMPRESSION:"):
        assert report.findings_text == REPORT_FINDINGS
        assert REPORT_IMPRESSION.startswith(report.impression_text)


def test_truncated_report_keeps_the_region_whose_json_closed():
    cut = REPORT_REGION_ENDS[1]  # right after the "}" of the 2nd bbox, before "</bbox>"
    report = parse_report(REPORT_ANSWER[:cut + 3])  # "</b" is left over
    assert report.regions == REPORT_REGIONS[:2]
    assert report.steps[-1].text == "Hila and mediastinum."


# --------------------------------------------------------------------------------------------------
# Sentences, items, finding attributes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The lungs are clear. No effusion.", ["The lungs are clear.", "No effusion."]),
        ("A 3.5 cm nodule. Stable.", ["A 3.5 cm nodule.", "Stable."]),
        ("Measures approx. 2 cm. Heart normal.", ["Measures approx. 2 cm.", "Heart normal."]),
        ("Lines, e.g. a catheter, are seen. Done!", ["Lines, e.g. a catheter, are seen.", "Done!"]),
        ("Is there fluid? No.", ["Is there fluid?", "No."]),
        ("Lungs are clear.Heart is normal.", ["Lungs are clear.", "Heart is normal."]),
        ("No effusion", ["No effusion"]),
        ("   ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1. Small effusion. 2. No pneumothorax.", ["Small effusion.", "No pneumothorax."]),
        ("1) Cardiomegaly.\n2) Edema, 3.5 cm.", ["Cardiomegaly.", "Edema, 3.5 cm."]),
        ("- Cardiomegaly.\n- No effusion.", ["Cardiomegaly.", "No effusion."]),
        ("Nodule of 2. 5 mm is stable.", ["Nodule of 2. 5 mm is stable."]),  # not a list: no "1."
        ("No acute disease.", ["No acute disease."]),
    ],
)
def test_split_items(text, expected):
    assert split_items(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Small left pleural effusion.", "left"),
        ("Right lower lobe opacity.", "right"),
        ("Bilateral pleural effusions.", "bilateral"),
        ("Opacities in both lungs.", "bilateral"),
        ("Left and right hila are normal.", "bilateral"),
        ("L pleural effusion.", "left"),
        ("R hemidiaphragm elevated.", "right"),
        ("Left-sided effusion.", "left"),
        ("Bright spot in the liver.", None),
        ("Leftover contrast in the bowel.", None),
        ("Patient is upright.", None),
        ("Rightward tracheal deviation.", None),
        ("L1 vertebral fracture.", None),
        ("L-spine is normal.", None),
        ("The heart is normal.", None),
    ],
)
def test_detect_laterality(text, expected):
    assert detect_laterality(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Blunting of the left costophrenic angle.", "costophrenic angle"),
        ("The cardiac silhouette is enlarged.", "cardiac silhouette"),
        ("Heart size is normal.", "heart"),
        ("Mild cardiomegaly.", "heart"),
        ("The lungs are clear.", "lung"),
        ("Right upper lobe consolidation.", "lung"),
        ("The mediastinum is not widened.", "mediastinum"),
        ("Mediastinal contours are normal.", "mediastinum"),
        ("Hypodense lesion in the liver.", "liver"),
        ("Gallbladder is distended.", "gallbladder"),
        ("Small left pleural effusion.", "pleura"),
        ("No acute cardiopulmonary process.", None),
        ("Lungs and heart are normal.", "lung"),  # the first one named
    ],
)
def test_detect_location(text, expected):
    assert detect_location(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No pleural effusion.", True),
        ("Lungs are clear without focal consolidation.", True),
        ("No evidence of pneumothorax.", True),
        ("The heart is not enlarged.", True),
        ("Negative for fracture.", True),
        ("Small left pleural effusion.", False),
        ("A small effusion cannot be excluded.", False),
        ("Pneumonia is not ruled out.", False),
        ("No significant change in the left effusion.", False),
        ("Nodule in the right lung.", False),
        ("Note is made of a rib fracture.", False),
        ("Normal heart size.", False),
    ],
)
def test_is_negated(text, expected):
    assert is_negated(text) is expected


def test_parse_finding_collapses_space():
    expected = Finding("No right pneumothorax.", "right", "pleura", True)
    assert parse_finding("  No   right\npneumothorax. ") == expected
