"""Request and response models of interactive refinement (`/v1/volumes/{id}/segments/...`).

Coordinates are voxel indices (i, j, k) of the uploaded volume, fractions allowed; masks travel as crops of
the volume's (k, j, i) grid: offset, shape and zlib-compressed uint8 voxels (non-zero = in the segment), base64.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from ..option_fields import request_model
from ..server.schemas import MAX_PROMPT_CHARS, Strict
from ..volume.options import RefineOptions, VolumeOptions
from .volume_prompts import BoxPrompt, PointPrompt, RefinePrompts

SEGMENT_NAME = r"^[A-Za-z0-9._-]{1,64}$"
Coordinate = Annotated[float, Field(allow_inf_nan=False)]
IJK = tuple[Coordinate, Coordinate, Coordinate]
Index = Annotated[int, Field(ge=0)]
Size = Annotated[int, Field(ge=1)]


class MaskCrop(Strict):
    offset: tuple[Index, Index, Index] = Field(description="(k, j, i) of the crop's first voxel")
    shape: tuple[Size, Size, Size] = Field(description="(k, j, i) size of the crop")
    data: str = Field(description="base64 of the zlib-compressed uint8 voxels in C order; non-zero = inside")
    dtype: Literal["uint8"] = "uint8"
    encoding: Literal["zlib+base64"] = "zlib+base64"


SliceSettings = request_model(
    VolumeOptions, "SliceSettings", only=("axis", "window", "slice_range", "min_pixels", "max_pixels", "answer"),
    base=Strict, doc="How the segment's slices were made (as the segmentation job's options); ignored when "
                     "starting from a job.")


class SessionRequest(Strict):
    """Start refining a segment: from a finished segmentation job (its mask, slices and text prompt), from a mask
    the client holds (e.g. after editing it by hand), or both (the job's slices with the client's mask)."""

    job_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    label: Annotated[int, Field(ge=1, le=255)] | None = Field(None, description="the job's segment (default: its only one)")
    mask: MaskCrop | None = None
    query: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = Field(
        None, description="the target's text prompt, for keep_text (default: the job's)")
    settings: SliceSettings = Field(default_factory=SliceSettings)
    anchors: list[Index] = Field(default_factory=list, max_length=1024,
                                 description="slices already confirmed (e.g. the key slice): propagation stops there")

    @model_validator(mode="after")
    def _has_a_mask(self):
        if self.job_id is None and self.mask is None:
            raise ValueError("give job_id (a finished segmentation job) or mask (the segment's current voxels)")
        return self


class Point(Strict):
    ijk: IJK
    positive: bool = True


class Box(Strict):
    ijk_min: IJK
    ijk_max: IJK


class RefineRequest(request_model(RefineOptions, "RefineOptionFields", base=Strict)):
    points: list[Point] = Field(default_factory=list, max_length=256)
    box: Box | None = None
    expected_version: Annotated[int, Field(ge=0)] | None = Field(
        None, description="refuse (409) unless the segment is at this version (no client works on a stale mask)")

    @model_validator(mode="after")
    def _has_a_prompt(self):
        if not self.points and self.box is None:
            raise ValueError("a refinement needs at least one point or a box")
        return self

    def prompts(self) -> RefinePrompts:
        box = BoxPrompt(tuple(self.box.ijk_min), tuple(self.box.ijk_max)) if self.box else None
        return RefinePrompts([PointPrompt(tuple(p.ijk), p.positive) for p in self.points], box)

    def options(self) -> RefineOptions:
        return self.to_dataclass()


class StepRequest(Strict):
    expected_version: Annotated[int, Field(ge=0)] | None = None


class Change(BaseModel):
    offset: list[int]
    shape: list[int]
    dtype: str
    encoding: str
    data: str


class StepResult(BaseModel):
    """What one step changed: paste `change` (replace every voxel of its box) into the segment to follow it."""

    volume_id: str
    segment: str
    kind: Literal["refine", "undo", "redo"]
    version: int
    changed: bool
    change: Change | None
    changed_slices: list[int]
    refined_slices: list[int]
    propagated_slices: list[int]
    voxels: int
    can_undo: bool
    can_redo: bool
    timings: dict[str, float]


class SessionInfo(BaseModel):
    volume_id: str
    segment: str
    version: int
    voxels: int
    slices: list[int]
    anchors: list[int]
    slice_axis_ijk: int = Field(description="the voxel index (0 i, 1 j, 2 k) the slices are taken along")
    slice_range: list[int]
    cached_feature_slices: list[int]
    query: str | None
    can_undo: bool
    can_redo: bool
    undo_steps: int
    redo_steps: int
    mask: Change | None = None
