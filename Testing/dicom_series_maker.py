"""DICOM CT series for tests, written the way a CT scanner exports them (one pydicom file per slice, CT Image
Storage, unsigned pixels with a rescale intercept, files named in acquisition order rather than by position),
and the damaged variants that a real archive produces (a broken file, a lost slice, a mixed-in scout).

Independent of the package's own reading and writing: only pydicom's data model, filled in by hand here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root: test UIDs never collide with a hospital's
# Identity the outputs may carry, and identity they must never copy.
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "CVTEST-0042", "PatientBirthDate": "19700101",
           "PatientSex": "F", "AccessionNumber": "ACC12345", "StudyID": "S1", "StudyDate": "20260301",
           "StudyTime": "101500", "ReferringPhysicianName": "House^Gregory"}
NOT_TO_COPY = {"PatientAddress": "1 Main Street, Springfield", "PatientAge": "056Y", "OtherPatientIDs": "MRN-998877",
               "InstitutionName": "Springfield General", "OperatorsName": "Tech^Tom",
               "PatientComments": "claustrophobic"}


@dataclass
class SeriesFiles:
    folder: Path
    files: list[Path]            # files[k] holds slice k of the volume
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str]          # sop_uids[k]: slice k


def rotation(degrees_x: float, degrees_y: float, degrees_z: float) -> np.ndarray:
    """An orthonormal direction matrix (columns: i, j, k directions in LPS), tilted about the three axes."""
    x, y, z = (math.radians(a) for a in (degrees_x, degrees_y, degrees_z))
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_ct_series(voxels: np.ndarray, spacing, origin, direction, folder: Path, *, shear_mm: float = 0.0,
                    description: str = "Chest CT 10 mm") -> SeriesFiles:
    """voxels (k, j, i) in HU -> one CT file per slice; slice k at origin + k * spacing_k * direction[:, 2].

    `shear_mm` shifts slice k sideways by k * shear_mm along the row direction (a gantry-tilted acquisition)."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(direction, dtype=float)
    study, series, frame = generate_uid(ROOT), generate_uid(ROOT), generate_uid(ROOT)
    depth = voxels.shape[0]
    files, uids = [], []
    # Scanners number the files in acquisition order, here head to feet: the reverse of the k order.
    for k in range(depth):
        position = (np.asarray(origin, dtype=float) + k * spacing[2] * direction[:, 2]
                    + k * shear_mm * direction[:, 0])
        uid = generate_uid(ROOT)
        dataset = _ct_slice(voxels[k], spacing, position, direction, study, series, frame, uid,
                            instance_number=depth - k, description=description)
        path = folder / f"IM{depth - k:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(uid)
    return SeriesFiles(folder, files, study, series, frame, uids)


def _ct_slice(pixels: np.ndarray, spacing, position, direction, study, series, frame, uid, instance_number,
              description) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    for keyword, value in (PATIENT | NOT_TO_COPY).items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PositionReferenceIndicator = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "CT", 3, instance_number, description
    ds.Manufacturer, ds.ManufacturerModelName = "Test Scanner Co", "CT-1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = "20260301", "101600", 1
    ds.KVP, ds.SliceThickness = 120, float(spacing[2])
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]   # between rows, between columns
    ds.PatientPosition = "FFS"
    stored = np.clip(np.round(pixels) + 1024, 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = stored.tobytes()
    return ds


def chest_ct_series(chest_ct_path: Path, folder: Path, direction=None, shear_mm: float = 0.0) -> SeriesFiles:
    """The slicerio chest CT as a scanner's series: its own grid, or the same voxels on a tilted `direction`."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(chest_ct_path))
    voxels = sitk.GetArrayFromImage(image)
    own = np.array(image.GetDirection()).reshape(3, 3)
    return write_ct_series(voxels, image.GetSpacing(), image.GetOrigin(), own if direction is None else direction,
                           folder, shear_mm=shear_mm)


def read_slices(series: SeriesFiles) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in series.files]
