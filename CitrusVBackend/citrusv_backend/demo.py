"""The main job on a sample volume, as the README's first command runs it.

Until the whole-volume pipeline exists this is its smallest honest step: the middle axial slice of the
volume, shown in radiological orientation with a window chosen from the prompt, is segmented with the
forced answer "Sure, it is [SEG]."; the mask is written back into the volume's own voxel grid (a labelmap
with the input's exact geometry) together with a picture of the slice and the raw results.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .inference.engine import CitrusVEngine
from .volume.orientation import axial_display_orientation
from .volume.windowing import window_for_prompt

OVERLAY_COLOR = np.array([255, 64, 32], dtype=np.float64)


def sample_ct_path() -> Path:
    """The real chest CT that the slicerio package ships (128x128x34, 3 x 3 x 10 mm)."""
    try:
        import slicerio
    except ImportError:
        raise InputError("the sample CT comes with the slicerio package (pip install slicerio); "
                         "or pass --volume FILE") from None
    return Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


def overlay(gray_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    out = gray_rgb.astype(np.float64)
    out[mask] = (1 - alpha) * out[mask] + alpha * OVERLAY_COLOR
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def run_demo(engine: CitrusVEngine, prompt: str, out_dir: Path, volume: str | None, say) -> int:
    import SimpleITK as sitk

    path = Path(volume) if volume else sample_ct_path()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable volume ({str(error).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D scalar volume, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    voxels = sitk.GetArrayViewFromImage(image)
    orientation = axial_display_orientation(np.array(image.GetDirection()))
    index = voxels.shape[orientation.slice_axis] // 2
    window = window_for_prompt(prompt)
    gray = window.apply(orientation.slice(voxels, index))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    say(f"segmenting axial slice {index} of {path.name} (window {window.name}) with prompt {prompt!r} ...")
    result = engine.segment(rgb, prompt)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = path.name.split(".")[0]
    labelmap = np.zeros(voxels.shape, dtype=np.uint8)
    mask = result.masks[0].mask if result.masks else np.zeros(gray.shape, bool)
    orientation.put_slice(labelmap, index, mask.astype(np.uint8))
    label_image = sitk.GetImageFromArray(labelmap)
    label_image.CopyInformation(image)
    files = {
        "labelmap": out_dir / f"{stem}_seg.nrrd",
        "slice": out_dir / f"{stem}_slice{index:03d}.png",
        "overlay": out_dir / f"{stem}_slice{index:03d}_overlay.png",
        "result": out_dir / f"{stem}_result.json",
    }
    sitk.WriteImage(label_image, str(files["labelmap"]), useCompression=True)
    Image.fromarray(rgb).save(files["slice"])
    Image.fromarray(overlay(rgb, mask)).save(files["overlay"])
    spacing = np.array(image.GetSpacing())
    pixel_area = float(np.prod([spacing[2 - a] for a in (orientation.row_axis, orientation.col_axis)]))
    summary = result.to_json_dict() | {
        "volume": str(path), "slice_index": index, "slice_axis": int(orientation.slice_axis), "window": window.__dict__,
        "mask_area_mm2": float(mask.sum()) * pixel_area, "files": {k: str(v) for k, v in files.items()},
        "model": engine.loaded.describe()}
    files["result"].write_text(json.dumps(summary, indent=2) + "\n")

    if result.random_weights:
        from .cli import random_weights_banner

        say(random_weights_banner(engine.loaded.checkpoint_dir))
    say(f"answer: {result.text!r}")
    say(f"mask: {int(mask.sum())} pixels ({summary['mask_area_mm2'] / 100:.1f} cm²) on slice {index}"
        + (" — RANDOM WEIGHTS, meaningless" if result.random_weights else ""))
    say(f"results in {out_dir.resolve()}:")
    for name, file in files.items():
        say(f"  {name:9s} {file.name}")
    return 0
