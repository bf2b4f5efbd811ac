"""DICOM export of a result for a volume that came from Slicer's DICOM database (no Qt in this file).

At Apply, `dicom_reference` describes the volume's source series from the DICOM database (study, series and
frame-of-reference UIDs, one SOP instance per slice k, their positions, the least patient/study identity),
and the upload carries it: the backend then makes a DICOM SEG and a TID 1500 SR that reference exactly those
instances. The Export button (`export_result`) saves them into a folder and imports that folder into Slicer's
DICOM database, beside the source series, from where Slicer's DICOM module sends them to a PACS. When Slicer's
own DICOM SEG exporter is installed (QuantitativeReporting's DICOMSegmentationPlugin), the segmentation node as
it is in the scene — edits included — is exported through it instead of the backend's SEG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"   # set by Slicer's DICOM readers on the volumes they load
SEG_EXPORTER = "DICOMSegmentationPlugin"
TAGS = {"study_instance_uid": "0020,000D", "series_instance_uid": "0020,000E", "frame_of_reference_uid": "0020,0052",
        "sop_class_uid": "0008,0016", "modality": "0008,0060", "series_description": "0008,103E"}
IDENTITY_TAGS = {"PatientName": "0010,0010", "PatientID": "0010,0020", "PatientBirthDate": "0010,0030",
                 "PatientSex": "0010,0040", "StudyDate": "0008,0020", "StudyTime": "0008,0030", "StudyID": "0020,0010",
                 "AccessionNumber": "0008,0050", "ReferringPhysicianName": "0008,0090"}
POSITION_TAG, INSTANCE_TAG = "0020,0032", "0008,0018"


class DicomExportError(Exception):
    """Why a result cannot be exported as DICOM, in words for the panel."""


def is_from_dicom_database(volume_node) -> bool:
    return bool(volume_node is not None and (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").strip())


def dicom_reference(volume_node, ijk_to_ras: np.ndarray, database) -> dict | None:
    """The upload's `dicom` field for a volume loaded from `database` (slicer.dicomDatabase), else None.

    Slices are matched to instances by position, not by the attribute's order: instance k is the one whose
    Image Position (Patient) is slice k's corner. A volume that does not match its instances one to one (cropped,
    resampled, a series with gaps) gets no reference: its SEG would not lie on the series."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids or database is None:
        return None
    depth = volume_node.GetImageData().GetDimensions()[2]
    files = [database.fileForInstance(uid) for uid in uids]
    if len(uids) != depth or not all(files):
        return None
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, float)
    corners = (ijk_to_lps @ np.array([[0, 0, k, 1] for k in range(depth)], float).T).T[:, :3]
    positions = []
    for file in files:
        value = [float(v) for v in (database.fileValue(file, POSITION_TAG) or "").split("\\") if v.strip()]
        if len(value) != 3:
            return None
        positions.append(value)
    positions = np.array(positions)
    order = [int(np.argmin(np.linalg.norm(positions - corner, axis=1))) for corner in corners]
    spacing = float(np.linalg.norm(ijk_to_lps[:3, 2]))
    if sorted(order) != list(range(depth)) or np.abs(positions[order] - corners).max() > max(0.02, 0.01 * spacing):
        return None
    first = files[0]
    reference = {key: (database.fileValue(first, tag) or "").strip() for key, tag in TAGS.items()}
    reference["modality"] = reference["modality"] if reference["modality"] in ("CT", "MR", "PT") else None
    reference["series_description"] = reference["series_description"][:64]
    reference["sop_instance_uids"] = [uids[n] for n in order]
    reference["positions"] = positions[order].tolist()
    reference["identity"] = {keyword: value[:64] for keyword, tag in IDENTITY_TAGS.items()
                             if (value := (database.fileValue(first, tag) or "").strip())}
    return reference


def save_backend_objects(client, dicom: dict, directory: Path, names=("seg", "sr")) -> list[Path]:
    """The job's DICOM objects (the result's `dicom` field) as files in `directory`."""
    if not dicom or not dicom.get("files"):
        raise DicomExportError("this result has no DICOM objects: the input volume was not loaded from the DICOM "
                               "database (or the backend made none); apply again on a DICOM-loaded volume")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        url = dicom["files"].get(name)
        if url is None:
            continue
        path = directory / f"citrusv_{name}.dcm"
        path.write_bytes(client.download(url))
        written.append(path)
    return written


def slicer_seg_exporter(plugins: dict):
    """Slicer's own DICOM SEG exporter (from QuantitativeReporting), or None when it is not installed."""
    plugin = plugins.get(SEG_EXPORTER)
    return plugin() if plugin is not None else None


def export_segmentation_with_slicer(exporter, subject_hierarchy_item: int, directory: Path) -> list[Path]:
    """The segmentation through Slicer's DICOM export: the exporter's own examineForExport / export."""
    exportables = exporter.examineForExport(subject_hierarchy_item)
    if not exportables:
        raise DicomExportError("Slicer's DICOM SEG exporter cannot export this segmentation (its reference volume "
                               "must be the DICOM volume)")
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.iterdir())
    for exportable in exportables:
        exportable.directory = str(directory)
    message = exporter.export(exportables)
    if message:
        raise DicomExportError(f"Slicer's DICOM export failed: {message}")
    return sorted(set(directory.iterdir()) - before)


def export_result(client, dicom: dict, directory: Path, import_folder, exporter=None,
                  segmentation_item: int | None = None) -> dict:
    """SEG (Slicer's exporter when given, else the backend's) and the backend's SR into `directory`, then
    `import_folder(directory)` (DICOMUtils.importDicom) puts them into the DICOM database. What was done."""
    files, route = [], "backend"
    if exporter is not None and segmentation_item is not None:
        files += export_segmentation_with_slicer(exporter, segmentation_item, directory)
        files += save_backend_objects(client, dicom, directory, names=("sr",))
        route = "slicer"
    else:
        files += save_backend_objects(client, dicom, directory)
    import_folder(str(directory))
    return {"files": files, "segmentation_exported_by": route}


def export_result_without_waiting(transport, target, dicom: dict | None, directory: Path, import_folder, on_done,
                                  exporter=None, segmentation_item: int | None = None) -> None:
    """`export_result` with the backend's objects downloaded through the courier first (nothing blocks the panel);
    `on_done(done, error)` on the main thread."""
    from .transport import Fetched, fetch_all

    def fetched(bodies, error) -> None:
        if error is not None:
            return on_done(None, error)
        try:
            on_done(export_result(Fetched(bodies), dicom, directory, import_folder, exporter, segmentation_item), None)
        except Exception as failure:  # shown in the panel
            on_done(None, failure)

    files = (dicom or {}).get("files") or {}
    if not files or target is None:
        return fetched({}, None)  # export_result says why there is nothing to export
    fetch_all(transport, target, list(files.values()), fetched)
