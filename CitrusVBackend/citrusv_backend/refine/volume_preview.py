"""A before / after montage of a refinement: each row one slice, left the mask before, right after, with the
prompts drawn where they were placed (include +, exclude x, box)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..volume.outputs.files import RANDOM_NOTE
from .volume_prompts import INCLUDE, SlicePrompt

BEFORE_COLOR = (86, 180, 233)
AFTER_COLOR = (230, 159, 0)
INCLUDE_COLOR, EXCLUDE_COLOR, BOX_COLOR = (0, 220, 90), (255, 60, 60), (255, 230, 0)


def preview_rows(changed: list[int], prompted: list[int], count: int = 4) -> list[int]:
    """The prompted slices first, then changed ones spread over the rest."""
    rows = list(dict.fromkeys(prompted))[:count]
    rest = [i for i in sorted(set(changed)) if i not in rows]
    if rest and len(rows) < count:
        picks = np.linspace(0, len(rest) - 1, min(count - len(rows), len(rest))).round().astype(int)
        rows += [rest[p] for p in dict.fromkeys(picks.tolist())]
    return sorted(rows)


def render_refinement(source, before: np.ndarray, after: np.ndarray, prompts: dict[int, list[SlicePrompt]],
                      slices: list[int], title: str, random_weights: bool = False, tile: int = 256) -> Image.Image:
    """`before` / `after`: (k, j, i) masks; `prompts`: slice -> the prompts placed on it (all steps)."""
    header = [title[:110]] + ([RANDOM_NOTE] if random_weights else [])
    top = 18 * len(header) + 22
    canvas = Image.new("RGB", (2 * tile, top + len(slices) * tile), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for n, line in enumerate(header):
        draw.text((4, 4 + 18 * n), line, fill=(255, 80, 80) if line == RANDOM_NOTE else (230, 230, 230), font=font)
    draw.text((4, top - 16), "before", fill=BEFORE_COLOR, font=font)
    draw.text((tile + 4, top - 16), "after", fill=AFTER_COLOR, font=font)
    display = source.display   # radiological, superior up (the model's slices may be flipped: SA-Med2D order)
    for row, index in enumerate(slices):
        rgb = source.display_rgb(index)
        old, new = display.slice(before, index), display.slice(after, index)
        placed = [_on_display(source, prompt) for prompt in prompts.get(index, [])]
        for column, (mask, color) in enumerate(((old, BEFORE_COLOR), (new, AFTER_COLOR))):
            image = _tile(rgb, mask, color, placed, tile)
            canvas.paste(image, (column * tile, top + row * tile))
        draw.text((4, top + row * tile + 4), f"slice {index}", fill=(255, 255, 0), font=font)
    return canvas


def _on_display(source, prompt: SlicePrompt) -> SlicePrompt:
    """A prompt placed in the model's slice pixels, moved to the display slice's."""
    points = []
    for x, y, label in prompt.points:
        rows, cols = source.to_display([y], [x])
        points.append((float(cols[0]), float(rows[0]), label))
    box = None
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
        rows, cols = source.to_display([y1, y2], [x1, x2])
        box = (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))
    return SlicePrompt(prompt.index, points, box)


def _tile(rgb: np.ndarray, mask: np.ndarray, color, prompts: list[SlicePrompt], tile: int) -> Image.Image:
    shaded = rgb.astype(np.float64)
    shaded[mask] = 0.5 * shaded[mask] + 0.5 * np.array(color)
    image = Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8))
    scale = tile / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    framed = Image.new("RGB", (tile, tile), (0, 0, 0))
    ox, oy = (tile - image.width) // 2, (tile - image.height) // 2
    framed.paste(image, (ox, oy))
    draw = ImageDraw.Draw(framed)
    at = lambda x, y: (ox + (x + 0.5) * scale, oy + (y + 0.5) * scale)  # noqa: E731  pixel centre on the tile
    for prompt in prompts:
        if prompt.box is not None:
            x1, y1, x2, y2 = prompt.box
            draw.rectangle([*at(x1 - 0.5, y1 - 0.5), *at(x2 + 0.5, y2 + 0.5)], outline=BOX_COLOR, width=2)
        for x, y, label in prompt.points:
            cx, cy = at(x, y)
            if label == INCLUDE:
                draw.line([cx - 6, cy, cx + 6, cy], fill=INCLUDE_COLOR, width=3)
                draw.line([cx, cy - 6, cx, cy + 6], fill=INCLUDE_COLOR, width=3)
            else:
                draw.line([cx - 5, cy - 5, cx + 5, cy + 5], fill=EXCLUDE_COLOR, width=3)
                draw.line([cx - 5, cy + 5, cx + 5, cy - 5], fill=EXCLUDE_COLOR, width=3)
    return framed
