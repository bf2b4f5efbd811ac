"""Writing backend results into the MRML scene: segments, a findings table with its report, ROI boxes.

MRML only (works in Slicer and in the `slicer-core` wheel); no Qt, no slicer.app. Masks arrive as crops on
the input volume's own voxel grid and are written with that volume's IJK->RAS matrix, so they land on
exactly the voxels they describe for any spacing, origin and direction. Existing segments are never
overwritten: a name already taken gets a numbered suffix unless the caller asks to replace it.
"""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .results import SceneResult, SegmentMask

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
    ("slice", vtk.vtkIntArray, "", "Slice index (along the slicing axis) where it was found"),
    ("segment", vtk.vtkStringArray, "", "Name of the linked segment"),
]

# SNOMED CT codes of common targets, for Slicer's terminology (segment colour/naming in DICOM SEG export).
ANATOMY_CODES = {
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "heart": ("80891009", "Heart"),
    "left lung": ("44029006", "Left lung"), "right lung": ("3341006", "Right lung"), "lung": ("39607008", "Lung"),
    "left kidney": ("18639004", "Left kidney"), "right kidney": ("9846003", "Right kidney"),
    "kidney": ("64033007", "Kidney"), "pancreas": ("15776009", "Pancreas"), "aorta": ("15825003", "Aorta"),
    "stomach": ("69695003", "Stomach"), "gallbladder": ("28231008", "Gallbladder"), "brain": ("12738006", "Brain"),
    "bladder": ("89837001", "Urinary bladder"), "prostate": ("41216001", "Prostate"),
}


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


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


def _terminology_entry(name: str) -> str | None:
    code = ANATOMY_CODES.get(name.strip().lower())
    if code is None:
        return None
    return ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
            f"SCT^{code[0]}^{code[1]}~^^~Anatomic codes - DICOM master list~^^~^^")


def _unique_segment_name(segmentation, name: str) -> str:
    taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    if name not in taken:
        return name
    number = 2
    while f"{name} ({number})" in taken:
        number += 1
    return f"{name} ({number})"


def _oriented_crop(mask: SegmentMask, ijk_to_ras: np.ndarray):
    oriented = slicer.vtkOrientedImageData()
    k, j, i = mask.offset_kji
    dk, dj, di = mask.crop.shape
    oriented.SetExtent(i, i + di - 1, j, j + dj - 1, k, k + dk - 1)
    values = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask.crop, dtype=np.uint8).ravel(), deep=True,
                                        array_type=vtk.VTK_UNSIGNED_CHAR)
    oriented.GetPointData().SetScalars(values)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    oriented.SetImageToWorldMatrix(matrix)
    return oriented


def create_segmentation_node(scene, volume_node, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, volume_node.GetID())
    if volume_node.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(volume_node.GetParentTransformNode().GetID())
    return node


def write_segments(scene, volume_node, segments: list[SegmentMask], segmentation_node=None,
                   replace_existing: bool = False) -> tuple[object, list[str]]:
    """Add one segment per mask; returns the segmentation node and the new segment ids."""
    if segmentation_node is None:
        segmentation_node = create_segmentation_node(scene, volume_node, f"{volume_node.GetName()} CitrusV")
    elif segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
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
        entry = _terminology_entry(mask.name)
        if entry:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        segment.SetTag("CitrusV.Laterality", mask.laterality or "")
        segment_ids.append(segment_id)
    return segmentation_node, segment_ids


def write_findings_table(scene, result: SceneResult, table_node=None, name: str = "CitrusV findings"):
    """Findings rows into a table node (typed columns with units and descriptions), the report as a text node."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table_node.RemoveAllColumns()
    table = table_node.GetTable()
    for column, array_class, unit, description in FINDING_COLUMNS:
        array = array_class()
        array.SetName(column)
        table.AddColumn(array)
        table_node.SetColumnDescription(column, description)
        if unit:
            table_node.SetColumnUnitLabel(column, unit)
    for row in result.findings:
        table.InsertNextBlankRow()
        index = table.GetNumberOfRows() - 1
        for column, array_class, _, _ in FINDING_COLUMNS:
            value = row.get(column)
            if array_class is vtk.vtkStringArray:
                table.GetColumnByName(column).SetValue(index, "" if value is None else str(value))
            elif array_class is vtk.vtkIntArray:
                table.GetColumnByName(column).SetValue(index, -1 if value is None else int(value))
            else:
                table.GetColumnByName(column).SetValue(index, float("nan") if value is None else float(value))
    table.Modified()
    table_node.SetAttribute("CitrusV.Prompt", result.prompt)
    table_node.SetAttribute("CitrusV.Task", result.task)
    table_node.SetAttribute("CitrusV.RandomWeights", "1" if result.random_weights else "0")
    report = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{table_node.GetName()} report")
    report.SetText(result.report_text)
    table_node.SetNodeReferenceID(REPORT_REFERENCE_ROLE, report.GetID())
    return table_node, report


def write_boxes(scene, boxes: list[dict]) -> list:
    """One ROI markup per 3D box (patient-axis aligned, RAS)."""
    nodes = []
    for number, box in enumerate(boxes, start=1):
        low, high = np.array(box["ras_min"], float), np.array(box["ras_max"], float)
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", box.get("label") or f"CitrusV box {number}")
        roi.SetCenter(*((low + high) / 2.0))
        roi.SetSize(*(high - low))
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
                scene, volume_node, result.segments, segmentation_node, replace_existing)
        if result.findings or result.report_text:
            written["table"], written["report"] = write_findings_table(scene, result, table_node)
        written["rois"] = write_boxes(scene, result.boxes)
    finally:
        scene.EndState(scene.BatchProcessState)
    nodes = [n for n in (written["segmentation"], written["table"], written["report"], *written["rois"]) if n is not None]
    place_in_study(scene, volume_node, nodes)
    return written
