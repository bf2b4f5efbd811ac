"""The DICOM side of a volume that came from Slicer's DICOM database (no Qt in this file).

At Apply, `dicom_reference` describes the volume's source series from the DICOM database (study, series and
frame-of-reference UIDs, one SOP instance per slice k, their positions, the least patient/study identity),
and the upload carries it: the backend can then make a DICOM SEG and a TID 1500 SR that reference exactly those
instances. The Export button sends the scene's segments as they are (scene_export.py) and `save_objects` saves the
SEG and SR the backend wrote into a folder that Slicer's DICOM database imports, beside the source series.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"   # set by Slicer's DICOM readers on the volumes they load
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


def save_objects(client, files: dict, directory: Path, names=("seg", "sr")) -> list[Path]:
    """The backend's DICOM objects (`files`: name -> URL path) as files citrusv_<name>.dcm in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        url = files.get(name)
        if url is None:
            raise DicomExportError(f"the backend's export has no {name.upper()} object")
        path = directory / f"citrusv_{name}.dcm"
        path.write_bytes(client.download(url))
        written.append(path)
    return written
