"""The `citrusv` command as a user runs it: a real subprocess with the tiny checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from citrusv_backend import __version__

PROMPT = "Please help segment the left lung in this scan."


def citrusv(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "citrusv_backend.cli", *args], capture_output=True, encoding="utf-8",
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.unit
def test_help_lists_only_built_commands_and_version():
    help_text = citrusv("--help")
    assert help_text.returncode == 0
    for command in ("infer", "segment", "detect", "report", "eval", "make-tiny-checkpoint", "demo"):
        assert command in help_text.stdout
    version = citrusv("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"citrusv {__version__}"
    unknown = citrusv("frobnicate")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


@pytest.mark.model
def test_infer_writes_json_and_npz_matching_the_engine(tiny_checkpoint, tiny_engine, ct_slice_rgb, work_dir: Path):
    image_path = work_dir / "slice.png"
    Image.fromarray(ct_slice_rgb).save(image_path)
    prefix = work_dir / "out" / "case1"
    run = citrusv("infer", "--model", str(tiny_checkpoint), "--image", str(image_path), "--prompt", PROMPT,
                  "--answer", "Sure, it is [SEG].", "--task", "segment", "--out", str(prefix))
    assert run.returncode == 0, run.stderr
    assert "RANDOM WEIGHTS" in run.stderr and "NOISE" in run.stderr
    payload = json.loads(prefix.with_suffix(".json").read_text())
    assert payload["text"] == "Sure, it is [SEG]." and payload["random_weights"] is True
    assert payload["resized_size"] == [140, 140] and payload["image_grid_thw"] == [1, 10, 10]
    assert payload["input_ids"][-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n
    assert set(payload["timings"]) >= {"preprocess_s", "forced_prefill_s", "sam2_image_encoder_s", "mask_decoder_s"}
    arrays = np.load(prefix.with_suffix(".npz"))
    assert set(arrays.files) == {"low_res_logits", "masks", "seg_hidden", "seg_embedding", "iou", "object_score"}
    expected = tiny_engine.segment(ct_slice_rgb, PROMPT).arrays()
    assert np.allclose(arrays["low_res_logits"], expected["low_res_logits"], atol=1e-5)
    assert np.array_equal(arrays["masks"], expected["masks"])


@pytest.mark.model
def test_infer_bad_image_fails_fast_with_a_message(tiny_checkpoint, work_dir: Path):
    bad = work_dir / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    run = citrusv("infer", "--model", str(tiny_checkpoint), "--image", str(bad), "--prompt", PROMPT,
                  "--out", str(work_dir / "x"))
    assert run.returncode == 2
    assert "not a readable image" in run.stderr and "Traceback" not in run.stderr
    assert "loading model" not in run.stderr, "the image must be checked before the model is loaded"


@pytest.mark.model
def test_missing_model_says_how_to_get_it(work_dir: Path):
    image = work_dir / "slice.png"
    Image.new("RGB", (64, 64)).save(image)
    run = citrusv("infer", "--model", "jdh-algo/Citrus-V-8B-v1.0", "--image", str(image), "--prompt", PROMPT,
                  "--out", str(work_dir / "x"), env={"HF_HUB_CACHE": str(work_dir / "cache")})
    assert run.returncode == 2 and "citrusv download jdh-algo/Citrus-V-8B-v1.0" in run.stderr
    assert "Browse…" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.model
def test_make_tiny_checkpoint_command(work_dir: Path):
    run = citrusv("make-tiny-checkpoint", str(work_dir / "tiny"), "--legacy-key-names")
    assert run.returncode == 0, run.stderr
    assert "RANDOM" in run.stderr
    index = json.loads((work_dir / "tiny" / "model.safetensors.index.json").read_text())
    assert any(key.startswith("mllm.model.layers.") for key in index["weight_map"])


@pytest.mark.model
def test_demo_runs_the_main_job_and_says_where_results_are(tiny_checkpoint, work_dir: Path):
    run = citrusv("demo", "--model", str(tiny_checkpoint), "--out", str(work_dir / "demo"), "--slice-range", "15:19")
    assert run.returncode == 0, run.stderr
    assert "RANDOM WEIGHTS" in run.stderr and "results in" in run.stderr and "left lung" in run.stderr
    for name in ("CTChest4_seg.nii.gz", "CTChest4_seg.seg.nrrd", "CTChest4_labels.json", "CTChest4_findings.json",
                 "CTChest4_findings.tsv", "CTChest4_report.md", "CTChest4_preview.png"):
        assert (work_dir / "demo" / name).is_file(), name


@pytest.mark.model
def test_segment_then_eval_against_itself_and_the_ground_truth(tiny_checkpoint, chest_ct_path, chest_ct_segmentation_path,
                                                               work_dir: Path):
    import SimpleITK as sitk

    run = citrusv("segment", str(chest_ct_path), "--model", str(tiny_checkpoint), "--prompt",
                  "segment the right lung and the left lung", "--out", str(work_dir / "seg"), "--mode", "per-slice",
                  "--slice-range", "16:18", "--window", "lung")
    assert run.returncode == 0, run.stderr
    assert "[per-slice: right lung (1/2)]" in run.stderr and "segment 2 'left lung'" in run.stderr
    prediction = work_dir / "seg" / "CTChest4_seg.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    assert labels.shape == (34, 128, 128) and not labels[:16].any() and not labels[18:].any()
    same = citrusv("eval", str(prediction), str(prediction))
    assert same.returncode == 0, same.stderr
    rows = json.loads(same.stdout)
    assert {row["name"] for row in rows} <= {"right lung", "left lung"}
    assert all(row["dice"] == 1.0 for row in rows)
    truth = citrusv("eval", str(prediction), str(chest_ct_segmentation_path), "--pair", "1:5", "--pair", "2:6")
    assert truth.returncode == 0, truth.stderr
    pairs = json.loads(truth.stdout)
    assert [row["name"] for row in pairs] == ["right lung", "left lung"]  # names from the ground truth's segments
    assert all(0.0 <= row["dice"] <= 1.0 for row in pairs)


@pytest.mark.model
def test_segment_rejects_bad_volumes_before_loading_the_model(tiny_checkpoint, work_dir: Path):
    broken = work_dir / "broken.nii.gz"
    broken.write_bytes(b"garbage")
    run = citrusv("segment", str(broken), "--model", str(tiny_checkpoint), "--prompt", "segment the liver",
                  "--out", str(work_dir / "x"))
    assert run.returncode == 2 and "not a readable volume" in run.stderr and "loading model" not in run.stderr
    assert not (work_dir / "x").exists()


@pytest.mark.model
def test_infer_puts_the_image_where_the_prompts_image_tag_is(tiny_checkpoint, work_dir: Path):
    """The reference's query form `<image>\\n...` (its inference script, its evals): the image block replaces the
    tag and the newline after it stays, as ms-swift's template does; the tag is not left as text."""
    image_path = work_dir / "slice.png"
    Image.new("RGB", (64, 64), (80, 80, 80)).save(image_path)
    prefix = work_dir / "tagged"
    run = citrusv("infer", "--model", str(tiny_checkpoint), "--image", str(image_path), "--prompt",
                  "<image>\nPlease help segment the liver in this scan.", "--answer", "Sure, it is [SEG].",
                  "--task", "segment", "--out", str(prefix))
    assert run.returncode == 0, run.stderr
    ids = json.loads(prefix.with_suffix(".json").read_text())["input_ids"]
    user = ids.index(872)  # "user", after <|im_start|>
    assert ids[user + 1: user + 3] == [198, 151652]  # "\n" then <|vision_start|>: nothing before the image
    after = ids.index(151653)  # <|vision_end|>
    assert ids[after + 1] == 198 and ids[after + 2: after + 4] == [5501, 1492]  # "\n", "Please", " help"
    assert 27 not in ids[after:]  # no "<" of a literal "<image>"
