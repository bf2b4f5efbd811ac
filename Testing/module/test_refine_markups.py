"""Refinement on the Slicer side with real MRML (slicer-core): markups in world RAS land on the voxel they mark
(oblique, flipped, parent transforms on the volume and on the markups), an ROI becomes its IJK box, steps from the
real backend (through the module's courier, as the panel sends them) land in the segment, Undo gives back the exact
labelmap, hand edits restart the session."""
from __future__ import annotations

import numpy as np
import pytest
import vtk

from module_helpers import run_until
from test_writers import add_volume, oblique_ijk_to_ras

pytestmark = pytest.mark.slicer

LEFT_LUNG = 6


def transform_node(scene, rotation_deg: float, translation, axis=(0.3, 1.0, 0.2)):
    import slicer

    transform = vtk.vtkTransform()
    transform.Translate(*translation)
    transform.RotateWXYZ(rotation_deg, *axis)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    assert isinstance(node, slicer.vtkMRMLLinearTransformNode)
    return node


def voxel_world(volume_node, ijk) -> np.ndarray:
    """Where voxel (i, j, k) is in the world: IJK->RAS, then the volume's transforms (independent of the code)."""
    import slicer

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ras = matrix.MultiplyPoint([*map(float, ijk), 1.0])[:3]
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_node.GetParentTransformNode(), None, to_world)
    return np.array(to_world.TransformPoint(ras))


GEOMETRIES = {"oblique": oblique_ijk_to_ras(), "oblique-flipped": oblique_ijk_to_ras(flips=(-1, -1, 1), degrees=-60),
              "lps-file": np.diag([-0.7, -0.7, 2.5, 1.0])}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("transforms", ["none", "volume", "volume-and-markups"])
def test_points_land_on_the_voxel_they_mark(mrml_scene, name, transforms):
    from CitrusVSlicerLib.refinement.segment import markup_points

    volume = add_volume(mrml_scene, np.zeros((7, 9, 11), np.int16), GEOMETRIES[name])
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    if transforms != "none":
        volume.SetAndObserveTransformNodeID(transform_node(mrml_scene, 31.0, (5.0, -12.0, 40.0)).GetID())
    if transforms == "volume-and-markups":
        # The markups under another transform whose parent is the volume's: positions are given in the world.
        outer = transform_node(mrml_scene, -17.0, (-3.0, 8.0, 1.5), axis=(1.0, 0.0, 0.4))
        outer.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        points.SetAndObserveTransformNodeID(outer.GetID())
    wanted = [(3, 4, 2), (10, 0, 6), (0, 8, 0), (5.25, 2.5, 3.75)]
    for ijk in wanted:
        index = points.AddControlPoint(vtk.vtkVector3d(0, 0, 0))
        points.SetNthControlPointPositionWorld(index, *voxel_world(volume, ijk))
    found = markup_points(volume, points, positive=False)
    assert [p["positive"] for p in found] == [False] * 4
    assert np.allclose([p["ijk"] for p in found], wanted, atol=1e-6)
    # An undefined point (being placed) is no prompt.
    points.AddControlPoint(vtk.vtkVector3d(0, 0, 0))
    points.UnsetNthControlPointPosition(4)
    assert len(markup_points(volume, points, True)) == 4


def test_an_roi_becomes_the_ijk_box_of_its_corners(mrml_scene):
    from CitrusVSlicerLib.refinement.segment import roi_box

    volume = add_volume(mrml_scene, np.zeros((7, 9, 11), np.int16), np.diag([-0.7, 1.2, 2.5, 1.0]))
    volume.SetAndObserveTransformNodeID(transform_node(mrml_scene, 0.0, (4.0, 5.0, 6.0)).GetID())
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    centre = voxel_world(volume, (5, 4, 3))
    roi.SetCenterWorld(*centre)
    roi.SetSize(0.7 * 4, 1.2 * 2, 0.0)  # as placed on an axial slice view: no thickness
    box = roi_box(volume, roi)
    assert np.allclose(box["ijk_min"], (3, 3, 3)) and np.allclose(box["ijk_max"], (7, 5, 3))


def test_a_segment_is_written_exactly_and_its_neighbours_stay(mrml_scene):
    from CitrusVSlicerLib.refinement.segment import read_segment, write_segment

    volume = add_volume(mrml_scene, np.zeros((6, 8, 10), np.int16), oblique_ijk_to_ras())
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    first = segmentation.GetSegmentation().AddEmptySegment("", "a")
    second = segmentation.GetSegmentation().AddEmptySegment("", "b")  # the same labelmap layer as "a"
    other = np.zeros((6, 8, 10), bool)
    other[0:2, 0:3, 0:3] = True
    write_segment(segmentation, second, volume, other)
    rng = np.random.default_rng(3)
    for _ in range(3):
        mask = rng.random((6, 8, 10)) > 0.7
        mask[0:2, 0:3, 0:3] = False
        write_segment(segmentation, first, volume, mask)
        assert np.array_equal(read_segment(segmentation, first, volume), mask)
        assert np.array_equal(read_segment(segmentation, second, volume), other)
    write_segment(segmentation, first, volume, np.zeros((6, 8, 10), bool))
    assert not read_segment(segmentation, first, volume).any()


# ---------------------------------------------------------------------------------------------- with the backend

def request_json(manager, method: str, path: str, body=None):
    """One request through the module's courier (what the panel's requests go through), answered by polling."""
    call = manager.transport.request(manager.local_target(), method, path, json_body=body)
    run_until(manager.transport.poll, lambda: call.done, 120)
    return call.json()


def upload(manager, target, volume_node) -> str:
    """The volume sent the panel's way (upload.py: the voxel file handed over, or streamed as the raw body)."""
    from CitrusVSlicerLib.upload import VolumeUpload
    from CitrusVSlicerLib.writers import volume_array_and_geometry

    voxels, ijk_to_ras = volume_array_and_geometry(volume_node)
    sent = VolumeUpload(manager.transport, target, voxels, ijk_to_ras, volume_node.GetName())
    sent.start()
    run_until(lambda: (manager.transport.poll(), sent.poll()), lambda: not sent.active, 120)
    assert sent.state == "done", sent.error
    return sent.volume_id


@pytest.fixture
def lung_scene(mrml_scene, chest_ct_path, chest_ct_segmentation_path, module_backend):
    """The chest CT's slices 12..21 as an oblique, flipped volume under a transform, with its left lung segment."""
    from citrusv_backend.volume.input.io import read_volume

    voxels = read_volume(chest_ct_path).voxels[12:22].copy()
    lung = read_volume(chest_ct_segmentation_path).voxels[12:22] == LEFT_LUNG
    volume = add_volume(mrml_scene, voxels, oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0, flips=(1, -1, 1)))
    volume.SetAndObserveTransformNodeID(transform_node(mrml_scene, 12.0, (10.0, -4.0, 2.0)).GetID())
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segment_id = segmentation.GetSegmentation().AddEmptySegment("Segment_1", "left lung")
    from CitrusVSlicerLib.refinement.segment import write_segment

    write_segment(segmentation, segment_id, volume, lung)
    volume_id = upload(module_backend, module_backend.local_target(), volume)
    return volume, segmentation, segment_id, volume_id, lung


class Stepper:
    """The controller with the module's sender (TransportSender: each request through the courier, the answer
    applied from Transport.poll()); `settle()` polls as the panel's timer does until no step is on its way."""

    def __init__(self, manager, controller, sender):
        self.manager, self.controller, self.sender = manager, controller, sender

    def settle(self) -> None:
        run_until(self.manager.transport.poll, lambda: not self.controller.busy and not self.sender.busy, 300)


def controller_for(module_backend, lung_scene, statuses):
    from CitrusVSlicerLib.refinement.segment import SegmentRefinement
    from CitrusVSlicerLib.refinement.controller import RefineController, TransportSender

    volume, segmentation, segment_id, volume_id, _ = lung_scene
    include = segmentation.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    exclude = segmentation.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    roi = segmentation.GetScene().AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    sender = TransportSender(module_backend.transport, module_backend.local_target())
    controller = RefineController(sender, lambda text, error: statuses.append((text, error)),
                                  settings={"axis": "axial", "window": "lung"}, options={"propagate": False})
    refinement = SegmentRefinement(volume_id, segmentation, segment_id, volume)
    controller.attach(refinement, include, exclude, roi)
    return Stepper(module_backend, controller, sender), refinement, include, exclude, roi


def place(node, volume, ijk) -> None:
    """What a click in a slice view does: a control point at that world position, defined."""
    node.AddControlPointWorld(vtk.vtkVector3d(*voxel_world(volume, ijk)))


def test_placements_refine_the_segment_and_undo_restores_it(module_backend, lung_scene):
    from CitrusVSlicerLib.refinement.segment import read_segment, roi_box

    volume, segmentation, segment_id, volume_id, lung = lung_scene
    statuses: list = []
    steps, refinement, include, exclude, roi = controller_for(module_backend, lung_scene, statuses)
    k, j, i = 5, *[int(v) for v in np.argwhere(lung[5]).mean(axis=0).round()]
    assert lung[k, j, i]
    place(exclude, volume, (i, j, k))          # the observer sends the step; the answer lands in the segment
    steps.settle()
    assert not any(error for _, error in statuses), statuses
    after = read_segment(segmentation, segment_id, volume)
    assert not after[k, j, i], "the excluded voxel left the segment"
    others = [s for s in range(lung.shape[0]) if s != k]
    assert np.array_equal(after[others], lung[others]) and not np.array_equal(after[k], lung[k])
    on_server = request_json(module_backend, "GET", refinement.path)
    assert on_server["version"] == refinement.version == 1 and on_server["slice_axis_ijk"] == refinement.slice_axis
    assert on_server["voxels"] == int(after.sum())

    steps.controller.undo()               # Ctrl+Z: one refinement, one step
    steps.settle()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), lung)
    steps.controller.redo()
    steps.settle()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), after)

    # A box drawn on slice 3 in a view aligned with the volume (the ROI under the volume's transform, along its axes).
    roi.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    axes = np.array([[ijk_to_ras.GetElement(r, c) for c in range(3)] for r in range(3)])
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes / np.linalg.norm(axes, axis=0)
    object_to_node[:3, 3] = [ijk_to_ras.MultiplyPoint([40, 60, 3, 1])[r] for r in range(3)]
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(object_to_node.ravel())
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    roi.SetCenter(*object_to_node[:3, 3])
    roi.SetSize(2.5 * 30, 2.2 * 20, 0.0)
    box = roi_box(volume, roi)
    assert np.allclose(box["ijk_min"], (25, 50, 3), atol=1e-6) and np.allclose(box["ijk_max"], (55, 70, 3), atol=1e-6)
    steps.controller.refine_box()
    steps.settle()
    boxed = read_segment(segmentation, segment_id, volume)
    rows, cols = np.nonzero(boxed[3])
    assert rows.size and rows.min() >= box["ijk_min"][1] - 0.5 and rows.max() <= box["ijk_max"][1] + 0.5
    assert cols.min() >= box["ijk_min"][0] - 0.5 and cols.max() <= box["ijk_max"][0] + 0.5
    assert np.array_equal(boxed[[s for s in range(10) if s != 3]], after[[s for s in range(10) if s != 3]])
    steps.controller.detach()


def test_a_hand_edit_restarts_the_session_and_stale_answers_are_refused(module_backend, lung_scene):
    from CitrusVSlicerLib.refinement.segment import StaleAnswer, read_segment, write_segment

    volume, segmentation, segment_id, volume_id, lung = lung_scene
    statuses: list = []
    steps, refinement, include, exclude, roi = controller_for(module_backend, lung_scene, statuses)
    place(include, volume, (60, 60, 4))
    steps.settle()
    assert refinement.version == 1
    edited = read_segment(segmentation, segment_id, volume)
    edited[7] = False                          # erased by hand in the Segment Editor
    write_segment(segmentation, segment_id, volume, edited)
    assert refinement.needs_restart()
    place(include, volume, (62, 58, 2))
    steps.settle()
    assert refinement.version == 1, "a fresh session, then one step"
    on_server = request_json(module_backend, "GET", refinement.path)
    assert not on_server["can_redo"] and on_server["undo_steps"] == 1
    now = read_segment(segmentation, segment_id, volume)
    assert not now[7].any(), "the hand edit was kept"
    steps.controller.undo()
    steps.settle()
    assert np.array_equal(read_segment(segmentation, segment_id, volume), edited)
    with pytest.raises(StaleAnswer, match="segment"):
        refinement.apply({"volume_id": volume_id, "segment": "another", "version": refinement.version + 1})
    with pytest.raises(StaleAnswer, match="version"):
        refinement.apply({"volume_id": volume_id, "segment": refinement.name, "version": refinement.version + 5})
    steps.controller.detach()
