"""A conversation in the scene: which slice a view shows, the history kept with the scene, answers written as nodes.

MRML and numpy only (no Qt): tested headless with slicer-core.

The history is a text node (class vtkMRMLTextNode, attribute `CitrusV.Conversation` = "1") holding JSON: the
server's conversation id, and one entry per turn (conversation.turn_record). It references its volume, its
segmentation and the ROI nodes its answers made, so MRML keeps those links when a scene is saved, reloaded or
imported (node ids change then; references follow). The panel's parameter node references the history shown.
A segment made from an answer carries its turn in segment tags (and its job, so refinement can start from it).
"""
from __future__ import annotations

import json

import numpy as np
import vtk

import slicer

from .conversation import HISTORY_FORMAT, ConversationTurnRunner, Question, turn_record
from .refinement.segment import JOB_TAG, roi_box, tag_segments
from .runner import Event
from .scene_job import SceneJob
from .upload import UploadCache, VolumeUpload
from .view_slice import (ViewNotAligned, ViewSlice, index_axis_of_slice_axis, nearest_slice_axis, roi_voxels, slice_centre_ras,
                         slice_for_roi, slice_in_view)
from .geometry import ijk_to_ras_matrix
from .writers import (create_segmentation_node, place_in_study, volume_array_and_geometry,
                      write_boxes, write_segments)

CONVERSATION_ATTRIBUTE = "CitrusV.Conversation"
VOLUME_ROLE = "CitrusVConversationVolume"
SEGMENTATION_ROLE = "CitrusVConversationSegmentation"
ROI_ROLE = "CitrusVConversationROI"
TURN_TAG = "CitrusV.Turn"                  # segment tag and ROI attribute: the turn that made it
CONVERSATION_ID_TAG = "CitrusV.ConversationId"
ANSWER_TAG = "CitrusV.Answer"              # the answer the segment came from (its "why", kept with the segment)


# ---------------------------------------------------------------------------------------------- views

def _array(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's IJK->RAS in world coordinates (through its parent transforms, which must be linear)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return _array(matrix)
    if not parent.IsTransformToWorldLinear():
        raise ViewNotAligned(f"{volume_node.GetName()} is under a non-linear transform: its slices are curved in the "
                             f"views; harden the transform or ask about a placed ROI.")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return _array(to_world) @ _array(matrix)


def volume_shape(volume_node) -> tuple[int, int, int]:
    dims = volume_node.GetImageData().GetDimensions()
    return dims[2], dims[1], dims[0]


def slice_node_of(scene, view: str):
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
        if node.GetLayoutName() == view:
            return node
    return None


def view_slice_of(scene, view: str, volume_node) -> ViewSlice:
    """The slice of `volume_node` shown in the slice view `view` ("Red", "Yellow", "Green"); ViewNotAligned (with
    the message for the user) when the view shows none."""
    node = slice_node_of(scene, view)
    if node is None:
        raise ViewNotAligned(f"there is no {view} view in this layout")
    return slice_in_view(_array(node.GetSliceToRAS()), world_ijk_to_ras(volume_node), volume_shape(volume_node),
                         view=f"The {view} view", volume=volume_node.GetName(), naming=ijk_to_ras_matrix(volume_node))


def roi_question(volume_node, roi_node) -> dict:
    """A placed ROI as the turn's `roi` (voxels of the volume, inclusive); ValueError when unplaced or outside."""
    bounds = roi_box(volume_node, roi_node)
    if bounds is None:
        raise ValueError(f"place the ROI {roi_node.GetName()!r} first")
    return roi_voxels(bounds, volume_shape(volume_node))


def question_for(scene, volume_node, view: str, prompt: str, window: str | None = None, roi_node=None) -> Question:
    """*Ask about this slice*: the slice the view shows, or, with an ROI, the ROI on the view's slice when the ROI
    holds it (else on the ROI's middle slice along the view's slice axis). ViewNotAligned / ValueError say what is wrong."""
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("Type a question, e.g. 'what is on this slice?'")
    if roi_node is None:
        shown = view_slice_of(scene, view, volume_node)
        return Question(prompt, shown.axis, shown.index, window, view=view)
    roi = roi_question(volume_node, roi_node)
    try:
        shown = view_slice_of(scene, view, volume_node)
        axis, index = shown.axis, shown.index
    except ViewNotAligned:          # the ROI says where; the view only which slice axis
        node = slice_node_of(scene, view)
        axis, index = (nearest_slice_axis(_array(node.GetSliceToRAS())) if node is not None else "axial"), None
    return Question(prompt, axis, slice_for_roi(roi, ijk_to_ras_matrix(volume_node), axis, index), window, roi,
                    view=view)


def jump_to_turn(scene, volume_node, turn: dict) -> np.ndarray:
    """Move every slice view through the middle of the turn's slice (of its ROI's part of it, if any); returns the
    world point. A view turned to the volume's plane then shows that very slice."""
    point = slice_centre_ras(world_ijk_to_ras(volume_node), volume_shape(volume_node), turn["axis"], turn["slice"],
                             turn.get("roi"), naming=ijk_to_ras_matrix(volume_node))
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").JumpSliceByOffsetting(*point)
    return point


# ---------------------------------------------------------------------------------------------- the history

def create_history(scene, volume_node, name: str | None = None):
    """A new, empty conversation about `volume_node`."""
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", name or f"{volume_node.GetName()} CitrusV conversation")
    node.SetAttribute(CONVERSATION_ATTRIBUTE, "1")
    node.SetNodeReferenceID(VOLUME_ROLE, volume_node.GetID())
    save_history(node, {"format": HISTORY_FORMAT, "conversation_id": None, "server": None, "volume_id": None,
                        "turns": []})
    place_in_study(scene, volume_node, [node])
    return node


def read_history(node) -> dict:
    text = node.GetText() or ""
    try:
        history = json.loads(text) if text.strip() else {}
    except ValueError:
        raise ValueError(f"{node.GetName()!r} does not hold a CitrusV conversation (its text is not JSON)") from None
    if history.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{node.GetName()!r} does not hold a CitrusV conversation ({HISTORY_FORMAT})")
    # Histories saved by the version before the slice axis had one name everywhere (issue 20) call it "plane".
    for turn in history.get("turns", []):
        for entry in (turn, turn.get("question") or {}):
            if "plane" in entry and "axis" not in entry:
                entry["axis"] = entry.pop("plane")
    return history


def save_history(node, history: dict) -> None:
    node.SetText(json.dumps(history, indent=1))


def histories_of(scene, volume_node) -> list:
    """The conversation nodes about `volume_node`, oldest first."""
    found = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLTextNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLTextNode")
        if node.GetAttribute(CONVERSATION_ATTRIBUTE) == "1" and node.GetNodeReference(VOLUME_ROLE) is volume_node:
            found.append(node)
    return found


def history_volume(node):
    return node.GetNodeReference(VOLUME_ROLE)


def history_segmentation(node):
    return node.GetNodeReference(SEGMENTATION_ROLE)


def turn_rois(node, turn: int) -> list:
    return [node.GetNthNodeReference(ROI_ROLE, index) for index in range(node.GetNumberOfNodeReferences(ROI_ROLE))
            if node.GetNthNodeReference(ROI_ROLE, index) is not None
            and node.GetNthNodeReference(ROI_ROLE, index).GetAttribute(TURN_TAG) == str(turn)]


def propagation_question(turn: dict) -> Question:
    """*Propagate to 3D* of a turn: the same question on the same slice, carried through the volume."""
    return Question(prompt=turn["prompt"], axis=turn["axis"], slice=int(turn["slice"]), window=turn.get("window"),
                    roi=turn.get("roi"), propagate=True, view=turn.get("view", ""), propagated_from=int(turn["turn"]))


def writer_box(box: dict, ijk_to_ras: np.ndarray, axis: str) -> dict:
    """A conversation box (inclusive voxel index ranges (i, j, k), one slice thick along the turn's slice axis) as
    writers.write_boxes draws it: edges on the voxels' borders, oriented like the volume's grid."""
    index_axis = index_axis_of_slice_axis(ijk_to_ras, axis)
    first, last = np.asarray(box["ijk_min"], float), np.asarray(box["ijk_max"], float)
    low, high = first - 0.5, last + 0.5
    return {"label": box.get("label") or "", "index_min_kji": low[::-1].tolist(), "index_max_kji": high[::-1].tolist(),
            "slices": [int(first[index_axis]), int(last[index_axis])]}


def write_turn(scene, volume_node, history_node, result, record: dict) -> dict:
    """One answered question into the scene: its segments (tagged with the turn), its boxes as ROIs, its entry in
    the history. Returns the written nodes and the entry."""
    history = read_history(history_node)
    written: dict = {"segmentation": None, "segment_ids": [], "rois": [], "turn": record, "history": history_node}
    ijk_to_ras = volume_array_and_geometry(volume_node)[1]
    if scene.GetUndoFlag():
        scene.SaveStateForUndo()
    scene.StartState(scene.BatchProcessState)
    try:
        if result.segments:
            segmentation = history_segmentation(history_node)
            if segmentation is None:
                segmentation = create_segmentation_node(scene, volume_node, f"{volume_node.GetName()} CitrusV conversation")
                history_node.SetNodeReferenceID(SEGMENTATION_ROLE, segmentation.GetID())
            segmentation, segment_ids = write_segments(scene, volume_node, result.segments, segmentation)
            written["segmentation"], written["segment_ids"] = segmentation, segment_ids
            tag_segments(segmentation, segment_ids, [s.label for s in result.segments], record["job_id"])
            made = [s for s in record["segments"] if s["found"]]
            for segment_id, entry in zip(segment_ids, made):
                segment = segmentation.GetSegmentation().GetSegment(segment_id)
                segment.SetTag(TURN_TAG, str(record["turn"]))
                segment.SetTag(CONVERSATION_ID_TAG, record["conversation_id"] or "")
                segment.SetTag(ANSWER_TAG, record["answer"])
                entry["segment_id"], entry["segment_name"] = segment_id, segment.GetName()
        boxes = [writer_box(box, ijk_to_ras, record["axis"]) for box in record["boxes"]]
        for box in boxes:
            box["label"] = f"Turn {record['turn']}: {box['label'] or 'box'}"
        rois = write_boxes(scene, boxes, volume_node)
        for roi, entry in zip(rois, record["boxes"]):
            roi.SetAttribute(TURN_TAG, str(record["turn"]))
            roi.SetAttribute(JOB_TAG, record["job_id"] or "")
            history_node.AddNodeReferenceID(ROI_ROLE, roi.GetID())
            entry["roi_name"] = roi.GetName()
        written["rois"] = rois
        history["turns"].append(record)
        save_history(history_node, history)
    finally:
        scene.EndState(scene.BatchProcessState)
    place_in_study(scene, volume_node, [n for n in (written["segmentation"], *written["rois"]) if n is not None])
    return written


# ---------------------------------------------------------------------------------------------- one question

class SceneConversation(SceneJob):
    """One question about `volume_node`, answered into `history_node`: nodes captured when it is asked, nothing
    written into a closed scene or for a removed volume (as Apply, apply.py)."""

    def __init__(self, scene, transport, target, uploads: UploadCache, volume_node, history_node, question: Question,
                 dicom_reference: dict | None = None):
        self.volume_node = volume_node
        self.history_node = history_node
        self.question = question
        history = read_history(history_node)
        voxels, ijk_to_ras = volume_array_and_geometry(volume_node)
        image = volume_node.GetImageData()
        mtime = image.GetMTime()
        key = UploadCache.key(target, volume_node, ijk_to_ras, dicom_reference is not None)
        volume_id = uploads.get(key)
        # The server's conversation goes on only on the same server, about the same upload of the same voxels.
        same = history.get("server") == target.url and volume_id is not None and history.get("volume_id") == volume_id
        self.continues = same and history.get("conversation_id") is not None
        upload = VolumeUpload(transport, target, voxels, ijk_to_ras, volume_node.GetName(), dicom_reference,
                              source_changed=lambda: image.GetMTime() != mtime)
        runner = ConversationTurnRunner(
            upload, question, conversation_id=history.get("conversation_id") if self.continues else None,
            title=history_node.GetName(), volume_id=volume_id)
        runner.on_uploaded = lambda new_id: uploads.remember(key, new_id)
        self._had_turns = bool(history.get("turns"))
        super().__init__(scene, runner)

    def _write(self, event: Event) -> Event:
        if self.closed_scene or not self.scene.IsNodePresent(self.volume_node) or \
                not self.scene.IsNodePresent(self.history_node):
            return Event("error", message="the volume or its conversation was removed from the scene before the "
                                          "answer arrived; nothing was written")
        runner = self.runner
        reset = runner.context_reset or (self._had_turns and not self.continues)
        record = turn_record(self.question, runner.payload, runner.conversation_id, runner.job_id, reset)
        try:
            written = write_turn(self.scene, self.volume_node, self.history_node, event.result, record)
        except (ValueError, RuntimeError) as error:   # a damaged history node, a mask outside the volume
            return Event("error", message=f"the answer could not be written into the scene: {error}")
        history = read_history(self.history_node)
        history.update(conversation_id=runner.conversation_id, server=runner.target.url, volume_id=runner.volume_id)
        save_history(self.history_node, history)
        return Event("done", result=event.result, written=written)
