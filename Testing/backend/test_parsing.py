"""Box and [SEG] parsers (citrusv_backend.inference.parsing), on the real detection formats
(docs/reference-model.md, "Answer formats"), their truncations at every position, and malformed variants. Reports: test_parsing_reports.py."""
from __future__ import annotations

import json
import random

import pytest

from citrus_answers import (JSON_ANSWER, JSON_BOX_ENDS, JSON_BOXES, LEGACY_ANSWER, LEGACY_BOX_ENDS, LEGACY_BOXES,
                            REPORT_ANSWER, complete_before)
from citrusv_backend.inference.parsing import Box, ParsedBoxes, count_seg_tokens, parse_boxes, scale_boxes
from citrusv_backend.inference.reports import parse_report

pytestmark = pytest.mark.unit


def test_fixture_ends_match_the_answers():
    assert len(JSON_BOX_ENDS) == len(JSON_BOXES)
    assert len(LEGACY_BOX_ENDS) == len(LEGACY_BOXES)


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


@pytest.mark.parametrize("cut", range(len(JSON_ANSWER) + 1))
def test_truncated_json_answer_keeps_every_complete_box(cut):
    parsed = parse_boxes(JSON_ANSWER[:cut])
    assert parsed.boxes == JSON_BOXES[:complete_before(cut, JSON_BOX_ENDS)]
    json_started = cut > JSON_ANSWER.index("[")
    json_closed = cut > JSON_ANSWER.rindex("]")
    assert bool(parsed.problems) == (json_started and not json_closed)


@pytest.mark.parametrize("cut", range(len(LEGACY_ANSWER) + 1))
def test_truncated_legacy_answer_keeps_every_complete_box(cut):
    parsed = parse_boxes(LEGACY_ANSWER[:cut])
    assert parsed.boxes == LEGACY_BOXES[:complete_before(cut, LEGACY_BOX_ENDS)]


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
