"""*Ask about this slice* through real MRML (slicer-core): a slice view's plane -> the volume's (axis, index).

The truth is what the view really shows: Slicer's own slice logic reslices a volume whose every voxel holds its
own (k, j, i), and the values it puts on screen name the slice. Axial, coronal and sagittal views of oblique and
flipped volumes (turned to the volume's plane as "Rotate to volume plane" does), a view left in patient axes
over an oblique volume (refused), a view outside the volume (refused), and jumping the views back to a slice.
"""
from __future__ import annotations

import numpy as np
import pytest

from test_writers import add_volume, oblique_ijk_to_ras

pytestmark = pytest.mark.slicer

SHAPE = (9, 12, 14)   # (k, j, i)
VIEWS = {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}


def coded_volume(scene, matrix):
    """Voxel value = 1 + k * 10000 + j * 100 + i (0 is what a view shows outside the volume)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    volume = add_volume(scene, (1 + k * 10000 + j * 100 + i).astype(np.int32), matrix)
    volume.GetDisplayNode().SetInterpolate(0)   # nearest voxel: a blend of two codes would name no voxel
    return volume


def slice_view(scene, volume, name: str):
    """A slice view as Slicer's layout makes it: its own slice logic with the volume as background."""
    import slicer

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene._citrusv_logics[0])
    logic.SetMRMLScene(scene)
    node = logic.AddSliceNode(name)
    node.SetDimensions(96, 96, 1)
    node.SetFieldOfView(160.0, 160.0, 1.0)
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    scene._citrusv_views = getattr(scene, "_citrusv_views", []) + [logic]
    return node, logic


def shown_indices(logic, index_axis: int) -> set[int]:
    """The volume indices along `index_axis` (0 = i, 1 = j, 2 = k) of the voxels the view shows now."""
    from vtk.util import numpy_support

    reslice = logic.GetBackgroundLayer().GetReslice()
    reslice.Update()
    values = numpy_support.vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars()).astype(np.int64)
    values = values[values > 0] - 1
    digits = {0: values % 100, 1: (values // 100) % 100, 2: values // 10000}[index_axis]
    return set(digits.tolist())


MATRICES = {"oblique": oblique_ijk_to_ras(spacing=(1.6, 1.3, 3.0), degrees=17.0, flips=(1, -1, 1)),
            "oblique-flipped": oblique_ijk_to_ras(spacing=(1.2, 1.2, 2.5), degrees=-35.0, flips=(-1, -1, -1)),
            "axis-aligned": np.diag([0.8, 0.8, 2.0, 1.0])}


@pytest.mark.parametrize("matrix_name", MATRICES)
@pytest.mark.parametrize("view", VIEWS)
def test_a_view_turned_to_the_volume_names_the_slice_it_shows(mrml_scene, matrix_name, view):
    from CitrusVSlicerLib.conversation_scene import view_slice_of
    from CitrusVSlicerLib.view_slice import index_axis_of_slice_axis, slice_centre_ras

    matrix = MATRICES[matrix_name]
    volume = coded_volume(mrml_scene, matrix)
    node, logic = slice_view(mrml_scene, volume, view)
    getattr(node, f"SetOrientationTo{VIEWS[view].capitalize()}")()
    node.RotateToVolumePlane(volume)           # what the view's "Rotate to volume plane" does
    axis = VIEWS[view]
    index_axis = index_axis_of_slice_axis(matrix, axis)
    size = SHAPE[::-1][index_axis]
    for wanted in (0, size // 2 + 1, size - 1):
        node.JumpSliceByCentering(*slice_centre_ras(matrix, SHAPE, axis, wanted))  # in-axis too: the volume fills the view
        assert shown_indices(logic, index_axis) == {wanted}      # Slicer itself shows exactly that slice
        found = view_slice_of(mrml_scene, view, volume)
        assert (found.axis, found.index, found.index_axis) == (axis, wanted, index_axis)
    # Between two slices' centres, the nearer one.
    centre = slice_centre_ras(matrix, SHAPE, axis, 3)
    step = slice_centre_ras(matrix, SHAPE, axis, 4) - centre
    node.JumpSliceByOffsetting(*(centre + 0.3 * step))
    assert view_slice_of(mrml_scene, view, volume).index == 3


@pytest.mark.parametrize("view", VIEWS)
def test_a_view_in_patient_axes_over_an_oblique_volume_is_refused(mrml_scene, view):
    from CitrusVSlicerLib.conversation_scene import view_slice_of
    from CitrusVSlicerLib.view_slice import ViewNotAligned, index_axis_of_slice_axis

    matrix = MATRICES["oblique"]
    volume = coded_volume(mrml_scene, matrix)
    node, logic = slice_view(mrml_scene, volume, view)
    getattr(node, f"SetOrientationTo{VIEWS[view].capitalize()}")()
    centre = matrix @ np.r_[(np.array(SHAPE[::-1]) - 1) / 2.0, 1.0]
    node.JumpSliceByCentering(*centre[:3])
    assert len(shown_indices(logic, index_axis_of_slice_axis(matrix, VIEWS[view]))) > 1   # it cuts across slices
    with pytest.raises(ViewNotAligned, match=f"{view} view is not aligned with CT's slices.*Rotate to volume plane"):
        view_slice_of(mrml_scene, view, volume)


def test_a_view_beside_the_volume_is_refused_and_an_unknown_view_too(mrml_scene):
    from CitrusVSlicerLib.conversation_scene import view_slice_of
    from CitrusVSlicerLib.view_slice import ViewNotAligned

    volume = coded_volume(mrml_scene, MATRICES["oblique"])
    node, _ = slice_view(mrml_scene, volume, "Red")
    node.RotateToVolumePlane(volume)
    node.SetSliceOffset(node.GetSliceOffset() + 500.0)
    with pytest.raises(ViewNotAligned, match="Red view shows no slice of CT"):
        view_slice_of(mrml_scene, "Red", volume)
    with pytest.raises(ViewNotAligned, match="no Yellow view"):
        view_slice_of(mrml_scene, "Yellow", volume)


def test_a_volume_under_a_transform_is_mapped_in_world_coordinates(mrml_scene):
    import vtk

    from CitrusVSlicerLib.conversation_scene import view_slice_of
    from CitrusVSlicerLib.view_slice import slice_centre_ras

    matrix = MATRICES["oblique"]
    volume = coded_volume(mrml_scene, matrix)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = vtk.vtkMatrix4x4()
    moved.SetElement(0, 3, 30.0)
    moved.SetElement(2, 3, -12.0)
    transform.SetMatrixTransformToParent(moved)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node, logic = slice_view(mrml_scene, volume, "Green")
    node.SetOrientationToCoronal()
    node.RotateToVolumePlane(volume)
    world = np.array([[moved.GetElement(r, c) for c in range(4)] for r in range(4)]) @ matrix
    node.JumpSliceByCentering(*slice_centre_ras(world, SHAPE, "coronal", 5))
    found = view_slice_of(mrml_scene, "Green", volume)
    assert (found.axis, found.index) == ("coronal", 5) and shown_indices(logic, found.index_axis) == {5}
    node.SetSliceOffset(node.GetSliceOffset() + 2 * 1.3)     # two slices on (j spacing 1.3 mm)
    assert shown_indices(logic, found.index_axis) == {view_slice_of(mrml_scene, "Green", volume).index}


def test_roi_voxels_and_the_slice_an_roi_question_is_asked_on():
    from CitrusVSlicerLib.view_slice import roi_voxels, slice_for_roi

    roi = roi_voxels({"ijk_min": [2.4, -3.0, 4.5], "ijk_max": [6.6, 5.2, 4.6]}, SHAPE)
    # Voxels whose centres lie inside, clipped to the volume; a box thinner than a voxel keeps the voxel it is in.
    assert roi == {"ijk_min": [3, 0, 5], "ijk_max": [6, 5, 5]}
    matrix = np.diag([1.0, 1.0, 2.0, 1.0])
    assert slice_for_roi(roi, matrix, "sagittal", view_index=5) == 5     # the view's slice lies in the ROI
    assert slice_for_roi(roi, matrix, "sagittal", view_index=9) == 4     # it does not: the ROI's middle
    assert slice_for_roi(roi, matrix, "axial") == 5
    with pytest.raises(ValueError, match="outside the volume"):
        roi_voxels({"ijk_min": [20, 0, 0], "ijk_max": [25, 3, 3]}, SHAPE)


def test_selecting_a_turn_jumps_the_views_to_its_slice(mrml_scene):
    from CitrusVSlicerLib.conversation_scene import jump_to_turn, view_slice_of

    matrix = MATRICES["oblique-flipped"]
    volume = coded_volume(mrml_scene, matrix)
    nodes = {}
    for view, axis in VIEWS.items():
        nodes[view], _ = slice_view(mrml_scene, volume, view)
        getattr(nodes[view], f"SetOrientationTo{axis.capitalize()}")()
        nodes[view].RotateToVolumePlane(volume)
    for turn in ({"axis": "axial", "slice": 6}, {"axis": "coronal", "slice": 2},
                 {"axis": "sagittal", "slice": 11, "roi": {"ijk_min": [9, 1, 2], "ijk_max": [12, 4, 3]}}):
        jump_to_turn(mrml_scene, volume, turn)
        view = next(v for v, p in VIEWS.items() if p == turn["axis"])
        assert view_slice_of(mrml_scene, view, volume).index == turn["slice"]
    # The ROI turn put the other views through the ROI's middle: j = 2.5 -> the coronal view shows j 2 or 3.
    assert view_slice_of(mrml_scene, "Green", volume).index in (2, 3)


def test_the_question_takes_the_views_slice_or_a_placed_roi(mrml_scene):
    from CitrusVSlicerLib.conversation_scene import question_for
    from CitrusVSlicerLib.view_slice import ViewNotAligned, slice_centre_ras
    from CitrusVSlicerLib.writers import write_boxes

    matrix = MATRICES["oblique"]
    volume = coded_volume(mrml_scene, matrix)
    red, _ = slice_view(mrml_scene, volume, "Red")
    red.SetOrientationToAxial()
    red.JumpSliceByCentering(*slice_centre_ras(matrix, SHAPE, "axial", 4))
    with pytest.raises(ValueError, match="Type a question"):
        question_for(mrml_scene, volume, "Red", "  ")
    with pytest.raises(ViewNotAligned, match="not aligned"):            # patient axes over an oblique volume
        question_for(mrml_scene, volume, "Red", "what is this?")
    # An ROI drawn over voxels i 3..6, j 2..8, k 1..5: asked on its middle axial slice, the view's plane.
    [roi] = write_boxes(mrml_scene, [{"label": "region", "index_min_kji": [0.5, 1.5, 2.5],
                                      "index_max_kji": [5.5, 8.5, 6.5]}], volume)
    question = question_for(mrml_scene, volume, "Red", "what is this?", "lung", roi)
    assert question.roi == {"ijk_min": [3, 2, 1], "ijk_max": [6, 8, 5]}
    assert (question.axis, question.slice, question.window, question.view) == ("axial", 3, "lung", "Red")
    red.RotateToVolumePlane(volume)                                       # now the view shows slice 4 of the ROI
    red.JumpSliceByCentering(*slice_centre_ras(matrix, SHAPE, "axial", 4))
    question = question_for(mrml_scene, volume, "Red", "what is this?", None, roi)
    assert (question.axis, question.slice) == ("axial", 4)
    assert question_for(mrml_scene, volume, "Red", " what is this? ").body() == {
        "prompt": "what is this?", "slice": 4, "axis": "axial", "window": None, "roi": None, "propagate": False}
