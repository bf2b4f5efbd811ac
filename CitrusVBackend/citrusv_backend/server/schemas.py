"""Request and response models of the service's own protocol (the OpenAI-compatible ones are in routers/openai.py).

Requests forbid unknown fields, so a misspelt option is a 422 that names it instead of being silently ignored.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..inference.options import ImageOptions
from ..option_fields import request_model
from ..option_types import PIXEL_BUDGET_MAX, PIXEL_BUDGET_MIN
from ..volume.input.dicom_series import IDENTITY_KEYWORDS
from ..volume.options import VolumeOptions
from .codec import COMPRESSIONS, VOXEL_DTYPES

MAX_PROMPT_CHARS = 8000
MAX_DIMENSION = 65536  # voxels along one axis: beyond any scanner, and three of them multiply without overflow
Dimension = Annotated[int, Field(ge=1, le=MAX_DIMENSION)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Pixels = Annotated[int, Field(ge=PIXEL_BUDGET_MIN, le=PIXEL_BUDGET_MAX)]  # a pixel budget (the chat extension's)


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
    shape: tuple[Dimension, Dimension, Dimension]
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

class JobOptions(request_model(VolumeOptions, "VolumeOptionFields", base=Strict)):
    """A volume job's options: the fields of VolumeOptions (volume/options.py), which declares them. The slice
    axis was called `plane` once; a request may still say so (docs/http-api.md)."""

    def to_volume_options(self) -> VolumeOptions:
        return self.to_dataclass()


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

class ImageRequest(request_model(ImageOptions, "ImageOptionFields", base=Strict)):
    image: str = Field(description="base64 PNG/JPEG (or a data: URI)")
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    mask_format: Literal["rle", "png"] = "rle"
