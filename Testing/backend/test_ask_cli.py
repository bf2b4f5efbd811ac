"""`citrusv ask` as a user runs it: a question on a slice, the answer on stdout, the conversation saved and
continued with a text-only follow-up; bad questions exit 2 with one line, before the model loads."""
from __future__ import annotations

import json

import pytest

from test_cli import citrusv


@pytest.mark.model
@pytest.mark.slow
def test_ask_then_continue_the_saved_conversation(tiny_checkpoint, chest_ct_path, work_dir):
    saved = work_dir / "chest.json"
    out = work_dir / "out"
    first = citrusv("ask", str(chest_ct_path), "--model", str(tiny_checkpoint), "--device", "cpu", "--prompt",
                    "What is in this slice?", "--slice", "17", "--roi", "10,20,15:100,90,20", "--max-new-tokens", "4",
                    "--conversation", str(saved), "--out", str(out))
    assert first.returncode == 0, first.stderr
    conversation = json.loads(saved.read_text())
    [turn] = conversation["turns"]
    assert first.stdout == turn["answer"] + "\n"
    assert (turn["slice"], turn["axis"], turn["roi"]) == (17, "axial", {"ijk_min": [10, 20, 15], "ijk_max": [100, 90, 20]})
    assert turn["random_weights"] is True and turn["model"] == tiny_checkpoint.name
    assert "RANDOM WEIGHTS" in first.stderr and "turn 1 of conversation" in first.stderr
    assert (out / "CTChest4_turn1_seg.nii.gz").is_file() and (out / "CTChest4_turn1_findings.json").is_file()

    second = citrusv("ask", str(chest_ct_path), "--model", str(tiny_checkpoint), "--device", "cpu", "--prompt",
                     "And how large is it?", "--max-new-tokens", "4", "--conversation", str(saved), "--out", str(out))
    assert second.returncode == 0, second.stderr
    conversation = json.loads(saved.read_text())
    assert [t["number"] for t in conversation["turns"]] == [1, 2]
    assert conversation["turns"][1]["slice"] is None and conversation["turns"][1]["masks_on_turn"] == 1
    assert conversation["turns"][1]["prompt_tokens"] > conversation["turns"][0]["prompt_tokens"]
    markdown = (out / "CTChest4_conversation.md").read_text()
    assert "## Turn 2" in markdown and "text only (masks and boxes on turn 1's image)" in markdown


@pytest.mark.parametrize("extra, words", [
    (["--slice", "99"], "outside the volume's 0:34"),
    (["--slice", "3", "--roi", "1,2"], "--roi"),
])
def test_bad_questions_exit_2_before_the_model_loads(chest_ct_path, work_dir, extra, words):
    run = citrusv("ask", str(chest_ct_path), "--model", str(work_dir / "no-such-model"), "--prompt", "What?",
                  "--out", str(work_dir / "out"), *extra)
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert "loading model" not in run.stderr


def test_a_damaged_conversation_file_is_refused(chest_ct_path, work_dir):
    broken = work_dir / "broken.json"
    broken.write_text("{not json")
    run = citrusv("ask", str(chest_ct_path), "--prompt", "What?", "--slice", "3", "--conversation", str(broken),
                  "--out", str(work_dir / "out"))
    assert run.returncode == 2 and "not a readable conversation file" in run.stderr, run.stderr
