"""Reading volumes and writing labelmaps with exactly the input's geometry.

Volumes are read with SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM series folders). The voxel array is kept in
SimpleITK's (k, j, i) order together with spacing, origin and direction in LPS. Labelmaps are written with
the input's own header where the format allows it: a NIfTI input gives a NIfTI labelmap whose header is
the input's (nibabel, same affine, qform/sform codes and pixdim, only the data type changed), a NRRD input a
NRRD labelmap with the same space fields (pynrrd). Other inputs get SimpleITK's `CopyInformation`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import InputError, TooLargeError
from ..outputs.quantify import VoxelGeometry

if TYPE_CHECKING:
    from .dicom_series import DicomSeries

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES + (".mha", ".mhd")
DEFAULT_MAX_VOXELS = 1024 * 1024 * 1024  # 1 G voxels: ~2 GB as int16, the most one job may hold
# --max-voxels bounds memory as much as work: it counts voxels of this many bytes, so a float64 volume may have
# a quarter of the voxels of an int16 one.
MAX_VOXELS_ITEMSIZE = 2


def check_volume_size(shape, itemsize: int, max_voxels: int, what: str) -> int:
    """The bytes a volume of `shape` and `itemsize` takes (Python integers: no overflow), refused beyond
    `max_voxels` voxels or `max_voxels` int16 voxels' worth of memory."""
    count = math.prod(int(n) for n in shape)
    nbytes = count * int(itemsize)
    if count > max_voxels or nbytes > max_voxels * MAX_VOXELS_ITEMSIZE:
        size = " x ".join(str(int(n)) for n in shape)
        raise TooLargeError(f"{what}: {size} voxels ({nbytes / 2**20:,.1f} MiB of {itemsize}-byte values) is more "
                            f"than the {max_voxels:,} allowed (--max-voxels, counted in {MAX_VOXELS_ITEMSIZE}-byte "
                            f"voxels: at most {max_voxels * MAX_VOXELS_ITEMSIZE / 2**20:,.0f} MiB); crop or resample "
                            f"it first (or raise the limit)")
    return nbytes


@dataclass
class Volume:
    """A scalar 3D volume: voxels in (k, j, i) order and where they are in the patient (LPS)."""

    voxels: np.ndarray
    geometry: VoxelGeometry
    name: str
    source_path: Path | None = None
    modality: str = "CT"
    metadata: dict = field(default_factory=dict)
    dicom: "DicomSeries | None" = None   # the source series, when it is one (volume.input.dicom_series)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.voxels.shape)

    def to_sitk(self, voxels: np.ndarray | None = None):
        """A SimpleITK image of `voxels` (default: this volume's) with this volume's geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.voxels if voxels is None else voxels)
        image.SetSpacing(tuple(float(s) for s in self.geometry.spacing))
        image.SetOrigin(tuple(float(o) for o in self.geometry.origin))
        image.SetDirection(tuple(float(d) for d in np.asarray(self.geometry.direction).flatten()))
        return image

    @classmethod
    def from_ijk_to_ras(cls, voxels: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume",
                        modality: str = "CT") -> "Volume":
        """From a voxel array (k, j, i) and a 4x4 IJK->RAS matrix, as a Slicer volume node has them."""
        matrix = np.asarray(ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or not np.allclose(matrix[3], [0, 0, 0, 1]):
            raise InputError("ijk_to_ras must be a finite 4x4 affine matrix with last row 0 0 0 1")
        if np.any(np.linalg.norm(matrix[:3, :3], axis=0) <= 0):
            raise InputError("ijk_to_ras has a zero-length axis (spacing 0)")
        if voxels.ndim != 3:
            raise InputError(f"voxels must be a 3D array (k, j, i), got shape {voxels.shape}")
        return cls(voxels, VoxelGeometry.from_ijk_to_ras(matrix), name, modality=modality)


def case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd") + VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _guess_modality(voxels: np.ndarray, metadata: dict) -> str:
    declared = str(metadata.get("0008|0060", "")).strip().upper()
    if declared in ("CT", "MR", "PT"):
        return "PET" if declared == "PT" else declared
    # CT in Hounsfield units has air near -1000 and is stored as integers.
    if np.issubdtype(voxels.dtype, np.integer) and voxels.size and voxels.min() <= -500:
        return "CT"
    return "MR"


def _read_image(path: Path, max_voxels: int, on_bad_dicom: str = "refuse", image_io: str | None = None,
                before_reading=None):
    import SimpleITK as sitk

    if path.is_dir():
        from .dicom_series import read_dicom_image

        return read_dicom_image(path, max_voxels, on_bad_dicom)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if image_io:
        reader.SetImageIO(image_io)
    reader.ReadImageInformation()
    itemsize = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    components = reader.GetNumberOfComponents()
    size = tuple(reader.GetSize()) + ((components,) if components > 1 else ())
    nbytes = check_volume_size(size, itemsize, max_voxels, path.name)
    check_data_complete(path)  # before the voxels are allocated: a short file may claim gigabytes
    if before_reading is not None:
        before_reading(nbytes)
    return reader.Execute(), {}, None


def check_data_complete(path: Path) -> None:
    """Refuse a NIfTI, NRRD or MetaImage file holding fewer voxel bytes than its header claims (SimpleITK reads
    a truncated NIfTI without an error, filling the rest with zeros). Files whose header names another data
    file, and formats this check does not parse, are left to the reader."""
    from .headers import read_header, require_voxel_bytes

    if not path.name.lower().endswith(VOLUME_SUFFIXES):
        return
    try:
        header = read_header(path, path.name)
    except InputError:
        return  # the reader gives its own message
    if header.external is None:
        require_voxel_bytes(header, path, path.name)


def read_volume(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, on_bad_dicom: str = "refuse",
                image_io: str | None = None, before_reading=None) -> Volume:
    """A 3D scalar volume; anything else (2D, 4D, RGB, unreadable) is a clear InputError. A DICOM folder is
    checked first (volume.input.dicom_series): `on_bad_dicom` "skip" leaves out files that do not fit, with a warning.
    `image_io` forces the SimpleITK reader of a file (e.g. "NrrdImageIO") instead of letting it pick one by name
    and content; `before_reading(nbytes)` is called with the memory the voxels will take, before they are read."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        image, metadata, series = _read_image(path, max_voxels, on_bad_dicom, image_io, before_reading)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise InputError(f"{path.name}: not a readable volume (NIfTI, NRRD, MHA/MHD or a DICOM folder): {reason}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name}: {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
                         f"image); a scalar CT, MR or PET volume is needed")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{path.name}: a {image.GetDimension()}D image; a 3D volume is needed"
                         + (" (use `citrusv infer` for a single 2D image)" if image.GetDimension() == 2 else
                            " (pick one time point or channel first)"))
    voxels = sitk.GetArrayFromImage(image)
    geometry = VoxelGeometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                             np.array(image.GetDirection(), dtype=float).reshape(3, 3))
    return Volume(voxels, geometry, case_name(path), source_path=path, modality=_guess_modality(voxels, metadata),
                  metadata=metadata, dicom=series)


# ---------------------------------------------------------------------------------------------- writing

def _is_nifti(path: Path | None) -> bool:
    return path is not None and path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_nrrd(path: Path | None) -> bool:
    return path is not None and path.name.lower().endswith(NRRD_SUFFIXES)


def write_labelmap(labels: np.ndarray, volume: Volume, path: Path) -> Path:
    """`labels` (k, j, i), written with the geometry of `volume` — its own header when formats match."""
    if labels.shape != volume.shape:
        raise InputError(f"labelmap shape {labels.shape} differs from the volume's {volume.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    if _is_nifti(path) and _is_nifti(volume.source_path):
        _write_nifti_like(labels, volume.source_path, path)
    elif _is_nrrd(path) and _is_nrrd(volume.source_path):
        _write_nrrd_like(labels, volume.source_path, path)
    else:
        import SimpleITK as sitk

        sitk.WriteImage(volume.to_sitk(labels), str(path), useCompression=True)
    return path


def _write_nifti_like(labels: np.ndarray, source: Path, path: Path) -> None:
    import nibabel as nib

    header = nib.load(str(source)).header.copy()
    header.set_data_dtype(labels.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    # affine=None keeps the header's own qform/sform fields and codes verbatim; nibabel holds (i, j, k).
    image = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), None, header)
    nib.save(image, str(path))


def _write_nrrd_like(labels: np.ndarray, source: Path, path: Path) -> None:
    import nrrd

    header = nrrd.read_header(str(source))
    keep = {key: header[key] for key in ("space", "space directions", "space origin", "kinds", "measurement frame",
                                          "space units") if key in header}
    keep["encoding"] = "gzip"
    nrrd.write(str(path), np.ascontiguousarray(labels.transpose(2, 1, 0)), keep, index_order="F")
