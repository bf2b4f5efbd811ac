"""Conversations through the real service (CONTRACTS.md, issue 23): a 3-turn conversation on the chest CT whose
second turn's answer holds a [SEG] and a box — a segment and an ROI on that turn's slice — exported as
Markdown; listing, deletion, and the errors (unknown id, too long, bad turns) as 4xx JSON."""
from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from citrusv_backend.volume.slices.orientation import model_orientation
from service_helpers import reassemble, upload, wait

pytestmark = pytest.mark.service

# Turn 2's answer, forced (the model's own path: prefill of the answer, the [SEG] state -> projector -> SAM2):
# a mask and one box, in the JSON form Citrus-V writes, pixels of the resized image it was shown.
SEG_AND_BOX = 'Sure, it is [SEG]. ```json\n[{"bbox_2d": [112, 140, 196, 252], "label": "nodule"}]\n```'


def _turn(client, conversation_id: str, **body) -> dict:
    response = client.post(f"/v1/conversations/{conversation_id}/turns", json=body)
    assert response.status_code == 202, response.text
    job = wait(client, response.json()["job_id"], timeout=300)
    assert job["status"] == "done", job
    return client.get(job["result_url"]).json()


@pytest.fixture(scope="module")
def three_turns(server, chest):
    import httpx

    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as client:
        volume_id = upload(client, chest)
        created = client.post(f"/v1/volumes/{volume_id}/conversations", json={"title": "chest questions"})
        assert created.status_code == 201, created.text
        conversation_id = created.json()["conversation_id"]
        assert created.json()["turns"] == [] and created.json()["volume_id"] == volume_id
        first = _turn(client, conversation_id, prompt="What is in this slice?", slice=17, axis="axial",
                      max_new_tokens=6)
        second = _turn(client, conversation_id, prompt="Segment the left lung and locate the nodule.", slice=20,
                       axis="axial", answer=SEG_AND_BOX)
        third = _turn(client, conversation_id, prompt="And how large is it?", max_new_tokens=6)
        whole = client.get(f"/v1/conversations/{conversation_id}").json()
        markdown = client.get(f"/v1/conversations/{conversation_id}/export", params={"format": "markdown"})
        yield {"volume_id": volume_id, "id": conversation_id, "turns": [first, second, third], "whole": whole,
               "markdown": markdown}


def test_second_turn_seg_and_box_become_a_segment_and_an_roi_on_its_slice(three_turns, chest):
    second = three_turns["turns"][1]
    assert second["turn"] == 2 and second["conversation_id"] == three_turns["id"]
    assert second["answer"] == {"text": SEG_AND_BOX, "slice": 20, "axis": "axial", "window": second["answer"]["window"],
                                "roi": None, "masks_on_turn": 2, "forced": True}
    assert second["random_weights"] is True and second["model"] == "tiny-checkpoint"
    [segment] = second["segments"]
    assert segment["turn"] == 2 and segment["key_slice"] == 20
    labels = reassemble(second)
    orientation = model_orientation(chest.geometry.direction, "axial")
    along_slices = np.nonzero(labels.any(axis=tuple(a for a in range(3) if a != orientation.slice_axis)))[0]
    assert along_slices.tolist() == [20], "without propagation the mask lies on the asked slice only"
    [box] = second["boxes"]
    assert box["turn"] == 2 and box["label"] == "nodule"
    # The box in the slice's own pixels: the model's frame (resized) scaled back to the 128x128 slice.
    height, width = orientation.plane_shape(chest.shape)
    resized = smart_size(height, width)
    x1, y1, x2, y2 = 112 * width / resized[1], 140 * height / resized[0], 196 * width / resized[1], 252 * height / resized[0]
    corners = orientation.display_to_index(20, np.array([int(y1), int(np.ceil(y2)) - 1] * 2, float),
                                           np.array([int(x1)] * 2 + [int(np.ceil(x2)) - 1] * 2, float), chest.shape)
    kji_low, kji_high = corners.min(axis=0).astype(int), corners.max(axis=0).astype(int)
    assert box["ijk_min"] == kji_low[::-1].tolist() and box["ijk_max"] == kji_high[::-1].tolist()
    assert box["ijk_min"][2] == box["ijk_max"][2] == 20, "a box is an ROI one slice thick, on the asked slice"


def smart_size(height: int, width: int) -> tuple[int, int]:
    from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS, smart_resize

    budget = TASK_PIXEL_BUDGETS["ask"]
    return smart_resize(height, width, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)


def test_text_only_follow_up_keeps_the_history_and_points_at_the_latest_image(three_turns):
    first, second, third = three_turns["turns"]
    whole = three_turns["whole"]
    assert [t["number"] for t in whole["turns"]] == [1, 2, 3]
    assert third["answer"]["slice"] is None and third["answer"]["masks_on_turn"] == 2
    assert whole["turns"][2]["masks_on_turn"] == 2
    # Each turn's prompt is the whole conversation so far: it grows by the earlier turns' questions, images and answers.
    tokens = [t["prompt_tokens"] for t in whole["turns"]]
    assert tokens[0] < tokens[1] < tokens[2]
    assert whole["tokens"] == whole["turns"][2]["prompt_tokens"] + whole["turns"][2]["answer_tokens"] + 1
    assert first["experimental"] is False and whole["random_weights"] is True
    for turn in whole["turns"]:
        assert turn["model"] == "tiny-checkpoint" and turn["random_weights"] is True


def test_export_markdown_shows_each_turns_slice_and_the_markings(three_turns):
    response = three_turns["markdown"]
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/markdown")
    text = response.text
    assert "**RANDOM WEIGHTS**" in text
    assert "## Turn 1" in text and "## Turn 2" in text and "## Turn 3" in text
    assert "axial slice 20" in text and "text only (masks and boxes on turn 2's image)" in text
    assert "Segment *turn 2* (label 1) on slice 20" in text and "ROI *nodule*" in text
    assert f"````text\n{SEG_AND_BOX}\n````" in text, "an answer with a ```json block is shown verbatim"
    pictures = re.findall(r"!\[turn (\d+): axial slice (\d+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert [(n, s) for n, s, _ in pictures] == [("1", "17"), ("2", "20")]
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, _, data in pictures)


def test_list_and_delete(three_turns, client):
    listed = client.get("/v1/conversations", params={"volume_id": three_turns["volume_id"]}).json()["conversations"]
    assert [(c["conversation_id"], c["turns"], c["title"]) for c in listed] == [(three_turns["id"], 3, "chest questions")]
    assert client.get("/v1/conversations", params={"volume_id": "nope"}).json() == {"conversations": []}
    created = client.post(f"/v1/volumes/{three_turns['volume_id']}/conversations", json={}).json()["conversation_id"]
    assert client.delete(f"/v1/conversations/{created}").status_code == 204
    gone = client.get(f"/v1/conversations/{created}")
    assert gone.status_code == 404 and "deleted" in gone.json()["error"]["message"]


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "What?", "slice": 999}, 400, "outside"),
    ({"prompt": "What?", "slice": 3, "roi": {"ijk_min": [0, 0, 10], "ijk_max": [20, 20, 12]}}, 400, "outside the ROI"),
    ({"prompt": "What?", "slice": 3, "roi": {"ijk_min": [30, 0, 0], "ijk_max": [20, 20, 12]}}, 400, "inverted"),
    ({"prompt": "What?", "slice": 3, "axis": "oblique"}, 422, "axis"),
    ({"prompt": "Where is the [SEG]?", "slice": 3}, 400, "special token"),
    ({"prompt": "", "slice": 3}, 422, "prompt"),
    ({"prompt": "What?", "slice": 3, "max_new_tokens": 40000}, 400, "more than allowed"),
    ({"prompt": "What?", "slice": 3, "colour": "red"}, 422, "colour"),
])
def test_bad_turns_are_4xx_json(three_turns, client, body, status, words):
    response = client.post(f"/v1/conversations/{three_turns['id']}/turns", json=body)
    assert response.status_code == status, response.text
    assert words in response.text


def test_unknown_conversation_and_volume_are_404(client):
    for method, path in (("GET", "/v1/conversations/nope"), ("GET", "/v1/conversations/nope/export"),
                         ("DELETE", "/v1/conversations/nope"), ("POST", "/v1/volumes/nope/conversations")):
        response = client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["message"]
    response = client.post("/v1/conversations/nope/turns", json={"prompt": "What?", "slice": 1})
    assert response.status_code == 404


def test_a_turn_over_the_budget_is_413_and_says_to_start_a_new_conversation(three_turns, client):
    small = client.post(f"/v1/volumes/{three_turns['volume_id']}/conversations", json={"budget_tokens": 512}).json()
    assert small["budget_tokens"] == 512
    response = client.post(f"/v1/conversations/{small['conversation_id']}/turns",
                           json={"prompt": "What is in this slice?", "slice": 3, "max_new_tokens": 300})
    assert response.status_code == 413, response.text
    assert "start a new conversation" in response.json()["error"]["message"]
    assert client.get(f"/v1/conversations/{small['conversation_id']}").json()["turns"] == []


def test_one_turn_at_a_time_and_a_conversation_outlives_its_volume(client, chest):
    volume_id = upload(client, chest)
    conversation_id = client.post(f"/v1/volumes/{volume_id}/conversations", json={}).json()["conversation_id"]
    running = client.post(f"/v1/conversations/{conversation_id}/turns",
                          json={"prompt": "Describe this slice in detail.", "slice": 5, "max_new_tokens": 400})
    assert running.status_code == 202
    second = client.post(f"/v1/conversations/{conversation_id}/turns", json={"prompt": "And?", "slice": 6})
    assert second.status_code == 409 and "already has a turn in progress" in second.json()["error"]["message"]
    assert client.delete(f"/v1/conversations/{conversation_id}").status_code == 409
    client.delete(f"/v1/jobs/{running.json()['job_id']}")
    ended = wait(client, running.json()["job_id"])["status"]
    assert ended in ("cancelled", "done")
    # A cancelled turn adds nothing to the conversation; one that finished first is kept.
    assert len(client.get(f"/v1/conversations/{conversation_id}").json()["turns"]) == (ended == "done")
    assert client.delete(f"/v1/volumes/{volume_id}").status_code in (200, 204)
    gone = client.post(f"/v1/conversations/{conversation_id}/turns", json={"prompt": "And?", "slice": 6})
    assert gone.status_code == 409 and "no longer on the server" in gone.json()["error"]["message"]
    exported = client.get(f"/v1/conversations/{conversation_id}/export", params={"format": "markdown"})
    assert exported.status_code == 200 and "# Conversation" in exported.text
