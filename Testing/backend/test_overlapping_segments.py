"""Overlapping segments through every writer, read back by readers that are not ours.

Real overlap cases on real anatomy (the chest CT's ground truth, on a tilted DICOM series written by
dicom_series_maker, not by our writer): a lesion inside its lung, an organ touching the lung, two targets with
identical masks, a target not found. Each segment's voxels must come back exactly from the NIfTI files
(as labels.json says where), from the `.seg.nrrd` (slicerio), from the DICOM SEG (pydicom, dcmjs, dcmqi), and
the SR's volumes must be those of the same voxels, referencing exactly the SEG's segments."""
from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import dciodvfy, dcmjs_segments, dcmqi_segments, frames_by_segment
from dicom_series_maker import chest_ct_series, rotation
from scipy import ndimage

from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.outputs.files import write_outputs
from citrusv_backend.volume.outputs.overlaps import multilabel
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import parse_window
from citrusv_backend.volume.tasks.results import Segment, VolumeResult, measure_into, segment_finding

pytestmark = pytest.mark.unit
MODEL = {"checkpoint": "/models/tiny"}


def overlap_masks(truth: np.ndarray) -> dict[str, np.ndarray]:
    """name -> (k, j, i) mask: the cases a writer must keep apart."""
    lung = truth == 6                                            # left lung
    centre = np.round(ndimage.center_of_mass(lung)).astype(int)
    k, j, i = np.indices(lung.shape)
    ball = ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) <= 16
    lesion = ball & lung                                         # inside the lung
    assert lesion.sum() > 50 and lesion.sum() < lung.sum()
    around = ndimage.binary_dilation(lung, iterations=2) & (truth == 0)   # outside every labelled structure
    touching = around & (k >= centre[0] - 3) & (k <= centre[0] + 3)   # touches the lung, shares no voxel
    right = truth == 5
    return {"left lung": lung, "left lung lesion": lesion, "mediastinum": touching, "right lung": right,
            "right pleural space": right.copy(), "liver": np.zeros_like(lung)}


@pytest.fixture(scope="module")
def written(chest_ct_path, chest_ct_segmentation_path, tmp_path_factory):
    import slicerio

    root = tmp_path_factory.mktemp("overlaps")
    series = chest_ct_series(chest_ct_path, root / "series", direction=rotation(20.0, -15.0, 30.0))
    volume = read_volume(series.folder)
    truth = slicerio.read_segmentation(str(chest_ct_segmentation_path))
    masks = overlap_masks(np.ascontiguousarray(truth["voxels"].transpose(2, 1, 0)))
    source = SliceSource(volume, "axial", parse_window("lung", "", volume.modality, volume.voxels))
    result = VolumeResult(task="segment", prompt="segment " + ", ".join(masks), case="chest",
                          labels=np.zeros(volume.shape, np.uint8), random_weights=True, source=source)
    for label, (name, mask) in enumerate(masks.items(), start=1):
        segment = Segment(label, name, f"Please segment the {name}.", mask, 17 if mask.any() else None, 0.9,
                          reason="" if mask.any() else "no slice whose mask logits show the target")
        measure_into(segment, volume, source.orientation.slice_axis)
        result.segments.append(segment)
    result.labels = multilabel(result.segments, volume.shape)
    result.findings = [segment_finding(s) for s in result.segments]
    files = write_outputs(result, root / "out", extra={"model": MODEL})
    return {"series": series, "volume": volume, "masks": masks, "files": files, "result": result,
            "labels": json.loads(files["labels"].read_text())}


def test_labels_json_says_where_each_segments_voxels_are(written):
    table, masks, out = written["labels"], written["masks"], written["files"]["labels"].parent
    assert table["per_segment_files"] is True and table["labelmap"] == "chest_seg.nii.gz"
    multi = sitk.GetArrayFromImage(sitk.ReadImage(str(out / table["labelmap"])))
    rows = {row["name"]: row for row in table["labels"]}
    for name, mask in masks.items():
        row = rows[name]
        assert row["voxel_count"] == int(mask.sum()) and row["found"] == bool(mask.any())
        if not mask.any():
            assert row["file"] is None and row["reason"] and row["volume_ml"] is None
            continue
        own = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["file"])))
        assert np.array_equal(own > 0, mask), name
        assert row["voxels_in_labelmap"] == int((multi == row["label"]).sum())
    # the inner one on top: the lesion whole in the multi-label file, the lung around it
    assert rows["left lung lesion"]["voxels_in_labelmap"] == int(masks["left lung lesion"].sum())
    assert rows["left lung"]["voxels_in_labelmap"] == int(masks["left lung"].sum() - masks["left lung lesion"].sum())
    assert rows["mediastinum"]["voxels_in_labelmap"] == int(masks["mediastinum"].sum())   # touching: nothing hidden
    assert rows["left lung"]["overlaps"] == [rows["left lung lesion"]["label"]]
    assert rows["mediastinum"]["overlaps"] == []
    # identical masks: the later label on top; the hidden one whole in its own file
    assert rows["right lung"]["voxels_in_labelmap"] == 0
    assert rows["right pleural space"]["voxels_in_labelmap"] == int(masks["right lung"].sum())


def test_slicerio_reads_each_segment_exactly_from_the_layers(written):
    import slicerio

    segmentation = slicerio.read_segmentation(str(written["files"]["segmentation"]))
    assert segmentation["voxels"].ndim == 4 and segmentation["voxels"].shape[0] == 2   # as many layers as needed
    for name, mask in written["masks"].items():
        [segment] = [s for s in segmentation["segments"] if s["name"] == name]
        read = slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0)
        assert np.array_equal(read, mask), name


def test_the_seg_holds_each_found_segments_own_voxels_for_pydicom_dcmjs_and_dcmqi(written, tmp_path):
    masks, seg_path = written["masks"], written["files"]["dicom_seg"]
    found = {name: mask for name, mask in masks.items() if mask.any()}
    seg = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(found)   # the target not found is absent
    slice_of = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): k
                for k, p in enumerate(written["series"].files)}
    frames = frames_by_segment(seg)
    for number, (name, mask) in enumerate(found.items(), start=1):
        rebuilt = np.zeros_like(mask)
        for uid, _, pixels in frames[number]:
            rebuilt[slice_of[uid]] = pixels > 0
        assert np.array_equal(rebuilt, mask), name
        assert len(frames[number]) == int(mask.any(axis=(1, 2)).sum())     # one frame per slice it touches
    viewer = dcmjs_segments(seg_path)
    assert viewer["segment_type"] == "BINARY" and viewer["bits_allocated"] == 1
    assert {s["label"]: s["voxels"] for s in viewer["segments"]} == {n: int(m.sum()) for n, m in found.items()}
    assert [s["tracking_uid"] for s in viewer["segments"]] == [s.TrackingUID for s in seg.SegmentSequence]
    grid = written["volume"].to_sitk(np.zeros(written["volume"].shape, np.uint8))
    read = dcmqi_segments(seg_path, tmp_path / "dcmqi", grid)
    assert set(read) == set(found)
    for name, mask in found.items():
        assert np.array_equal(read[name], mask), name
    errors, _ = dciodvfy(seg_path)
    assert errors == [], errors


def test_the_sr_measures_the_segs_segments_and_reports_the_missing_target(written):
    seg = pydicom.dcmread(written["files"]["dicom_seg"])
    sr = hd.sr.srread(written["files"]["dicom_sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    voxel_ml = float(np.prod(written["volume"].geometry.spacing)) / 1000.0
    found = [(name, mask) for name, mask in written["masks"].items() if mask.any()]
    assert len(groups) == len(found)
    for number, ((name, mask), group) in enumerate(zip(found, groups), start=1):
        assert group.referenced_segment.referenced_segment_numbers == [number]
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
        volume = next(m.value for m in group.get_measurements() if m.name.meaning == "Volume")
        assert float(volume) == pytest.approx(mask.sum() * voxel_ml, rel=1e-6), name
    texts = [str(item.TextValue) for item in _items(sr) if "TextValue" in item]
    assert any(text.startswith("liver: not found (no slice") for text in texts)
    errors, _ = dciodvfy(written["files"]["dicom_sr"])
    assert errors == [], errors


def _items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)
