"""Writing backend results into the MRML scene: segments, a findings table with its report, ROI boxes.

MRML only (works in Slicer and in the `slicer-core` wheel); no Qt, no slicer.app. Masks arrive as crops on
the input volume's own voxel grid and are written with that volume's IJK->RAS matrix, so they land on
exactly the voxels they describe for any spacing, origin and direction. Existing segments are never
overwritten: a name already taken gets a numbered suffix unless the caller asks to replace it. A findings table
that is reused keeps its rows: each Apply appends its own, with a run number, and gets its own report text node,
referenced from the table in run order.
"""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .geometry import ijk_to_ras_matrix
from .key_slice import tag_evidence
from .results import SceneResult, SegmentMask
from .terminology import terminology_entry

REPORT_REFERENCE_ROLE = "CitrusVReport"
SOURCE_VOLUME_ROLE = "CitrusVSourceVolume"

# (column, vtk array class, unit, description)
FINDING_COLUMNS = [
    ("finding", vtk.vtkStringArray, "", "What was found (segment or finding text)"),
    ("location", vtk.vtkStringArray, "", "Anatomical location"),
    ("laterality", vtk.vtkStringArray, "", "Patient side: left, right, bilateral or midline"),
    ("volume_ml", vtk.vtkDoubleArray, "mL", "Volume of the segment"),
    ("long_axis_mm", vtk.vtkDoubleArray, "mm", "Longest in-plane diameter (RECIST long axis)"),
    ("short_axis_mm", vtk.vtkDoubleArray, "mm", "Largest diameter perpendicular to the long axis"),
    ("mean_intensity", vtk.vtkDoubleArray, "", "Mean voxel value inside the segment (HU for CT)"),
    ("slice", vtk.vtkIntArray, "", "Key slice: index along the run's slice axis where the model saw it best"),
    ("found", vtk.vtkStringArray, "", "Whether the model found this target (yes / no)"),
    ("reason", vtk.vtkStringArray, "", "Why the target was not found (the backend's words)"),
    ("score", vtk.vtkDoubleArray, "", "The key slice's score (how strongly the model saw the target there)"),
    ("answer", vtk.vtkStringArray, "", "The model's text answer for this target"),
    ("segment", vtk.vtkStringArray, "", "Name of the linked segment"),
    ("run", vtk.vtkIntArray, "", "Which Apply produced the row (1, 2, ...): its report is the run's text node"),
    ("report", vtk.vtkStringArray, "", "Name of the report text node of that run"),
]

def volume_array_and_geometry(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The voxels (k, j, i) and the 4x4 IJK->RAS of a scalar volume node: what the backend needs."""
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {volume_node.GetName()!r} has no image data")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"volume {volume_node.GetName()!r} has {scalars.GetNumberOfComponents()} components; "
                         f"a scalar volume is needed")
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0])
    return voxels, ijk_to_ras_matrix(volume_node)


def _unique_segment_name(segmentation, name: str) -> str:
    taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    if name not in taken:
        return name
    number = 2
    while f"{name} ({number})" in taken:
        number += 1
    return f"{name} ({number})"


def _vtk_matrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _oriented_crop(mask: SegmentMask, ijk_to_ras: np.ndarray):
    oriented = slicer.vtkOrientedImageData()
    k, j, i = mask.offset_kji
    dk, dj, di = mask.crop.shape
    oriented.SetExtent(i, i + di - 1, j, j + dj - 1, k, k + dk - 1)
    values = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask.crop, dtype=np.uint8).ravel(), deep=True,
                                        array_type=vtk.VTK_UNSIGNED_CHAR)
    oriented.GetPointData().SetScalars(values)
    oriented.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return oriented


def create_segmentation_node(scene, volume_node, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, volume_node.GetID())
    if volume_node.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(volume_node.GetParentTransformNode().GetID())
    return node


def write_segments(scene, volume_node, segments: list[SegmentMask], segmentation_node=None,
                   replace_existing: bool = False, axis: str = "axial") -> tuple[object, list[str]]:
    """Add one segment per mask, each from its own crop (segments may overlap: Slicer keeps overlapping segments in
    separate labelmap layers); returns the segmentation node and the new segment ids."""
    if segmentation_node is None:
        segmentation_node = create_segmentation_node(scene, volume_node, f"{volume_node.GetName()} CitrusV")
    elif segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    # A node made by a selector's "Create new" entry has no display node (qMRMLNodeFactory): segments would be
    # invisible. Idempotent for nodes that have one.
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    ijk_to_ras = ijk_to_ras_matrix(volume_node)
    segment_ids = []
    for mask in segments:
        existing = segmentation.GetSegmentIdBySegmentName(mask.name)
        if existing and replace_existing:
            segmentation.RemoveSegment(existing)
        name = mask.name if replace_existing else _unique_segment_name(segmentation, mask.name)
        segment_id = segmentation.AddEmptySegment("", name, list(mask.color))
        oriented = _oriented_crop(mask, ijk_to_ras)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            oriented, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
            oriented.GetExtent())
        segment = segmentation.GetSegment(segment_id)
        entry = terminology_entry(mask.name, mask.laterality)
        if entry:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        segment.SetTag("CitrusV.Laterality", mask.laterality or "")
        tag_evidence(segment, mask, axis)
        segment_ids.append(segment_id)
    return segmentation_node, segment_ids


def _ensure_columns(table_node) -> None:
    """The typed columns, added to a new table or to one written by an older version (existing rows kept)."""
    table = table_node.GetTable()
    rows = table.GetNumberOfRows()
    for column, array_class, unit, description in FINDING_COLUMNS:
        if table.GetColumnByName(column) is not None:
            continue
        array = array_class()
        array.SetName(column)
        array.SetNumberOfTuples(rows)
        for index in range(rows):
            _set_value(array, array_class, index, None)
        table.AddColumn(array)
        table_node.SetColumnDescription(column, description)
        if unit:
            table_node.SetColumnUnitLabel(column, unit)


def _set_value(array, array_class, index: int, value) -> None:
    if array_class is vtk.vtkStringArray:
        array.SetValue(index, "" if value is None else str(value))
    elif array_class is vtk.vtkIntArray:
        array.SetValue(index, -1 if value is None else int(value))
    else:
        array.SetValue(index, float("nan") if value is None else float(value))


def write_findings_table(scene, result: SceneResult, table_node=None, name: str = "CitrusV findings"):
    """Append this run's rows to a table node (typed columns with units and descriptions): a row per target, found or
    not (with the reason), with its segment's answer, key slice and score; the run's report goes into a text node of
    its own, referenced from the table (role CitrusVReport, one reference per run)."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    _ensure_columns(table_node)
    run = table_node.GetNumberOfNodeReferences(REPORT_REFERENCE_ROLE) + 1
    report = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{table_node.GetName()} report {run}")
    report.SetText(result.report_text)
    report.SetAttribute("CitrusV.Prompt", result.prompt)
    report.SetAttribute("CitrusV.Task", result.task)
    report.SetAttribute("CitrusV.Run", str(run))
    table_node.AddNodeReferenceID(REPORT_REFERENCE_ROLE, report.GetID())
    table = table_node.GetTable()
    for row in result.table_rows():
        values = dict(row, run=run, report=report.GetName())
        table.InsertNextBlankRow()
        index = table.GetNumberOfRows() - 1
        for column, array_class, _, _ in FINDING_COLUMNS:
            _set_value(table.GetColumnByName(column), array_class, index, values.get(column))
    table.Modified()
    table_node.SetAttribute("CitrusV.Prompt", result.prompt)  # the latest run's; every report keeps its own
    table_node.SetAttribute("CitrusV.Task", result.task)
    table_node.SetAttribute("CitrusV.RandomWeights", "1" if result.random_weights else "0")
    return table_node, report


def write_boxes(scene, boxes: list[dict], volume_node=None) -> list:
    """One ROI markup per 3D box. With the box's voxel bounds and the volume, the ROI is oriented like the volume's
    voxel grid (exact for oblique volumes) and follows the volume's parent transform; without them (an older
    backend), it is the patient-axis hull of the box."""
    ijk_to_ras = ijk_to_ras_matrix(volume_node) if volume_node is not None else None
    nodes = []
    for number, box in enumerate(boxes, start=1):
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", box.get("label") or f"CitrusV box {number}")
        if ijk_to_ras is not None and "index_min_kji" in box and "index_max_kji" in box:
            low = np.array(box["index_min_kji"], float)[::-1]   # (i, j, k)
            high = np.array(box["index_max_kji"], float)[::-1]
            axes = ijk_to_ras[:3, :3]
            spacing = np.linalg.norm(axes, axis=0)
            directions = axes / spacing
            if np.linalg.det(directions) < 0:  # a flipped grid: one axis reversed keeps the same box, as a rotation
                directions[:, 0] = -directions[:, 0]
            orientation = np.eye(4)
            orientation[:3, :3] = directions
            roi.SetAndObserveObjectToNodeMatrix(_vtk_matrix(orientation))
            roi.SetCenter(*(ijk_to_ras @ np.r_[(low + high) / 2.0, 1.0])[:3])
            roi.SetSize(*((high - low) * spacing))
        else:
            low, high = np.array(box["ras_min"], float), np.array(box["ras_max"], float)
            roi.SetCenter(*((low + high) / 2.0))
            roi.SetSize(*(high - low))
        if volume_node is not None and volume_node.GetParentTransformNode() is not None:
            roi.SetAndObserveTransformNodeID(volume_node.GetParentTransformNode().GetID())
        roi.SetAttribute("CitrusV.Slices", "{}-{}".format(*box.get("slices", ["", ""])))
        nodes.append(roi)
    return nodes


def place_in_study(scene, volume_node, nodes: list) -> None:
    """Put result nodes beside the input volume in the subject hierarchy (its study, if it has one)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = hierarchy.GetItemParent(volume_item)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:  # without Slicer's Qt plugins nothing creates the item for a new node
            hierarchy.CreateItem(parent, node)


def write_result(scene, volume_node, result: SceneResult, segmentation_node=None, table_node=None,
                 replace_existing: bool = False) -> dict:
    """One Apply into the scene, as one undoable step where the scene records undo."""
    if scene.GetUndoFlag():
        scene.SaveStateForUndo()
    written: dict = {"segmentation": None, "segment_ids": [], "table": None, "report": None, "rois": []}
    scene.StartState(scene.BatchProcessState)
    try:
        if result.segments:
            written["segmentation"], written["segment_ids"] = write_segments(
                scene, volume_node, result.segments, segmentation_node, replace_existing, result.axis)
        if result.table_rows() or result.report_text:
            written["table"], written["report"] = write_findings_table(scene, result, table_node)
        written["rois"] = write_boxes(scene, result.boxes, volume_node)
    finally:
        scene.EndState(scene.BatchProcessState)
    nodes = [n for n in (written["segmentation"], written["table"], written["report"], *written["rois"]) if n is not None]
    place_in_study(scene, volume_node, nodes)
    return written
