"""CitrusV backend: the Citrus-V model (Qwen2.5-VL + [SEG] projector + SAM2) for 2D slices and 3D volumes."""

__version__ = "0.1.0"
