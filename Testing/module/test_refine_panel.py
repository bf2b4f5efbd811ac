"""Refinement the way the panel drives it (CitrusVSlicerLib/logic.py, refinement/scene.py), with real MRML and the real
backend: a real segmentation job, its segment tagged with the job, the Apply's upload reused, each placement one
request through the HTTP courier answered from `Transport.poll()`, no Python thread on the main side; a raw-body
upload when the backend has no handover folder (a remote); closing the scene stops it; the self-test's steps."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import vtk

from test_refine_markups import voxel_world
from test_writers import add_volume, oblique_ijk_to_ras

pytestmark = [pytest.mark.slicer, pytest.mark.service]


class ThreadWatch:
    """Called where the panel's loop hands Slicer its events: records every Python thread that appears."""

    def __init__(self):
        self.before = {thread.ident for thread in threading.enumerate()}
        self.new: set[str] = set()
        self.ticks = 0

    def __call__(self) -> None:
        self.ticks += 1
        self.new |= {thread.name for thread in threading.enumerate() if thread.ident not in self.before}


@pytest.fixture
def logic(module_backend, mrml_scene, monkeypatch):
    from CitrusVSlicerLib.upload import UploadCache
    from CitrusVSlicerLib.logic import ModuleLogic

    monkeypatch.setattr(module_backend, "uploads", UploadCache(), raising=False)  # this test's uploads only
    watch = ThreadWatch()
    logic = ModuleLogic(module_backend, mrml_scene, process_events=watch)
    logic.watch = watch
    yield logic
    logic.stopRefine()


def chest_volume(scene, chest_ct_path, transform: bool = False):
    from citrusv_backend.volume.input.io import read_volume

    voxels = read_volume(chest_ct_path).voxels[12:20].copy()
    volume = add_volume(scene, voxels, oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0))
    if transform:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        moved = vtk.vtkTransform()
        moved.Translate(6.0, -3.0, 11.0)
        moved.RotateWXYZ(9.0, 0.2, 1.0, 0.1)
        node.SetMatrixTransformToParent(moved.GetMatrix())
        volume.SetAndObserveTransformNodeID(node.GetID())
    return volume


def test_a_segment_from_a_job_is_refined_through_the_courier_on_the_apply_upload(logic, mrml_scene, chest_ct_path):
    from CitrusVSlicerLib import selftest
    from CitrusVSlicerLib.refinement.segment import JOB_TAG, LABEL_TAG, read_segment, segment_tag

    volume = chest_volume(mrml_scene, chest_ct_path)
    target = logic.backend.local_target()
    written = logic.process(volume, "segment", "segment the left lung",
                            {"mode": "per-slice", "slice_range": [3, 5], "window": "lung"}, timeout=300, target=target)
    segmentation, segment_id = written["segmentation"], written["segment_ids"][0]
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment_tag(segment, JOB_TAG) == logic._apply.runner.job_id and segment_tag(segment, LABEL_TAG)
    mask = read_segment(segmentation, segment_id, volume)
    assert mask[3:5].any(), "the tiny model's segment should not be empty on these slices"
    applied_upload = logic._apply.runner.volume_id

    # Refine starts on the volume the Apply uploaded: no second upload, straight to placing points.
    statuses = []
    refinement = logic.startRefine(target, volume, segmentation, segment_id, {}, {"propagate": False},
                                   lambda text, error: statuses.append((text, error)))
    assert refinement.state == "ready" and refinement._upload is None
    assert refinement.refinement.volume_id == applied_upload
    logic.stopRefine()

    # The self-test's own step inside Slicer: an exclude click on a voxel of the segment, then Undo (exact).
    assert selftest.refine_and_undo(logic, target, volume, segmentation, segment_id, log=lambda line: None)
    assert logic.watch.ticks > 0 and not logic.watch.new, f"Python threads started on the main side: {logic.watch.new}"
    assert not [text for text, error in statuses if error]


def test_a_remote_style_backend_gets_the_volume_as_a_raw_body_and_a_step_lands(logic, mrml_scene, chest_ct_path):
    """No handover folder (what a remote server is): the refinement uploads the voxels itself, once, as the raw
    octet-stream body, under a parent transform; a click on slice 4 changes slice 4 only (no propagation)."""
    from CitrusVSlicerLib.endpoints import Target
    from CitrusVSlicerLib.refinement.segment import read_segment, write_segment

    volume = chest_volume(mrml_scene, chest_ct_path, transform=True)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segment_id = segmentation.GetSegmentation().AddEmptySegment("Segment_1", "box")
    mask = np.zeros(volume.GetImageData().GetDimensions()[::-1], bool)
    mask[2:7, 40:90, 30:80] = True
    write_segment(segmentation, segment_id, volume, mask)
    local = logic.backend.local_target()
    remote_like = Target(local.url, local.token)  # same server, but no handover: the body carries the voxels
    statuses = []
    refinement = logic.startRefine(remote_like, volume, segmentation, segment_id, {"window": "lung", "axis": "axial"},
                                   {"propagate": False}, lambda text, error: statuses.append((text, error)))
    assert refinement.state == "uploading"
    logic.pollUntil(lambda: refinement.state != "uploading", 120, "the refinement's upload")
    assert refinement.state == "ready", statuses
    volume_id = refinement.refinement.volume_id
    assert logic.backend.uploads.find(remote_like, volume, _ijk_to_ras(volume)) == volume_id

    world = voxel_world(volume, (55, 60, 4))
    refinement.exclude.AddControlPointWorld(vtk.vtkVector3d(*world))
    logic.pollUntil(lambda: refinement.can_undo and not refinement.busy, 300, "the step")
    after = read_segment(segmentation, segment_id, volume)
    assert not after[4, 60, 55], statuses
    others = [k for k in range(mask.shape[0]) if k != 4]
    assert np.array_equal(after[others], mask[others])
    assert not logic.watch.new
    # A second start finds the upload this one made (the cache is keyed by backend, node, content and geometry).
    again = logic.startRefine(remote_like, volume, segmentation, segment_id, {}, {"propagate": False})
    assert again.state == "ready" and again.refinement.volume_id == volume_id


def test_closing_the_scene_stops_refinement_and_drops_its_upload(logic, mrml_scene, chest_ct_path):
    from CitrusVSlicerLib.refinement.segment import write_segment

    volume = chest_volume(mrml_scene, chest_ct_path)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("Segment_1", "box")
    write_segment(segmentation, segment_id, volume, np.ones(volume.GetImageData().GetDimensions()[::-1], bool))
    statuses = []
    refinement = logic.startRefine(logic.backend.local_target(), volume, segmentation, segment_id, {}, {},
                                   lambda text, error: statuses.append((text, error)))
    assert refinement.state == "uploading"
    handover = refinement._upload._writer.path
    mrml_scene.Clear(0)
    assert refinement.state == "stopped" and refinement._upload.state == "cancelled"
    assert not handover.exists(), "the cancelled upload's file is removed"
    logic.pollUntil(lambda: not logic.backend.transport.busy, 30, "the courier")
    assert not [text for text, error in statuses if error] and refinement.refinement is None


def _ijk_to_ras(volume):
    from CitrusVSlicerLib.geometry import ijk_to_ras_matrix

    return ijk_to_ras_matrix(volume)

