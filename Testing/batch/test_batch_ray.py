"""`citrusv batch --engine ray` on a local Ray instance with two CPU model actors.

The test process starts Ray once for the module (with room for exactly two one-CPU actors); the batch
command joins it with --ray-address, as a user's driver joins a cluster started with `ray start --head`.
"""
from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import (BAD_CASES, GOOD_CASES, batch_args, file_states, labelmap_voxels, manifest_entries,
                           run_batch, start_batch, wait_for_done_case)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'citrusv-backend[cluster]'")

pytestmark = [pytest.mark.model, pytest.mark.slow]

ACTOR_OPTIONS = ("--engine", "ray", "--ray-actors", "2", "--ray-cpus-per-actor", "1")


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, namespace="citrusv-tests", configure_logging=False,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def summary_values(out: Path) -> dict:
    """Every summary cell but the timing."""
    return {(row["case"], row["label"]): {k: v for k, v in row.items() if k != "seconds"}
            for row in csv.DictReader(open(out / "summary.csv"))}


def test_ray_engine_writes_the_same_labelmaps_and_summary_as_the_local_engine(
        ray_address, local_reference, batch_inputs: Path, tiny_checkpoint, work_dir):
    reference, local_run, inputs_before = local_reference
    assert local_run.returncode == 1, local_run.stderr
    out = work_dir / "out"
    run = run_batch(*batch_args(batch_inputs, out, tiny_checkpoint, *ACTOR_OPTIONS, "--ray-address", ray_address))
    assert run.returncode == 1, run.stderr
    assert "2 model actors" in run.stderr and "3 of 6 case(s) FAILED" in run.stderr
    entries = manifest_entries(out)
    assert {c for c, e in entries.items() if e["status"] == "done"} == set(GOOD_CASES)
    assert all(entries[c]["engine"] == "ray" for c in entries)
    for case in GOOD_CASES:
        for kind in ("labelmap", "segmentation"):
            path = entries[case]["outputs"][kind]
            assert np.array_equal(labelmap_voxels(out / path), labelmap_voxels(reference / path)), path
        labelmap = entries[case]["outputs"]["labelmap"]
        assert (out / labelmap).read_bytes() == (reference / labelmap).read_bytes(), "labelmap files differ"
        assert gzip.decompress((out / labelmap).read_bytes()) == gzip.decompress((reference / labelmap).read_bytes())
    for case in BAD_CASES:
        assert entries[case]["error"] == manifest_entries(reference)[case]["error"]
    assert summary_values(out) == summary_values(reference)
    assert file_states(batch_inputs) == inputs_before


def test_a_killed_actor_has_its_cases_retried_on_another(ray_address, chest_ct_path: Path, tiny_checkpoint, work_dir):
    inputs = work_dir / "in"
    inputs.mkdir()
    for number in range(6):
        shutil.copyfile(chest_ct_path, inputs / f"ct{number}.nrrd")
    out = work_dir / "out"
    # --ray-ship-inputs: the inputs travel through the object store, as on a cluster without shared storage.
    args = batch_args(inputs, out, tiny_checkpoint, *ACTOR_OPTIONS, "--ray-address", ray_address, "--ray-ship-inputs")
    process = start_batch(*args, log=work_dir / "log")
    try:
        wait_for_done_case(out, process)
        actors = ray.util.list_named_actors(all_namespaces=True)
        victim = next(n for n in actors if n["name"].startswith("citrusv-batch-"))
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
        assert process.wait(timeout=300) == 0, (work_dir / "log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
    log = (work_dir / "log").read_text()
    entries = manifest_entries(out)
    assert {e["status"] for e in entries.values()} == {"done"} and len(entries) == 6
    assert any(e["attempts"] > 1 for e in entries.values()), log
    assert "died" in log and "goes to the next free actor" in log and "shipped through the object store" in log
    first = labelmap_voxels(out / "ct0" / "ct0_seg.nii.gz")
    for case in entries:  # the same CT six times: the retried cases too
        assert np.array_equal(labelmap_voxels(out / case / f"{case}_seg.nii.gz"), first)


def test_an_unreachable_ray_head_is_a_usage_error_at_once(batch_inputs: Path, tiny_checkpoint, work_dir):
    run = run_batch(*batch_args(batch_inputs, work_dir / "out", tiny_checkpoint, "--engine", "ray",
                                "--ray-address", "127.0.0.1:1"))
    assert run.returncode == 2 and "cannot reach the Ray head at 127.0.0.1:1" in run.stderr
