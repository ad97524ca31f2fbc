"""Image grids as PNG files: what users look at to judge a CGN.

A sheet is a grid of panels; each panel is a batch of images laid out in rows.
Everything here runs on the host after the arrays have left the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(N,H,W,C) floats in `value_range` -> uint8 RGB (grey masks are repeated to 3 channels)."""
    x = np.asarray(images, dtype=np.float32)
    lo, hi = value_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x * 255.0 + 0.5).astype(np.uint8)


def grid(images: np.ndarray, n_cols: int, pad: int = 2, scale: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N,H,W,3) -> one uint8 image with `n_cols` columns, nearest-upscaled by `scale`."""
    n, h, w, c = images.shape
    n_rows = -(-n // n_cols)
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    h, w = h * scale, w * scale
    out = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, n_cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return out


def save_sheet(path: str | Path, panels: Sequence[tuple], n_cols: int,
               title: str | None = None, scale: int = 2) -> Path:
    """Side-by-side titled panels, each a grid of uint8 images.

    A panel is `(title, images)` laid out with `n_cols` columns, or `(title, images, cols)`.
    """
    grids = [(p[0], grid(p[1], p[2] if len(p) > 2 else n_cols, scale=scale)) for p in panels]
    label_h = 14
    title_h = 16 if title else 0
    gap = 8
    height = title_h + label_h + max(g.shape[0] for _, g in grids)
    width = sum(g.shape[1] for _, g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill=(0, 0, 0))
    x = 0
    for name, g in grids:
        draw.text((x + 2, title_h + 1), name, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(g), (x, title_h + label_h))
        x += g.shape[1] + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
