"""Request and response models of the service's own protocol (the OpenAI-compatible ones are in routers/openai.py).

Requests forbid unknown fields, so a misspelt option is a 422 that names it instead of being silently ignored.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from ..inference.engine import FORCED_SEGMENT_ANSWER
from ..volume.dicom_series import IDENTITY_KEYWORDS
from ..volume.pipeline import VolumeOptions
from .codec import COMPRESSIONS, VOXEL_DTYPES

MAX_PROMPT_CHARS = 8000
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Pixels = Annotated[int, Field(ge=28 * 28, le=16384 * 28 * 28)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- volumes

Uid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]
IdentityKeyword = Literal[IDENTITY_KEYWORDS]


class DicomReference(Strict):
    """Which DICOM series the uploaded voxels are (e.g. from Slicer's DICOM database): what the DICOM SEG and SR
    reference. One SOP Instance UID per slice k, in the uploaded volume's order; `positions`, when given, are
    each slice's Image Position (Patient) and must be where the volume's geometry puts it."""

    study_instance_uid: Uid
    series_instance_uid: Uid
    frame_of_reference_uid: Uid
    sop_class_uid: Uid
    sop_instance_uids: Annotated[list[Uid], Field(min_length=1, max_length=100_000)]
    positions: Annotated[list[Annotated[list[float], Field(min_length=3, max_length=3)]],
                         Field(max_length=100_000)] | None = None
    modality: Literal["CT", "MR", "PT"] | None = None
    series_description: Annotated[str, Field(max_length=64)] = ""
    series_number: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    identity: dict[IdentityKeyword, Annotated[str, Field(max_length=64)]] = Field(
        default_factory=dict, description="patient/study attributes copied into the outputs (only these keywords)")


class VolumeUpload(Strict):
    """A volume as a Slicer volume node holds it: voxels in (k, j, i) order plus the IJK->RAS matrix."""

    voxels: str = Field(description="base64 of the compressed raw little-endian voxel bytes, C order, shape [k, j, i]")
    compression: Literal[COMPRESSIONS] = "zlib"
    dtype: Literal[VOXEL_DTYPES]
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    ijk_to_ras: Annotated[list[Annotated[list[float], Field(min_length=4, max_length=4)]],
                          Field(min_length=4, max_length=4)]
    name: Annotated[str, Field(min_length=1, max_length=200)] = "volume"
    modality: Literal["CT", "MR", "PET"] = "CT"
    dicom: DicomReference | None = Field(None, description="the DICOM series these voxels are, for DICOM SEG/SR output")


class VolumeInfo(BaseModel):
    volume_id: str
    name: str
    modality: str
    shape: list[int]
    dtype: str
    spacing: list[float]
    origin_lps: list[float]
    ijk_to_ras: list[list[float]]
    bytes: int
    expires_in_s: float
    dicom_series_instance_uid: str | None = None


# ---------------------------------------------------------------------------------------------- jobs

class JobOptions(Strict):
    mode: Literal["propagate", "per-slice", "hybrid"] = "propagate"
    window: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="auto/training (each volume normalised as the training data: its 0.5-99.5th percentiles; "
                          "default), clinical (a CT preset per target), soft_tissue, lung, bone, brain, liver, or "
                          "'CENTER,WIDTH'")
    axis: Literal["axial", "coronal", "sagittal"] = Field("axial", validation_alias=AliasChoices("axis", "plane"))
    slice_range: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="[first, last) slice indices along the axis")
    slice: Annotated[int, Field(ge=0)] | None = Field(None, description="the slice the 'ask' task reads (default: middle)")
    min_pixels: Pixels | None = None
    max_pixels: Pixels | None = None
    answer: Annotated[str, Field(min_length=1, max_length=1000)] = FORCED_SEGMENT_ANSWER
    max_new_tokens: Annotated[int, Field(ge=1)] = 1024
    fill_holes: bool = True
    largest_component: bool = False
    key_candidates: Annotated[int, Field(ge=1, le=64)] = 9
    stop_after_empty: Annotated[int, Field(ge=1, le=64)] = 2
    report_slices: Annotated[int, Field(ge=1, le=64)] = 3
    detect_slices: Annotated[int, Field(ge=1, le=512)] = 16
    batch_size: Annotated[int, Field(ge=1, le=64)] = 4
    presence: Literal["mask", "object-score", "both"] = Field(
        "mask", description="how a slice is judged to show the target: its mask logits (default), SAM2's object score, both")
    object_score_suppression: bool = Field(False, description="let SAM2's propagation blank slices with a negative object score")
    answer_mode: Literal["forced", "free"] = Field(
        "forced", description="free: the model's own answer on the key slice, forced on the rest when it has a [SEG]")
    mask_upsampling: Literal["bilinear", "nearest"] = "bilinear"
    report_image: Literal["slices", "projection"] = Field(
        "slices", description="report from spread slices, or from a radiograph-like projection of the CT")
    dicom_out: bool | None = Field(None, description="also make a DICOM SEG and SR (default: when the volume was "
                                                     "uploaded with a DICOM reference)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not be larger than max_pixels")
        if self.slice_range and self.slice_range[0] >= self.slice_range[1]:
            raise ValueError("slice_range is [first, last) with first < last")
        return self

    def to_volume_options(self) -> VolumeOptions:
        return VolumeOptions(mode=self.mode, window=self.window, plane=self.axis, slice_range=self.slice_range,
                             min_pixels=self.min_pixels, max_pixels=self.max_pixels, answer=self.answer,
                             key_candidates=self.key_candidates, stop_after_empty=self.stop_after_empty,
                             fill_holes=self.fill_holes, largest_component=self.largest_component,
                             report_slices=self.report_slices, detect_slices=self.detect_slices,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, presence=self.presence,
                             object_score_suppression=self.object_score_suppression, answer_mode=self.answer_mode,
                             mask_upsampling=self.mask_upsampling, report_image=self.report_image)


class JobRequest(Strict):
    volume_id: Annotated[str, Field(min_length=1, max_length=64)]
    task: Literal["segment", "detect", "report", "ask"]
    prompt: Prompt = ""
    options: JobOptions = Field(default_factory=JobOptions)


class Progress(BaseModel):
    stage: str
    fraction: float
    message: str


class JobError(BaseModel):
    type: str
    message: str


class JobInfo(BaseModel):
    job_id: str
    task: str
    volume_id: str | None
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: Progress
    queue_position: int | None
    cancel_requested: bool
    error: JobError | None
    created_at: float
    timings: dict[str, float]
    result_url: str | None


# ---------------------------------------------------------------------------------------------- 2D images

class ImageRequest(Strict):
    image: str = Field(description="base64 PNG/JPEG (or a data: URI)")
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    task: Literal["ask", "segment", "detect", "report"] = "ask"
    answer: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="force this answer (e.g. 'Sure, it is [SEG].'): one prefill, no decoding")
    min_pixels: Pixels | None = None
    max_pixels: Pixels | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] = 1024
    mask_upsampling: Literal["bilinear", "nearest"] = "bilinear"
    mask_format: Literal["rle", "png"] = "rle"
