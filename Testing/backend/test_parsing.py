"""Parsers of Citrus-V answers (citrusv_backend.inference.parsing), on the real output formats of
citrus-v.md section 10, their truncations at every position, and malformed variants."""
from __future__ import annotations

import json
import random
import re

import pytest

from citrusv_backend.inference.parsing import (
    Box,
    Finding,
    ParsedBoxes,
    ParsedReport,
    Region,
    ReportStep,
    count_seg_tokens,
    detect_laterality,
    detect_location,
    is_negated,
    parse_boxes,
    parse_finding,
    parse_report,
    scale_boxes,
    split_items,
    split_sentences,
)

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------------------------------
# Real-format answers (citrus-v.md section 10)
# --------------------------------------------------------------------------------------------------

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


def _ends_of(pattern: str, text: str) -> list[int]:
    return [match.end() for match in re.finditer(pattern, text)]


# Where each box's data is complete: after its object's "}", its second ")" or its bbox JSON's "}".
JSON_BOX_ENDS = _ends_of(r"\}", JSON_ANSWER)
LEGACY_BOX_ENDS = _ends_of(r"\(\d+,\d+\),\(\d+,\d+\)", LEGACY_ANSWER)
REPORT_REGION_ENDS = _ends_of(r"<bbox>\{[^}]*\}", REPORT_ANSWER)


def test_fixture_ends_match_the_answers():
    assert len(JSON_BOX_ENDS) == len(JSON_BOXES)
    assert len(LEGACY_BOX_ENDS) == len(LEGACY_BOXES)
    assert len(REPORT_REGION_ENDS) == len(REPORT_REGIONS)


# --------------------------------------------------------------------------------------------------
# parse_boxes: well-formed answers
# --------------------------------------------------------------------------------------------------


def test_fenced_json_answer():
    parsed = parse_boxes(JSON_ANSWER)
    assert parsed.boxes == JSON_BOXES
    assert parsed.problems == []


def test_single_box_answer_as_in_reference():
    parsed = parse_boxes('```json\n[{"bbox_2d": [10, 22, 310, 402], "label": "heart"}]\n```')
    assert parsed.boxes == [Box(10, 22, 310, 402, "heart")]
    assert parsed.problems == []


def test_bare_json_without_fence():
    parsed = parse_boxes('[{"bbox_2d": [1, 2, 3, 4], "label": "liver"}]')
    assert parsed.boxes == [Box(1, 2, 3, 4, "liver")]


def test_single_object_instead_of_list():
    parsed = parse_boxes('```json\n{"bbox_2d": [5, 6, 70, 80], "label": "kidney"}\n```')
    assert parsed.boxes == [Box(5, 6, 70, 80, "kidney")]
    assert parsed.problems == []


def test_prose_around_the_json():
    text = (
        "Sure! I found the heart [see below].\n```json\n"
        '[{"bbox_2d": [100, 120, 300, 330], "label": "heart"}]\n```\nLet me know if you need more.'
    )
    parsed = parse_boxes(text)
    assert parsed.boxes == [Box(100, 120, 300, 330, "heart")]
    assert parsed.problems == []


def test_brackets_in_prose_outside_the_fence_are_not_boxes():
    text = 'Two regions [1, 2] match:\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cyst"}]\n```'
    parsed = parse_boxes(text)
    assert parsed.boxes == [Box(1, 2, 3, 4, "cyst")]
    assert parsed.problems == []


def test_prose_around_bare_json():
    text = 'The heart is at {"bbox_2d": [100, 120, 300, 330], "label": "heart"}, as requested.'
    assert parse_boxes(text).boxes == [Box(100, 120, 300, 330, "heart")]


def test_several_fenced_blocks_are_all_read_in_order():
    text = (
        'Left:\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "left lung"}]\n```\n'
        'Right:\n```json\n[{"bbox_2d": [5, 6, 7, 8], "label": "right lung"}]\n```'
    )
    parsed = parse_boxes(text)
    assert [box.label for box in parsed.boxes] == ["left lung", "right lung"]
    assert parsed.boxes[1] == Box(5, 6, 7, 8, "right lung")


def test_label_is_optional():
    parsed = parse_boxes('[{"bbox_2d": [1, 2, 3, 4]}]')
    assert parsed.boxes == [Box(1, 2, 3, 4, None)]
    assert parsed.problems == []


def test_legacy_box_tokens():
    parsed = parse_boxes(LEGACY_ANSWER)
    assert parsed.boxes == LEGACY_BOXES
    assert parsed.problems == []


def test_legacy_box_without_label():
    parsed = parse_boxes("The liver is here: <|box_start|>(10,20),(110,220)<|box_end|>.")
    assert parsed.boxes == [Box(10, 20, 110, 220, None)]


def test_legacy_and_json_in_one_answer():
    text = '<|box_start|>(1,2),(3,4)<|box_end|> and ```json\n{"bbox_2d": [5, 6, 7, 8]}\n```'
    assert parse_boxes(text).boxes == [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]


def test_no_boxes_in_a_plain_answer():
    parsed = parse_boxes("There is no liver visible in this image.")
    assert parsed.boxes == []
    assert parsed.problems == []


# --------------------------------------------------------------------------------------------------
# parse_boxes: malformed answers
# --------------------------------------------------------------------------------------------------


def test_trailing_commas():
    parsed = parse_boxes('```json\n[{"bbox_2d": [1, 2, 3, 4,], "label": "heart",},]\n```')
    assert parsed.boxes == [Box(1, 2, 3, 4, "heart")]
    assert parsed.problems == []


def test_single_quotes_and_an_apostrophe_in_the_label():
    parsed = parse_boxes("[{'bbox_2d': [1, 2, 3, 4], 'label': 'patient's heart'}]")
    assert parsed.boxes == [Box(1, 2, 3, 4, "patient's heart")]


def test_numbers_as_strings():
    parsed = parse_boxes('[{"bbox_2d": ["10", " 20.5", "30", "40"], "label": "liver"}]')
    assert parsed.boxes == [Box(10, 20.5, 30, 40, "liver")]
    assert parsed.problems == []


def test_coordinates_as_one_string_or_as_point_pairs():
    parsed = parse_boxes('[{"bbox_2d": "10, 20, 30, 40"}, {"bbox_2d": [[1, 2], [3, 4]]}]')
    assert parsed.boxes == [Box(10, 20, 30, 40), Box(1, 2, 3, 4)]


def test_unquoted_keys_and_missing_commas():
    parsed = parse_boxes('[{bbox_2d: [1, 2, 3, 4] label: heart} {bbox_2d: [5, 6, 7, 8]}]')
    assert parsed.boxes == [Box(1, 2, 3, 4, "heart"), Box(5, 6, 7, 8)]


def test_wrong_arity_is_skipped_with_a_problem():
    text = '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7]}, {"bbox_2d": [1, 2, 3, 4, 5]}]'
    parsed = parse_boxes(text)
    assert parsed.boxes == [Box(1, 2, 3, 4)]
    assert any(problem.startswith("box 2: expected 4 numbers, got 3") for problem in parsed.problems)
    assert any(problem.startswith("box 3: expected 4 numbers, got 5") for problem in parsed.problems)


@pytest.mark.parametrize(
    "bad", ["NaN", "Infinity", "-Infinity", '"nan"', '"inf"', "1e999", '"ten"', "null", "true"]
)
def test_non_finite_or_non_numeric_coordinate_is_skipped(bad):
    parsed = parse_boxes(f'[{{"bbox_2d": [1, 2, 3, 4]}}, {{"bbox_2d": [1, {bad}, 3, 4]}}]')
    assert parsed.boxes == [Box(1, 2, 3, 4)]
    assert len(parsed.problems) == 1 and parsed.problems[0].startswith("box 2:")


def test_coordinates_that_are_not_a_list():
    parsed = parse_boxes('[{"bbox_2d": {"x": 1}}, {"bbox_2d": 5}]')
    assert parsed.boxes == []
    assert [problem[:6] for problem in parsed.problems] == ["box 1:", "box 2:"]


def test_negative_numbers_are_kept():
    parsed = parse_boxes('[{"bbox_2d": [-12, -3.5, 40, 50]}]')
    assert parsed.boxes == [Box(-12, -3.5, 40, 50)]
    assert parsed.problems == []


def test_reversed_corners_are_normalised():
    parsed = parse_boxes('[{"bbox_2d": [300, 400, 100, 50], "label": "heart"}]')
    box = parsed.boxes[0]
    assert (box.x1, box.y1, box.x2, box.y2) == (100, 50, 300, 400)


def test_box_constructor_normalises_and_converts_to_float():
    box = Box(5, 9, 1, 2)
    assert (box.x1, box.y1, box.x2, box.y2) == (1.0, 2.0, 5.0, 9.0)
    assert isinstance(box.x1, float)


def test_malformed_object_does_not_hide_the_good_ones():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8] "label" "b"}]'
    parsed = parse_boxes(text)
    assert parsed.boxes[0] == Box(1, 2, 3, 4, "a")
    assert Box(5, 6, 7, 8) in [Box(b.x1, b.y1, b.x2, b.y2) for b in parsed.boxes]
    assert any("malformed JSON" in problem for problem in parsed.problems)


@pytest.mark.parametrize(
    "garbage",
    ["", "```json\n```", "```json\n{{{]]]```", "[SEG]", "]]]}}}", "{", "[", "'", '"', "<|box_start|>",
     "<|box_start|><|box_end|>", "<|object_ref_start|>", '{"bbox_2d": }', '{"bbox_2d": [,,,]}',
     "\\u12", '{"label": "\\'],
)
def test_garbage_gives_no_box_and_no_exception(garbage):
    parsed = parse_boxes(garbage)
    assert isinstance(parsed, ParsedBoxes)
    assert parsed.boxes == []


PATHOLOGICAL = {
    "deep brackets": "[" * 5000,
    "deep braces": "{" * 5000,
    "one-line quotes": "['[a' " * 3000,
    "multi-line quotes": ("['" + "[a' " * 40 + "\n") * 200,
}


@pytest.mark.parametrize("text", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_input_is_bounded_and_does_not_recurse_forever(text):
    parsed = parse_boxes(text + '[{"bbox_2d": [1, 2, 3, 4]}]')
    assert isinstance(parsed, ParsedBoxes)
    assert parsed.boxes == [Box(1, 2, 3, 4)] or parsed.problems  # read, or given up with a problem


def test_apostrophes_in_prose_do_not_hide_bare_json():
    text = "I can't see [the liver's edge] well, it's faint.\n" * 20 + '[{"bbox_2d": [1, 2, 3, 4]}]'
    assert parse_boxes(text).boxes == [Box(1, 2, 3, 4)]


@pytest.mark.parametrize("value", [None, 42, ["[1,2,3,4]"]])
def test_non_text_input(value):
    parsed = parse_boxes(value)
    assert parsed.boxes == []
    assert (value is None) == (parsed.problems == [])


def test_bytes_input_is_decoded():
    assert parse_boxes(b'[{"bbox_2d": [1, 2, 3, 4]}]').boxes == [Box(1, 2, 3, 4)]


def test_parsed_boxes_to_dict_is_json():
    parsed = parse_boxes('[{"bbox_2d": [1, 2, 3, 4], "label": "heart"}, {"bbox_2d": [1]}]')
    data = json.loads(json.dumps(parsed.to_dict()))
    assert data["boxes"] == [{"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "label": "heart"}]
    assert data["problems"] == ["box 2: expected 4 numbers, got 1, skipped"]
    assert Box(1, 2, 3, 4).to_dict()["label"] is None


# --------------------------------------------------------------------------------------------------
# parse_boxes: truncation at every position
# --------------------------------------------------------------------------------------------------


def _complete_before(cut: int, ends: list[int]) -> int:
    return sum(end <= cut for end in ends)


@pytest.mark.parametrize("cut", range(len(JSON_ANSWER) + 1))
def test_truncated_json_answer_keeps_every_complete_box(cut):
    parsed = parse_boxes(JSON_ANSWER[:cut])
    assert parsed.boxes == JSON_BOXES[:_complete_before(cut, JSON_BOX_ENDS)]
    json_started = cut > JSON_ANSWER.index("[")
    json_closed = cut > JSON_ANSWER.rindex("]")
    assert bool(parsed.problems) == (json_started and not json_closed)


@pytest.mark.parametrize("cut", range(len(LEGACY_ANSWER) + 1))
def test_truncated_legacy_answer_keeps_every_complete_box(cut):
    parsed = parse_boxes(LEGACY_ANSWER[:cut])
    assert parsed.boxes == LEGACY_BOXES[:_complete_before(cut, LEGACY_BOX_ENDS)]


def test_truncated_json_reports_the_cut_box():
    parsed = parse_boxes(JSON_ANSWER[:JSON_BOX_ENDS[1] - 5])
    assert parsed.boxes == JSON_BOXES[:1]
    assert parsed.problems == ["box 2: cut off before it was complete (answer truncated?), skipped"]


def test_legacy_box_cut_inside_a_number_is_not_trusted():
    parsed = parse_boxes("<|box_start|>(112,205),(398,47")
    assert parsed.boxes == []
    assert parsed.problems and "cut off" in parsed.problems[0]


def test_random_mutations_never_raise():
    rng = random.Random(1234)
    alphabet = '[]{}",:\'`0123456789.-abx<>|/ \n'
    sources = [JSON_ANSWER, LEGACY_ANSWER, REPORT_ANSWER]
    for _ in range(400):
        chars = list(rng.choice(sources))
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(chars))
            action = rng.randrange(3)
            if action == 0:
                del chars[position]
            elif action == 1:
                chars.insert(position, rng.choice(alphabet))
            else:
                chars[position] = rng.choice(alphabet)
        text = "".join(chars)
        boxes = parse_boxes(text)
        report = parse_report(text)
        json.dumps(boxes.to_dict())
        json.dumps(report.to_dict())
        assert all(box.x1 <= box.x2 and box.y1 <= box.y2 for box in boxes.boxes)


# --------------------------------------------------------------------------------------------------
# scale_boxes
# --------------------------------------------------------------------------------------------------


def test_scale_boxes_by_hand():
    # Resized 448 x 672 (H x W) back to 512 x 1024: x by 1024/672, y by 512/448.
    scaled = scale_boxes([Box(67.2, 44.8, 336, 224, "heart")], (448, 672), (512, 1024))
    box = scaled[0]
    assert box.x1 == pytest.approx(102.4)
    assert box.y1 == pytest.approx(51.2)
    assert box.x2 == pytest.approx(512.0)
    assert box.y2 == pytest.approx(256.0)
    assert box.label == "heart"


def test_scale_boxes_clips_to_the_original_image():
    scaled = scale_boxes([Box(-10, -5, 700, 460)], (448, 672), (512, 1024))
    box = scaled[0]
    assert (box.x1, box.y1) == (0.0, 0.0)
    assert (box.x2, box.y2) == (1024.0, 512.0)  # 700*1024/672 = 1066.7 and 460*512/448 = 525.7


def test_scale_boxes_with_smart_resize_sizes():
    # 512 x 512 CT slice, MAX_PIXELS=65535 → smart_resize gives 252 x 252.
    scaled = scale_boxes([Box(63, 126, 189, 252)], (252, 252), (512, 512))
    assert [scaled[0].x1, scaled[0].y1, scaled[0].x2, scaled[0].y2] == pytest.approx([128, 256, 384, 512])


def test_scale_boxes_identity_and_no_mutation():
    original = Box(1, 2, 3, 4, "x")
    scaled = scale_boxes([original], (100, 200), (100, 200))
    assert scaled == [Box(1, 2, 3, 4, "x")]
    assert scaled[0] is not original
    scale_boxes([original], (10, 10), (1000, 1000))
    assert original == Box(1, 2, 3, 4, "x")


def test_scale_boxes_empty_list():
    assert scale_boxes([], (10, 10), (20, 20)) == []


@pytest.mark.parametrize(
    "resized, original", [((0, 10), (10, 10)), ((10, 10), (10, -1)), ((10, float("nan")), (10, 10))]
)
def test_scale_boxes_rejects_bad_sizes(resized, original):
    with pytest.raises(ValueError):
        scale_boxes([Box(1, 2, 3, 4)], resized, original)


# --------------------------------------------------------------------------------------------------
# count_seg_tokens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Sure, it is [SEG].", 1),
        ("Sure. I have find the heart in the scan, it is [SEG].", 1),
        ("Left lung [SEG] and right lung [SEG].", 2),
        ("[SEG][SEG][SEG]", 3),
        ("No segmentation here.", 0),
        ("[seg] [ SEG ]", 0),
        ("", 0),
    ],
)
def test_count_seg_tokens(text, expected):
    assert count_seg_tokens(text) == expected


def test_count_seg_tokens_custom_token_and_bad_input():
    assert count_seg_tokens("a <SEG> b <SEG>", seg_token="<SEG>") == 2
    assert count_seg_tokens("[SEG]", seg_token="") == 0
    assert count_seg_tokens(None) == 0  # type: ignore[arg-type]


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
    assert report.regions == REPORT_REGIONS[:_complete_before(cut, REPORT_REGION_ENDS)]
    numbers = [step.number for step in report.steps if step.number is not None]
    assert numbers == list(range(1, _complete_before(cut, STEP_STARTS) + 1))
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
