"""A volume result as DICOM: a Segmentation (SEG) and a TID 1500 measurement report (Comprehensive 3D SR).

Both are built by highdicom. The SEG is BINARY, one segment per target that was found, each with its coded
category/type (volume.outputs.terminology), CitrusV and the model as the algorithm, and one frame per source slice
that the segment touches: frame <-> source instance exactly as volume slice k <-> `series.instances[k]`, so the
SEG lies on the source series' own frame of reference and slice positions (oblique series included). The
pixels are each segment's own mask (`Segment.mask`): segments may overlap (a lesion inside its organ), which a
BINARY SEG allows, one frame per segment and slice.

The SR holds per found segment a measurement group (TID 1411) that references its SEG segment: volume, long and
short axis (RECIST-style, in the slice plane), mean intensity, finding type and site, tracking identifier and
UID (the same as the segment's). Text that has no coded home — the report's FINDINGS / IMPRESSION, detections,
targets not found, "research use only" and the random-weights warning — goes into the report's Qualitative
Evaluations container as TEXT items. The two warnings are also in the series descriptions and image comments.

The source is described by a `DicomSeries` (volume.input.dicom_series); only its UIDs, geometry and the least
identity (`IDENTITY_KEYWORDS`) are copied. A volume that did not come from DICOM gets a new study: its image
series is written too (so every reference resolves), with no patient or study identity, marked as such.
"""
from __future__ import annotations

import datetime
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import InputError
from ..input.dicom_series import DicomInstance, DicomSeries
from ..input.io import Volume
from .terminology import segment_codes

MANUFACTURER = "CitrusV for 3D Slicer"
RESEARCH_NOTE = "RESEARCH USE ONLY - not for diagnostic use"
RANDOM_NOTE = "RANDOM WEIGHTS: made by a random test model; every mask and number is noise"
EDITED_NOTE = ("Segments edited by the user after the model's segmentation: the segmentation and every "
               "measurement describe the edited segments")
NO_IDENTITY_NOTE = "No patient or study identity: made from a non-DICOM volume file"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER, IMAGE_SERIES_NUMBER = 901, 902, 900
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")
ML = ("ml", "UCUM", "milliliter")
IMAGE_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


@dataclass
class DicomObjects:
    seg: object | None               # pydicom Dataset, None when no segment was found
    sr: object
    images: list                     # the image series written for a non-DICOM input, else []
    segment_numbers: dict            # result label -> SEG segment number


def model_name(model_info: dict | None) -> str:
    """A short name of the weights for the objects: the hub id of a hub snapshot, else the folder's name."""
    checkpoint = str((model_info or {}).get("checkpoint") or "unknown model")
    for part in Path(checkpoint).parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return Path(checkpoint).name or checkpoint


def wants_dicom(requested: bool | None, volume: Volume) -> bool:
    """--dicom-out / --no-dicom-out, else (None) only when the input is a DICOM series that a SEG can reference:
    an output the user did not ask for never blocks the others (`dicom_skipped` says why it is left out)."""
    if requested is None:
        return volume.dicom is not None and volume.dicom.output_problem() is None
    return bool(requested)


def dicom_skipped(requested: bool | None, volume: Volume) -> str | None:
    """Why a DICOM series' default SEG and SR are left out (None: nothing left out); an explicit --dicom-out
    refuses instead (`check_dicom_possible`)."""
    if requested is not None or volume.dicom is None:
        return None
    problem = volume.dicom.output_problem()
    return f"no DICOM SEG/SR written: {problem}; every other output is complete" if problem else None


def check_dicom_possible(volume: Volume) -> None:
    """Refuse before the model runs when DICOM output was asked for but cannot be made."""
    if volume.dicom is not None:
        problem = volume.dicom.output_problem()
        if problem:
            raise InputError(f"{volume.name}: no DICOM output possible: {problem} (use --no-dicom-out)")
    elif volume.modality not in IMAGE_CLASSES:
        raise InputError(f"{volume.name}: DICOM output for a non-DICOM {volume.modality} volume is not supported "
                         f"(only CT and MR images can be described without the scanner's own headers)")


# ---------------------------------------------------------------------------------------------- sources

def _uid() -> str:
    from highdicom import UID

    return str(UID())


def _base_dataset(series: DicomSeries):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in series.identity.items():
        setattr(ds, keyword, value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, None)   # Type 2: present, empty when unknown
    if series.synthetic:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = NO_IDENTITY_NOTE[:64]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.study_instance_uid, series.series_instance_uid
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = series.frame_of_reference_uid, None
    ds.Modality = series.modality or "OT"
    ds.Rows, ds.Columns = series.rows, series.columns
    ds.PixelSpacing = [f"{v:.10g}" for v in series.pixel_spacing]
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in series.orientation]
    thickness = series.slice_thickness or series.slice_spacing
    if thickness:
        ds.SliceThickness = f"{thickness:.10g}"
    return ds


def source_datasets(series: DicomSeries) -> list:
    """One header per source slice, holding only what the SEG and SR take from their source."""
    datasets = []
    for number, instance in enumerate(series.instances, start=1):
        ds = _base_dataset(series)
        ds.SOPClassUID, ds.SOPInstanceUID = instance.sop_class_uid, instance.sop_instance_uid
        ds.ImagePositionPatient = [f"{v:.10g}" for v in instance.position]
        ds.InstanceNumber = instance.instance_number or number
        datasets.append(ds)
    return datasets


def synthetic_series(volume: Volume) -> DicomSeries:
    """A new study and image series for a volume that has no DICOM source (positions from its geometry)."""
    check_dicom_possible(volume)
    geometry = volume.geometry
    direction = np.asarray(geometry.direction)
    positions = geometry.index_to_lps(np.array([[k, 0, 0] for k in range(volume.shape[0])]))
    sop_class = IMAGE_CLASSES[volume.modality]
    return DicomSeries(
        study_instance_uid=_uid(), series_instance_uid=_uid(), frame_of_reference_uid=_uid(),
        modality=volume.modality, orientation=tuple(np.concatenate([direction[:, 0], direction[:, 1]]).tolist()),
        pixel_spacing=(geometry.spacing[1], geometry.spacing[0]), rows=volume.shape[1], columns=volume.shape[2],
        instances=[DicomInstance(_uid(), sop_class, tuple(p), k + 1) for k, p in enumerate(positions.tolist())],
        slice_spacing=geometry.spacing[2], series_description=f"{volume.name} (from a non-DICOM file)"[:64],
        series_number=IMAGE_SERIES_NUMBER, synthetic=True)


def image_datasets(volume: Volume, series: DicomSeries) -> list:
    """The image series of a synthetic study: the volume's voxels, one CT or MR image per slice."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    voxels = np.asarray(volume.voxels)
    integral = np.issubdtype(voxels.dtype, np.integer)
    low, high = (float(voxels.min()), float(voxels.max())) if voxels.size else (0.0, 0.0)
    slope = 1.0 if integral and -32768 <= low and high <= 32767 else max(high - low, 1e-6) / 65535.0
    intercept = 0.0 if slope == 1.0 else low
    now = datetime.datetime.now()
    datasets = []
    for k, ds in enumerate(source_datasets(series)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SeriesNumber, ds.SeriesDescription = series.series_number, series.series_description
        ds.StudyDescription = "CitrusV results (no patient identity)"
        ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.Manufacturer, ds.ImageType = MANUFACTURER, ["DERIVED", "SECONDARY", "AXIAL" if ds.Modality == "CT" else "OTHER"]
        ds.PatientPosition = ds.Laterality = None   # Type 2C: unknown for a file without a scanner header
        ds.ImageComments = NO_IDENTITY_NOTE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        plane = voxels[k].astype(np.float64)
        if slope == 1.0:
            stored, ds.PixelRepresentation = plane.astype(np.int16), 1
        else:
            stored, ds.PixelRepresentation = np.round((plane - intercept) / slope).astype(np.uint16), 0
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:.10g}", f"{slope:.10g}"
        if ds.Modality == "CT":
            ds.KVP, ds.AcquisitionNumber, ds.RescaleType = None, None, "HU"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", None
            ds.ScanOptions = ds.RepetitionTime = ds.EchoTime = ds.EchoTrainLength = None
            ds.RescaleType = "US"
        ds.PixelData = stored.tobytes()
        datasets.append(ds)
    return datasets


# ---------------------------------------------------------------------------------------------- SEG

def _algorithm(model: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name="CitrusV", family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__, source=MANUFACTURER,
                                              parameters={"model": model[:64]})


def _notes(random_weights: bool, series: DicomSeries) -> list[str]:
    return [RESEARCH_NOTE] + ([RANDOM_NOTE] if random_weights else []) + ([NO_IDENTITY_NOTE] if series.synthetic else [])


def build_seg(result, series: DicomSeries, sources: list, model: str):
    """(SEG dataset or None, label -> segment number, label -> tracking UID) for the found segments."""
    import highdicom as hd
    from highdicom.sr import CodedConcept

    found = [s for s in result.segments if s.mask.any()]
    tracking = {s.label: _uid() for s in result.segments}
    if not found:
        return None, {}, tracking
    descriptions, numbers = [], {}
    algorithm_type = (hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if result.settings.get("edited")
                      else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC)   # edited by hand after the model
    for number, segment in enumerate(found, start=1):
        coded = segment_codes(segment.name)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.name[:64], segmented_property_category=coded.category,
            segmented_property_type=coded.type, algorithm_type=algorithm_type,
            algorithm_identification=_algorithm(model), tracking_uid=tracking[segment.label],
            tracking_id=f"CitrusV {segment.label} {segment.name}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*(segment.color or _color(segment.label))))
        if coded.modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                CodedConcept.from_code(coded.modifier)]
        descriptions.append(description)
        numbers[segment.label] = number
    pixels = np.stack([s.mask for s in found], axis=-1).astype(np.uint8)
    notes = _notes(result.random_weights, series)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=_uid(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(), instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model[-64:],
        software_versions=__version__, device_serial_number="none", content_label="CITRUSV",
        content_description=("RANDOM WEIGHTS - noise" if result.random_weights else RESEARCH_NOTE)[:64],
        omit_empty_frames=True)
    seg.SeriesDescription = _series_description("CitrusV SEG", result.random_weights)
    seg.ImageComments = "; ".join(notes)
    return seg, numbers, tracking


def _color(label: int) -> tuple[int, int, int]:
    from .colors import segment_color

    return segment_color(label)


def _series_description(kind: str, random_weights: bool) -> str:
    return f"{kind} - {'RANDOM WEIGHTS (noise)' if random_weights else 'research use only'}"


# ---------------------------------------------------------------------------------------------- SR

def _measurements(segment, modality: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    m = segment.measurements
    items = []
    if m.get("volume_ml") is not None:
        items.append(hd.sr.Measurement(name=codes.SCT.Volume, value=float(m["volume_ml"]), unit=Code(*ML)))
    for key, code in (("long_axis_mm", codes.SCT.LongAxis), ("short_axis_mm", codes.SCT.ShortAxis)):
        if m.get(key) is not None:
            items.append(hd.sr.Measurement(name=code, value=float(m[key]), unit=codes.UCUM.Millimeter))
    mean = m.get("intensity_mean")
    if mean is not None and modality in ("CT", "MR"):
        name, unit = ((codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit) if modality == "CT"
                      else (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits))
        items.append(hd.sr.Measurement(name=name, value=float(mean), unit=unit, derivation=codes.SCT.Mean))
    return items


def _procedure(modality: str):
    from pydicom.sr.codedict import codes

    return {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion,
            "PT": codes.LN.PETUnspecifiedBodyRegion, "PET": codes.LN.PETUnspecifiedBodyRegion}.get(
        modality, codes.cid100.ImagingProcedure)


def _text_items(result, series: DicomSeries, numbers: dict) -> list[tuple[str, str]]:
    """(concept, text) pairs for the Qualitative Evaluations container."""
    items = [("Comment", note) for note in _notes(result.random_weights, series)]
    if result.experimental:  # a report from images Citrus-V's reports were not trained on
        items.append(("Comment", result.experimental))
    if result.settings.get("edited"):
        items.append(("Comment", EDITED_NOTE))
    if result.report_findings:
        items.append(("Finding", f"FINDINGS: {result.report_findings}"))
    if result.report_impression:
        items.append(("Impression", f"IMPRESSION: {result.report_impression}"))
    for box in result.boxes:
        size = " x ".join(f"{v:.1f}" for v in box["size_mm"])
        items.append(("Finding", f"detection {box['label'] or 'finding'}: slices {box['slices'][0]}-{box['slices'][1]}, "
                                 f"{size} mm, {box['laterality']}"))
    for segment in result.segments:
        if segment.label not in numbers:
            items.append(("Finding", f"{segment.name}: not found" + (f" ({segment.reason})" if segment.reason else "")))
    return items


def build_sr(result, series: DicomSeries, sources: list, seg, numbers: dict, tracking: dict, model: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(), name="CitrusV", manufacturer_name=MANUFACTURER, model_name=model[-64:]))
    algorithm = hd.sr.AlgorithmIdentification(name="CitrusV", version=__version__, parameters=[model[:64]])
    groups = []
    for segment in result.segments:
        if segment.label not in numbers:
            continue
        coded = segment_codes(segment.name)
        site = hd.sr.FindingSite(coded.type, laterality=coded.modifier) if coded.anatomic else None
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking[segment.label],
                                                         identifier=f"CitrusV {segment.label} {segment.name}"[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=numbers[segment.label],
                source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid)),
            finding_type=coded.type, finding_category=coded.category, algorithm_id=algorithm,
            finding_sites=[site] if site else None, measurements=_measurements(segment, series.modality)))
    if not groups:  # TID 1500 needs one group: the whole study, its texts below
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(), identifier=f"CitrusV {result.task}"),
            algorithm_id=algorithm))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=_procedure(series.modality), imaging_measurements=groups)
    container = hd.sr.ContainerContentItem(name=Code(*QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=getattr(codes.DCM, concept), value=text[:10000],
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for concept, text in _text_items(result, series, numbers)])
    report[0].ContentSequence.append(container)
    evidence = ([seg] if seg is not None else []) + sources
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        is_verified=False)
    sr.SeriesDescription = _series_description("CitrusV measurements", result.random_weights)
    return sr


# ---------------------------------------------------------------------------------------------- entry

def dicom_objects(result, volume: Volume, model: str) -> DicomObjects:
    """The SEG, the SR and (for a non-DICOM input) the image series they reference, in memory."""
    check_dicom_possible(volume)
    series = volume.dicom if volume.dicom is not None else synthetic_series(volume)
    images = image_datasets(volume, series) if series.synthetic else []
    sources = images or source_datasets(series)
    grid = (len(series.instances), series.rows, series.columns)
    for segment in result.segments:
        if segment.mask.shape != grid:
            raise InputError(f"segment {segment.name!r}: its mask {segment.mask.shape} is not on the DICOM series' grid {grid}")
    seg, numbers, tracking = build_seg(result, series, sources, model)
    sr = build_sr(result, series, sources, seg, numbers, tracking, model)
    return DicomObjects(seg, sr, images, numbers)


def dataset_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom_outputs(result, volume: Volume, out_dir: Path, case: str, model: str) -> dict[str, Path]:
    """`{case}_seg.dcm`, `{case}_sr.dcm` (and `{case}_image_NNNN.dcm` for a non-DICOM input), each written whole."""
    from ...paths import atomic_path

    objects = dicom_objects(result, volume, model)
    named = [("dicom_sr", f"{case}_sr.dcm", objects.sr)]
    if objects.seg is not None:
        named.insert(0, ("dicom_seg", f"{case}_seg.dcm", objects.seg))
    named += [(f"dicom_image_{k + 1:04d}", f"{case}_image_{k + 1:04d}.dcm", ds) for k, ds in enumerate(objects.images)]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, name, dataset in named:
        path = out_dir / name
        with atomic_path(path) as temporary:
            temporary.write_bytes(dataset_bytes(dataset))
        files[kind] = path
    return files


def describe_objects(objects: DicomObjects) -> dict:
    """UIDs a client needs to find the objects again (e.g. in Slicer's DICOM database)."""
    return {"seg_sop_instance_uid": getattr(objects.seg, "SOPInstanceUID", None),
            "sr_sop_instance_uid": objects.sr.SOPInstanceUID, "study_instance_uid": objects.sr.StudyInstanceUID,
            "segment_numbers": {str(k): v for k, v in objects.segment_numbers.items()}}


__all__ = ["DicomObjects", "check_dicom_possible", "dataset_bytes", "describe_objects", "dicom_objects",
           "dicom_skipped", "wants_dicom", "write_dicom_outputs"]
