"""Refining a CitrusV segment in the scene: markups become voxel prompts, the backend's steps land in the segment.

MRML and numpy only (no Qt, no I/O): the panel sends the requests built here through the module's transport and
hands the answers back to `SegmentRefinement.apply`, on the main thread. Runs headless with slicer-core.

Geometry: a markup's world position (after its own parent transforms) is brought into the volume's frame through
the transform between the world and the volume's parent (linear or not, as `GetTransformBetweenNodes` gives it),
then into voxel indices with the volume's RAS->IJK matrix — so prompts land on the right voxel for oblique and
flipped volumes and under any transforms. An ROI travels as the IJK bounding box of its eight corners.

State: the session's mask is mirrored here after every step. A step's answer is applied only if it names this
volume and this segment and follows the mirror's version; a segment edited by hand since (Segment Editor) makes
`needs_restart` true, and the panel restarts the session from the segment as it is.
"""
from __future__ import annotations

import base64
import re
import zlib
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

JOB_TAG = "CitrusV.JobId"        # the segmentation job that made a segment (for its slices and text prompt)
LABEL_TAG = "CitrusV.Label"      # the segment's label in that job's result
QUERY_TAG = "CitrusV.Query"      # the text the model was asked
SESSION_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Request:
    method: str
    path: str
    body: dict | None = None


# ---------------------------------------------------------------------------------------------- geometry

def world_to_ijk(volume_node, points_world) -> np.ndarray:
    """[N, 3] world RAS points -> [N, 3] continuous (i, j, k) indices of `volume_node`."""
    to_volume = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), to_volume)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    matrix = np.array([[ras_to_ijk.GetElement(r, c) for c in range(4)] for r in range(4)])
    local = np.array([to_volume.TransformPoint([float(v) for v in point]) for point in np.atleast_2d(points_world)])
    return (np.c_[local, np.ones(len(local))] @ matrix.T)[:, :3]


def node_to_world(node, points) -> np.ndarray:
    """Points in a markup node's own frame -> world, through its parent transforms."""
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, to_world)
    return np.array([to_world.TransformPoint([float(v) for v in point]) for point in np.atleast_2d(points)])


def markup_points(volume_node, markups_node, positive: bool) -> list[dict]:
    """The defined control points of a point list as prompts: {"ijk": [i, j, k], "positive": ...}."""
    if markups_node is None:
        return []
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue
        world = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, world)
        points.append({"ijk": world_to_ijk(volume_node, [world])[0].tolist(), "positive": bool(positive)})
    return points


def roi_box(volume_node, roi_node) -> dict | None:
    """The ROI as the IJK bounding box of its eight corners: {"ijk_min", "ijk_max"}; None before it is placed."""
    if roi_node is None or not roi_node.GetControlPointPlacementComplete():
        return None
    size = np.array(roi_node.GetSize(), float)
    matrix = roi_node.GetObjectToNodeMatrix()
    object_to_node = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    signs = np.array(list(np.ndindex(2, 2, 2))) * 2 - 1
    corners_object = np.c_[signs * size / 2, np.ones(8)]
    corners_node = (corners_object @ object_to_node.T)[:, :3]
    ijk = world_to_ijk(volume_node, node_to_world(roi_node, corners_node))
    return {"ijk_min": ijk.min(axis=0).tolist(), "ijk_max": ijk.max(axis=0).tolist()}


# ---------------------------------------------------------------------------------------------- segments

def read_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment on the volume's grid, (k, j, i) bool."""
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node).astype(bool)


def write_segment(segmentation_node, segment_id: str, volume_node, mask: np.ndarray) -> None:
    """Make the segment exactly `mask`: its bounding box written in one replace (other segments untouched)."""
    if not mask.any():
        segmentation_node.GetSegmentation().ClearSegment(segment_id)
        return
    found = np.argwhere(mask)
    low, high = found.min(axis=0), found.max(axis=0) + 1
    crop = np.ascontiguousarray(mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]], dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(int(low[2]), int(high[2]) - 1, int(low[1]), int(high[1]) - 1, int(low[0]), int(high[0]) - 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(crop.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    image.SetImageToWorldMatrix(ijk_to_ras)
    # MODE_REPLACE makes the segment this image (cleared outside it), also in a labelmap layer shared with others.
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())


def encode_crop(mask: np.ndarray) -> dict:
    """The mask's bounding box as the service's mask crop (an empty mask: one empty voxel)."""
    found = np.argwhere(mask)
    low, high = (found.min(axis=0), found.max(axis=0) + 1) if len(found) else (np.zeros(3, int), np.ones(3, int))
    crop = np.ascontiguousarray(mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]], dtype=np.uint8)
    return {"offset": [int(v) for v in low], "shape": [int(v) for v in crop.shape],
            "data": base64.b64encode(zlib.compress(crop.tobytes(), 6)).decode("ascii")}


def decode_change(change: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(change["data"]))
    return np.frombuffer(raw, np.uint8).reshape(change["shape"]) > 0


# ---------------------------------------------------------------------------------------------- the session

class StaleAnswer(Exception):
    """An answer that does not follow what this segment shows (another segment's, or an older step's)."""


class SegmentRefinement:
    """The module's side of one backend refinement session: one segment of one uploaded volume."""

    def __init__(self, volume_id: str, segmentation_node, segment_id: str, volume_node):
        self.volume_id = volume_id
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.volume_node = volume_node
        self.name = SESSION_NAME.sub("_", segment_id)[:64] or "segment"
        self.mirror: np.ndarray | None = None   # the backend's mask, as last answered
        self.version = -1
        self.slice_axis = 2                      # IJK index of the axis slices are taken along
        self.can_undo = self.can_redo = False

    @property
    def path(self) -> str:
        return f"/v1/volumes/{self.volume_id}/segments/{self.name}"

    def segment(self):
        return self.segmentation_node.GetSegmentation().GetSegment(self.segment_id)

    # ------------------------------------------------------------------------------------------ requests

    def start_request(self, settings: dict | None = None) -> Request:
        """PUT the session with the segment as it is now (and its job, for the slices the model saw)."""
        mask = read_segment(self.segmentation_node, self.segment_id, self.volume_node)
        self._sent = mask
        segment = self.segment()
        body: dict = {"mask": encode_crop(mask)}
        job, label, query = (segment_tag(segment, tag) for tag in (JOB_TAG, LABEL_TAG, QUERY_TAG))
        if job:
            body["job_id"] = job
            if label:
                body["label"] = int(label)
        elif settings:
            body["settings"] = settings
        if query:
            body["query"] = query
        return Request("PUT", self.path, body)

    def started(self, info: dict) -> None:
        self._check_identity(info)
        self.mirror = self._sent
        self.version = int(info["version"])
        self.slice_axis = int(info.get("slice_axis_ijk", self.slice_axis))
        self.can_undo, self.can_redo = bool(info.get("can_undo")), bool(info.get("can_redo"))

    def needs_restart(self) -> bool:
        """No session yet, or the segment no longer shows what the backend holds (edited by hand)."""
        if self.mirror is None:
            return True
        return not np.array_equal(read_segment(self.segmentation_node, self.segment_id, self.volume_node), self.mirror)

    def refine_request(self, points: list[dict], box: dict | None = None, **options) -> Request:
        return Request("POST", self.path + "/refine",
                       {"points": points, "box": box, "expected_version": self.version, **options})

    def step_request(self, kind: str) -> Request:
        return Request("POST", f"{self.path}/{kind}", {"expected_version": self.version})

    def prompts_on_slice(self, points: list[dict], index: int) -> list[dict]:
        """The points that lie on slice `index` (as the backend assigns points to slices: nearest centre)."""
        return [p for p in points if int(np.floor(p["ijk"][self.slice_axis] + 0.5)) == index]

    def slice_of(self, point: dict) -> int:
        return int(np.floor(point["ijk"][self.slice_axis] + 0.5))

    # ------------------------------------------------------------------------------------------ answers

    def apply(self, answer: dict) -> list[int]:
        """Paste a step's change into the mirror and the segment; the slices that changed."""
        self._check_identity(answer)
        if self.mirror is None or int(answer["version"]) != self.version + 1:
            raise StaleAnswer(f"the answer is version {answer['version']}, the segment shows version {self.version}")
        change = answer.get("change")
        if change:
            box = tuple(slice(o, o + n) for o, n in zip(change["offset"], change["shape"]))
            self.mirror[box] = decode_change(change)
            write_segment(self.segmentation_node, self.segment_id, self.volume_node, self.mirror)
        self.version = int(answer["version"])
        self.can_undo, self.can_redo = bool(answer["can_undo"]), bool(answer["can_redo"])
        return list(answer.get("changed_slices", []))

    def _check_identity(self, answer: dict) -> None:
        if answer.get("volume_id") != self.volume_id or answer.get("segment") != self.name:
            raise StaleAnswer(f"the answer is for segment {answer.get('segment')!r} of volume {answer.get('volume_id')}, "
                              f"not {self.name!r} of {self.volume_id}")


def segment_tag(segment, name: str) -> str:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


# ---------------------------------------------------------------------------------------------- the scene's side

PROMPT_KINDS = {"include": ("vtkMRMLMarkupsFiducialNode", (0.0, 0.86, 0.35)),
                "exclude": ("vtkMRMLMarkupsFiducialNode", (1.0, 0.24, 0.24)),
                "box": ("vtkMRMLMarkupsROINode", (1.0, 0.9, 0.0))}


def tag_segments(segmentation_node, segment_ids: list[str], labels: list[int], job_id: str | None) -> None:
    """Remember which job made each segment (and its label there): refinement starts from that job's slices."""
    segmentation = segmentation_node.GetSegmentation()
    for segment_id, label in zip(segment_ids, labels):
        segment = segmentation.GetSegment(segment_id)
        if segment is not None and job_id:
            segment.SetTag(JOB_TAG, job_id)
            segment.SetTag(LABEL_TAG, str(int(label)))


def prompt_nodes(scene, segmentation_node, segment_id: str) -> tuple:
    """The include / exclude point lists and the box of a segment, made once and kept with the segmentation."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    name = segment.GetName() if segment is not None else segment_id
    nodes = []
    for kind, (cls, color) in PROMPT_KINDS.items():
        role = f"CitrusVRefine{kind.capitalize()}/{segment_id}"
        node = segmentation_node.GetNodeReference(role)
        if node is None:
            node = scene.AddNewNodeByClass(cls, f"{name} {kind}")
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetSelectedColor(*color)
                display.SetColor(*color)
            segmentation_node.SetNodeReferenceID(role, node.GetID())
        nodes.append(node)
    return tuple(nodes)


def slice_settings(options: dict) -> dict:
    """The panel's task options as the slice settings a session needs when no job describes them."""
    keys = {"axis": "axis", "window": "window", "slice_range": "slice_range", "max_pixels": "max_pixels"}
    return {target: options[source] for source, target in keys.items() if options.get(source) not in (None, "")}
