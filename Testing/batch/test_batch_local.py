"""`citrusv batch` with the local engine, run as a user runs it, on a folder built from the real chest CT."""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import (BAD_CASES, GOOD_CASES, PROMPT, batch_args, file_states, labelmap_voxels, manifest_entries,
                           run_batch, start_batch, wait_for_done_case)

pytestmark = [pytest.mark.model, pytest.mark.slow]

OUTPUT_KINDS = {"labelmap", "labels", "segmentation", "findings_json", "findings_tsv", "report", "preview"}


def case_folders(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}


def lines_per_case(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        case = line.split('"case": "', 1)[1].split('"', 1)[0]
        counts[case] = counts.get(case, 0) + 1
    return counts


def test_good_cases_get_outputs_bad_ones_errors_and_the_input_is_untouched(local_reference, batch_inputs: Path):
    out, run, inputs_before = local_reference
    assert run.returncode == 1, run.stderr
    assert "3 of 6 case(s) FAILED" in run.stderr and "1 other file(s) ignored" in run.stderr
    assert "RANDOM WEIGHTS" in run.stderr
    entries = manifest_entries(out)
    assert set(entries) == set(GOOD_CASES) | set(BAD_CASES)
    for case, relative in GOOD_CASES.items():
        entry = entries[case]
        assert entry["status"] == "done" and entry["error"] is None and entry["input"] == relative
        assert entry["input_sha256"] == hashlib.sha256((batch_inputs / relative).read_bytes()).hexdigest()
        assert entry["prompts"] == [PROMPT] and entry["options"]["slice_range"] == [15, 18]
        assert entry["model"]["fingerprint"] and entry["code_version"] and entry["timings"]["pipeline_s"] > 0
        assert set(entry["outputs"]) == OUTPUT_KINDS
        for path in entry["outputs"].values():
            assert path.startswith(f"{case}/{case}_") and (out / path).is_file()
        assert labelmap_voxels(out / entry["outputs"]["labelmap"]).shape == (34, 128, 128)
        assert entry["segments"][0]["name"] == "left lung" and entry["segments"][0]["volume_ml"] is not None
    assert "truncated" in entries["corrupt"]["error"]
    assert "a 2D image" in entries["flat2d"]["error"]
    assert "not a readable volume" in entries["notes"]["error"]
    assert all(entries[case]["status"] == "failed" and not entries[case]["outputs"] for case in BAD_CASES)
    assert case_folders(out) == set(GOOD_CASES)
    assert not (out / ".staging").exists()
    assert file_states(batch_inputs) == inputs_before, "the input folder was written"

    rows = list(csv.DictReader(open(out / "summary.csv")))
    expected = {c: "done" for c in GOOD_CASES} | {c: "failed" for c in BAD_CASES}
    assert {row["case"]: row["status"] for row in rows} == expected
    chest = next(row for row in rows if row["case"] == "chest")
    assert float(chest["volume_ml"]) == pytest.approx(entries["chest"]["segments"][0]["volume_ml"], abs=0.01)
    assert float(chest["long_axis_mm"]) > 0 and float(chest["seconds"]) > 0
    assert next(row for row in rows if row["case"] == "flat2d")["error"] == entries["flat2d"]["error"]
    page = (out / "index.html").read_text()
    for case in GOOD_CASES:
        assert f'src="{case}/{case}_preview.png"' in page
    assert all(case in page for case in BAD_CASES) and "RANDOM WEIGHTS" in page


def test_labelmaps_are_those_of_the_volume_pipeline(local_reference, batch_inputs: Path, tiny_engine):
    """The batch runs the very pipeline of `citrusv segment`: the same labels, voxel for voxel."""
    from citrusv_backend.volume.input.io import read_volume
    from citrusv_backend.volume.options import VolumeOptions
    from citrusv_backend.volume.tasks.pipeline import VolumePipeline

    out = local_reference[0]
    volume = read_volume(batch_inputs / "chest.nrrd")
    options = VolumeOptions(mode="per-slice", slice_range=(15, 18))
    result = VolumePipeline(tiny_engine).run(volume, PROMPT, "segment", options)
    assert np.array_equal(labelmap_voxels(out / "chest" / "chest_seg.nii.gz"), result.labels)


def test_killed_run_is_completed_by_a_rerun_without_touching_done_cases(batch_inputs: Path, tiny_checkpoint, work_dir):
    out = work_dir / "out"
    args = batch_args(batch_inputs, out, tiny_checkpoint)
    process = start_batch(*args, log=work_dir / "first.log")
    try:
        wait_for_done_case(out, process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    done = {case for case, entry in manifest_entries(out).items() if entry["status"] == "done"}
    assert done and done < set(GOOD_CASES), "the kill should fall between the first and the last good case"
    assert case_folders(out) == done, "a case folder appears only once the case is complete"
    states = {case: file_states(out / case) for case in done}
    counts = lines_per_case(out)

    rerun = run_batch(*args)
    assert rerun.returncode == 1, rerun.stderr
    entries = manifest_entries(out)
    assert {c for c, e in entries.items() if e["status"] == "done"} == set(GOOD_CASES)
    for case in done:
        assert file_states(out / case) == states[case], f"{case} was rewritten"
        assert lines_per_case(out)[case] == counts[case], f"{case} was run again"
    assert case_folders(out) == set(GOOD_CASES) and not (out / ".staging").exists()
    assert f"{len(done)} unchanged, kept" in rerun.stderr


def test_changed_prompt_redoes_only_the_affected_cases(local_reference, batch_inputs: Path, tiny_checkpoint, work_dir):
    reference = local_reference[0]
    out = work_dir / "out"
    shutil.copytree(reference, out)  # copy2 keeps the modification times
    states = {case: file_states(out / case) for case in GOOD_CASES}
    prompts = work_dir / "prompts.yaml"
    prompts.write_text("sub: segment the right lung\n")
    run = run_batch(*batch_args(batch_inputs, out, tiny_checkpoint, "--prompts-file", str(prompts)))
    assert run.returncode == 1, run.stderr
    entries = manifest_entries(out)
    assert entries["sub__chest"]["prompt"] == "segment the right lung" and entries["sub__chest"]["status"] == "done"
    assert entries["sub__chest"]["segments"][0]["name"] == "right lung"
    assert file_states(out / "sub__chest") != states["sub__chest"]
    assert "right lung" in (out / "sub__chest" / "sub__chest_labels.json").read_text()
    for case in ("chest", "chest_copy"):
        assert file_states(out / case) == states[case]
    assert "2 unchanged, kept" in run.stderr


@pytest.mark.parametrize("signal_number, exit_code, message, done_cases", [
    # Ctrl-C: the case under way (if any: the signal may fall between two cases) is finished first.
    (signal.SIGINT, 130, "stopping after the current case", {1, 2}),
    # A scheduler's stop: the case under way is cancelled at the model's next batch, nothing of it kept.
    (signal.SIGTERM, 143, "stopping now: the current case is cancelled", {1}),
])
def test_a_signal_stops_the_batch_cleanly(batch_inputs: Path, tiny_checkpoint, work_dir, signal_number, exit_code,
                                          message, done_cases):
    out = work_dir / "out"
    # 12 slices per case: three model batches, so the cancellation is seen in the middle of the second case.
    args = batch_args(batch_inputs, out, tiny_checkpoint, "--workers", "1", "--slice-range", "10:22")
    process = start_batch(*args, log=work_dir / "log")
    try:
        wait_for_done_case(out, process)
        process.send_signal(signal_number)
        assert process.wait(timeout=120) == exit_code
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    log = (work_dir / "log").read_text()
    assert message in log and "rerun the same command" in log
    done = {c for c, e in manifest_entries(out).items() if e["status"] == "done"}
    assert len(done) in done_cases and case_folders(out) == done
    assert not (out / ".staging").exists()
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert "not run" in {row["status"] for row in rows}


def test_one_model_process_per_device_gives_the_same_labelmaps(local_reference, batch_inputs: Path, tiny_checkpoint,
                                                               work_dir):
    """The several-GPU structure (a model process per device), exercised with two CPU 'devices'."""
    out = work_dir / "out"
    run = run_batch(*batch_args(batch_inputs, out, tiny_checkpoint, "--device", "cpu,cpu", "--pattern", "chest*"))
    assert run.returncode == 0, run.stderr
    assert "2 models (cpu, cpu)" in run.stderr
    entries = manifest_entries(out)
    assert set(entries) == set(GOOD_CASES) and len({e["worker"] for e in entries.values()}) >= 1
    for case in GOOD_CASES:
        name = f"{case}/{case}_seg.nii.gz"
        assert (out / name).read_bytes() == (local_reference[0] / name).read_bytes()
