"""Reading a DICOM series folder safely, and what the DICOM outputs need to know about the series.

SimpleITK's series reader reads whatever GDCM groups as one series: a broken file is left out, a missing
slice is bridged with averaged spacing, images of another orientation are stacked in. Here every header is
read first (pydicom, without the pixels) and the series is checked before a voxel is read:
- every file is a readable DICOM image whose pixel data is complete;
- one series, one orientation, one image size and pixel spacing;
- each slice has a position, and the positions step evenly along the slice normal (no gap, no duplicate,
  no gantry tilt: a sheared grid cannot be held exactly by an orthogonal volume).
A problem is refused with a message that names the files; `on_problem="skip"` instead leaves out files that
are not part of a regular volume (unreadable files, images of another orientation or size, copies of a
slice) and records a warning per skip. A gap or uneven spacing is refused either way: no skip can make it
right. The sorted files are then read by SimpleITK (GDCM: every transfer syntax), in exactly that order, and
the volume's geometry is the one computed from the headers.

`DicomSeries` is the per-instance metadata the DICOM SEG and SR need (SOP instance UIDs, positions, frame of
reference) and the least identity that lets them file beside their source in a PACS (`IDENTITY_KEYWORDS`);
nothing else of the headers is kept. It is built from the files here, or from what a client says of the
series it uploaded (`series_from_reference`), and is checked against the volume's geometry either way.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError

ON_PROBLEM = ("refuse", "skip")
# Patient and study identity copied into the outputs: what a PACS or trial database needs to file them beside
# their source (the Type 2 patient and study attributes, and clinical-trial identifiers). Nothing else.
IDENTITY_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                     "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                     "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialSiteID",
                     "ClinicalTrialSubjectID", "ClinicalTrialTimePointID")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Objects that sit beside a series but are no slice of it: SR, presentation states, key objects, PDFs, SEG,
# RT structures, raw data. Left out with a warning; any other file without pixels is a damaged image.
NON_VOLUME_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.",
                      "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.3")
ORIENTATION_TOLERANCE = 1e-4       # direction cosines
MAX_LISTED = 5


def position_tolerance(spacing: float) -> float:
    """How far a slice may be from where an even grid puts it (mm): rounding in headers, never a lost slice."""
    return max(0.02, 0.01 * spacing)


@dataclass(frozen=True)
class DicomInstance:
    sop_instance_uid: str
    sop_class_uid: str
    position: tuple[float, float, float]     # ImagePositionPatient (LPS, mm)
    instance_number: int | None = None


@dataclass
class DicomSeries:
    """One regular single-frame series, slices sorted along the normal: instances[k] is volume slice k."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    orientation: tuple[float, ...]           # ImageOrientationPatient: row and column direction cosines
    pixel_spacing: tuple[float, float]       # (between rows, between columns), as in the header
    rows: int
    columns: int
    instances: list[DicomInstance]
    slice_spacing: float = 0.0
    slice_thickness: float | None = None
    series_description: str = ""
    series_number: int | None = None
    identity: dict = field(default_factory=dict)   # IDENTITY_KEYWORDS present in the source, as text
    warnings: list[str] = field(default_factory=list)
    synthetic: bool = False                  # True: made up for a non-DICOM input (no identity exists)

    @property
    def normal(self) -> np.ndarray:
        row, column = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        return np.cross(row, column)

    def geometry(self):
        """The volume's geometry (ITK conventions: i along the rows' direction, j down the columns, k the normal)."""
        from ..outputs.quantify import VoxelGeometry

        direction = np.column_stack([self.orientation[:3], self.orientation[3:], self.normal])
        spacing = (self.pixel_spacing[1], self.pixel_spacing[0], self.slice_spacing or self.slice_thickness or 1.0)
        return VoxelGeometry(spacing, self.instances[0].position, direction)

    def output_problem(self) -> str | None:
        """Why DICOM SEG/SR cannot reference this series, or None."""
        if not self.frame_of_reference_uid:
            return "the series has no Frame of Reference UID (a secondary capture?), so a DICOM SEG cannot be placed on it"
        if not self.study_instance_uid or not self.series_instance_uid:
            return "the series lacks a Study or Series Instance UID"
        if any(not i.sop_instance_uid or not i.sop_class_uid for i in self.instances):
            return "some slices lack a SOP Instance or SOP Class UID"
        return None


# ---------------------------------------------------------------------------------------------- files

@dataclass
class _Header:
    path: Path
    dataset: object


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _read_headers(folder: Path) -> tuple[list[_Header], list[str], list[str]]:
    """(image headers, unreadable files with the reason, DICOM objects that are no slice: SR, SEG, ...)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers, broken, not_images = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            dataset = pydicom.dcmread(path, defer_size="1 KB")  # pixels deferred: only their length is read
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            if has_dicom_marker(path):
                broken.append(f"{path.name} ({type(error).__name__}: {str(error)[:80] or 'unreadable'})")
            continue  # a file that is not DICOM at all (notes, thumbnails) is not part of the series
        media_class = str(getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if media_class == DICOMDIR_CLASS:
            continue
        sop_class = _text(dataset, "SOPClassUID") or media_class
        if sop_class.startswith(NON_VOLUME_CLASSES):
            not_images.append(path.name)
            continue
        problem = _pixel_data_problem(path, dataset)
        if problem == "no pixel data":
            broken.append(f"{path.name} (damaged: no pixel data)")
        elif problem:
            broken.append(f"{path.name} ({problem})")
        else:
            headers.append(_Header(path, dataset))
    return headers, broken, not_images


def has_dicom_marker(path: Path) -> bool:
    """The 'DICM' marker after the 128-byte preamble: a DICOM file (Part 10)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _pixel_data_problem(path: Path, dataset) -> str | None:
    """A truncated copy still has a complete header: compare the pixel data's declared length with the file."""
    if "PixelData" not in dataset:
        return "no pixel data"
    element = dataset.get_item("PixelData")
    length, offset = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or offset is None or length == 0xFFFFFFFF:  # encapsulated: GDCM checks it when decoding
        return None
    size = path.stat().st_size
    if offset + length > size:
        return f"truncated: pixel data needs {offset + length:,} bytes, the file has {size:,}"
    return None


def _floats(dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = dataset.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) for v in numbers) else None


def _text(dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value).strip()


def _frames(dataset) -> int:
    try:
        return int(dataset.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _layout_key(dataset) -> tuple:
    orientation = _floats(dataset, "ImageOrientationPatient", 6)
    spacing = _floats(dataset, "PixelSpacing", 2)
    return (tuple(round(v / ORIENTATION_TOLERANCE) for v in orientation) if orientation else None,
            dataset.get("Rows"), dataset.get("Columns"), tuple(round(v, 4) for v in spacing) if spacing else None)


class _Checker:
    """Collects problems: refused at once (`refuse`) or skipped with a warning (`skip`) when skipping can help."""

    def __init__(self, folder: Path, on_problem: str):
        if on_problem not in ON_PROBLEM:
            raise InputError(f"unknown DICOM problem policy {on_problem!r}; use one of {', '.join(ON_PROBLEM)}")
        self.folder, self.on_problem, self.warnings = folder, on_problem, []

    def problem(self, message: str, skippable: bool = True) -> None:
        if self.on_problem == "skip" and skippable:
            self.warnings.append(f"skipped {message}")
            return
        hint = " (or pass --on-bad-dicom skip to leave such files out)" if skippable else ""
        raise InputError(f"{self.folder.name}: DICOM series refused, {message}{hint}; nothing was processed")


def read_series_headers(folder: str | Path, on_problem: str = "refuse") -> tuple[DicomSeries, list[Path]]:
    """The checked series of `folder` and its files, sorted along the slice normal (file k = slice k)."""
    folder = Path(folder)
    check = _Checker(folder, on_problem)
    headers, broken, not_images = _read_headers(folder)
    if broken:
        check.problem(f"{len(broken)} unreadable file(s): {_listing(broken)}")
    if not headers:
        raise InputError(f"{folder}: a folder, but it holds no DICOM series")
    series_ids = Counter(_text(h.dataset, "SeriesInstanceUID") for h in headers)
    if len(series_ids) > 1:
        listed = [f"{uid or '(no UID)'} ({count} files)" for uid, count in series_ids.most_common()]
        raise InputError(f"{folder.name}: holds {len(series_ids)} DICOM series ({_listing(listed)}); put each "
                         f"series in a folder of its own")
    if any(_frames(h.dataset) > 1 for h in headers):
        raise InputError(f"{folder.name}: an enhanced (multi-frame) DICOM image; only series of single-frame images "
                         f"are read here: convert it to NIfTI first (e.g. with dcm2niix or Slicer)")
    if not_images:
        check.warnings.append(f"left out {len(not_images)} DICOM object(s) that are no image slice (SR, SEG, "
                              f"presentation state, ...): {_listing(not_images)}")
    unplaced = [h.path.name for h in headers if _floats(h.dataset, "ImagePositionPatient", 3) is None
                or _layout_key(h.dataset)[0] is None or _layout_key(h.dataset)[3] is None]
    if unplaced:
        check.problem(f"{len(unplaced)} image(s) without a slice position, orientation or pixel spacing: "
                      f"{_listing(unplaced)}")
        headers = [h for h in headers if h.path.name not in set(unplaced)]
    layouts = Counter(_layout_key(h.dataset) for h in headers)
    if len(layouts) > 1:
        main = layouts.most_common(1)[0][0]
        odd = [h.path.name for h in headers if _layout_key(h.dataset) != main]
        check.problem(f"{len(odd)} image(s) with another orientation, size or pixel spacing than the other "
                      f"{layouts[main]} (mixed orientations): {_listing(odd)}")
        headers = [h for h in headers if _layout_key(h.dataset) == main]
    if not headers:
        raise InputError(f"{folder.name}: no image of the DICOM series can be placed in a volume")
    headers, positions = _sorted_slices(headers, check)
    series = _series_from_headers(headers, positions)
    series.warnings = check.warnings
    return series, [h.path for h in headers]


def _sorted_slices(headers: list[_Header], check: _Checker) -> tuple[list[_Header], np.ndarray]:
    orientation = np.array(_floats(headers[0].dataset, "ImageOrientationPatient", 6))
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([_floats(h.dataset, "ImagePositionPatient", 3) for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    headers, positions = [headers[n] for n in order], positions[order]
    distance = positions @ normal
    keep = [0]
    for n in range(1, len(headers)):
        if abs(distance[n] - distance[keep[-1]]) < 1e-3:
            same = _text(headers[n].dataset, "SOPInstanceUID") == _text(headers[keep[-1]].dataset, "SOPInstanceUID")
            if not same:
                check.problem(f"{headers[n].path.name}: a second image at the position of "
                              f"{headers[keep[-1]].path.name} ({distance[n]:.2f} mm along the normal; several "
                              f"phases or echoes in one series?)")
            else:
                check.warnings.append(f"left out {headers[n].path.name}: a copy of {headers[keep[-1]].path.name}")
            continue
        keep.append(n)
    headers, positions, distance = [headers[n] for n in keep], positions[keep], distance[keep]
    if len(headers) > 1:
        steps = np.diff(distance)
        spacing = float(np.median(steps))
        tolerance = position_tolerance(spacing)
        uneven = np.nonzero(np.abs(steps - spacing) > tolerance)[0]
        if len(uneven):
            where = [f"{headers[n].path.name} -> {headers[n + 1].path.name}: {steps[n]:.3g} mm" for n in uneven]
            check.problem(f"uneven slice positions (a missing or extra slice?): the slices are {spacing:.3g} mm "
                          f"apart, except {_listing(where)}", skippable=False)
        sideways = positions - positions[0] - np.outer(distance - distance[0], normal)
        shear = float(np.linalg.norm(sideways, axis=1).max())
        if shear > tolerance:
            tilt = math.degrees(math.atan2(shear, float(distance[-1] - distance[0])))
            check.problem(f"the slices are offset sideways along the stack by up to {shear:.3g} mm (gantry tilt "
                          f"about {tilt:.1f} degrees): a sheared grid; resample it to an orthogonal volume first "
                          f"(e.g. Slicer's DICOM reader with acquisition geometry regularization)", skippable=False)
    return headers, positions


def _series_from_headers(headers: list[_Header], positions: np.ndarray) -> DicomSeries:
    first = headers[0].dataset
    distance = positions @ np.cross(np.array(_floats(first, "ImageOrientationPatient", 6)[:3]),
                                    np.array(_floats(first, "ImageOrientationPatient", 6)[3:]))
    spacing = float(np.median(np.diff(distance))) if len(headers) > 1 else 0.0
    thickness = first.get("SliceThickness")
    instances = [DicomInstance(_text(h.dataset, "SOPInstanceUID"), _text(h.dataset, "SOPClassUID"),
                               tuple(float(v) for v in p), _instance_number(h.dataset))
                 for h, p in zip(headers, positions)]
    return DicomSeries(
        study_instance_uid=_text(first, "StudyInstanceUID"), series_instance_uid=_text(first, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"), modality=_text(first, "Modality").upper(),
        orientation=_floats(first, "ImageOrientationPatient", 6), pixel_spacing=_floats(first, "PixelSpacing", 2),
        rows=int(first.Rows), columns=int(first.Columns), instances=instances, slice_spacing=spacing,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        series_description=_text(first, "SeriesDescription"), series_number=_instance_number(first, "SeriesNumber"),
        identity={k: _text(first, k) for k in IDENTITY_KEYWORDS if k in first})


def _instance_number(dataset, keyword: str = "InstanceNumber") -> int | None:
    try:
        return int(dataset.get(keyword))
    except (TypeError, ValueError):
        return None


def read_dicom_image(folder: Path, max_voxels: int, on_problem: str = "refuse"):
    """(SimpleITK image with the headers' geometry, metadata, DicomSeries) of a checked series folder."""
    import SimpleITK as sitk

    series, files = read_series_headers(folder, on_problem)
    count = len(files) * series.rows * series.columns
    if count > max_voxels:
        raise InputError(f"{folder.name}: {series.columns} x {series.rows} x {len(files)} voxels is more than the "
                         f"{max_voxels:,} allowed for one volume; crop or resample it first (or raise the limit)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])  # our order: ITK never re-sorts an explicit list
    image = reader.Execute()
    if image.GetDimension() == 3:  # one file gives a 2D image: read_volume refuses it as such
        if image.GetSize()[2] != len(files):
            raise InputError(f"{folder.name}: read {image.GetSize()[2]} slices of {len(files)} files")
        geometry = series.geometry()
        image.SetOrigin(geometry.origin)
        image.SetSpacing(geometry.spacing)
        image.SetDirection(tuple(float(v) for v in np.asarray(geometry.direction).flatten()))
    return image, {"0008|0060": series.modality, "series_count": 1}, series


# ---------------------------------------------------------------------------------------------- clients

def series_from_reference(reference: dict, geometry, shape: tuple[int, int, int]) -> DicomSeries:
    """A DicomSeries from what a client says of the series its volume came from, checked against the volume.

    `reference`: study_instance_uid, series_instance_uid, frame_of_reference_uid, modality, sop_class_uid,
    sop_instance_uids (one per slice k, in volume order), and optionally identity ({keyword: text}, only
    IDENTITY_KEYWORDS are kept), series_description, series_number, positions (ImagePositionPatient per slice;
    when given, each must be where the volume's geometry puts slice k)."""
    uids = list(reference.get("sop_instance_uids") or [])
    if len(uids) != shape[0]:
        raise InputError(f"the DICOM reference names {len(uids)} instance(s), the volume has {shape[0]} slices "
                         f"(one SOP Instance UID per slice k, in volume order)")
    if len(set(uids)) != len(uids):
        raise InputError("the DICOM reference names the same SOP Instance UID for two slices")
    positions = reference.get("positions")
    computed = geometry.index_to_lps(np.array([[k, 0, 0] for k in range(shape[0])]))
    if positions is not None:
        positions = np.asarray(positions, dtype=float)
        if positions.shape != computed.shape:
            raise InputError(f"the DICOM reference has {len(positions)} positions for {shape[0]} slices")
        worst = float(np.abs(positions - computed).max())
        if worst > position_tolerance(min(geometry.spacing)):
            raise InputError(f"the DICOM reference's slice positions are up to {worst:.3g} mm from where the uploaded "
                             f"volume puts its slices (missing or uneven slices, another orientation?); the SEG would "
                             f"not lie on the series")
    direction = np.asarray(geometry.direction)
    identity = {k: str(v) for k, v in (reference.get("identity") or {}).items() if k in IDENTITY_KEYWORDS}
    sop_class = str(reference.get("sop_class_uid") or "")
    series = DicomSeries(
        study_instance_uid=str(reference.get("study_instance_uid") or ""),
        series_instance_uid=str(reference.get("series_instance_uid") or ""),
        frame_of_reference_uid=str(reference.get("frame_of_reference_uid") or ""),
        modality=str(reference.get("modality") or "").upper(),
        orientation=tuple(float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])),
        pixel_spacing=(geometry.spacing[1], geometry.spacing[0]), rows=shape[1], columns=shape[2],
        instances=[DicomInstance(str(uid), sop_class, tuple(float(v) for v in p)) for uid, p in zip(uids, computed)],
        slice_spacing=geometry.spacing[2], series_description=str(reference.get("series_description") or ""),
        series_number=reference.get("series_number"), identity=identity)
    problem = series.output_problem()
    if problem:
        raise InputError(f"the DICOM reference is incomplete: {problem}")
    return series
