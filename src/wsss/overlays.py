"""Pictures for MLflow: label maps in the VOC palette, label and CAM overlays, tile panels and
per-class IoU bar charts.

Everything returns plain uint8 HxWx3 arrays (for ``tracker.log_image``) or a matplotlib
:class:`~matplotlib.figure.Figure` built without pyplot (for ``tracker.log_figure``), so no GUI
backend is ever needed. Torch-free, so the CRF worker processes may import it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .voc import PALETTE

_PALETTE = np.asarray(PALETTE, dtype=np.uint8).reshape(256, 3)


def colorize(label: np.ndarray) -> np.ndarray:
    """uint8 HxW label map (0..20, 255) -> HxWx3 uint8 RGB in the VOC palette."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of ``label`` over ``image``; background (0) pixels keep the
    photo, every other label (classes and 255 = void/uncertain) is tinted with weight alpha."""
    image = _rgb(image).astype(np.float32)
    label = np.asarray(label, dtype=np.uint8)
    colour = colorize(label).astype(np.float32)
    tint = (label != 0)[..., None]
    out = np.where(tint, (1 - alpha) * image + alpha * colour, image)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def cam_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a CAM (H, W) in [0, 1] over ``image`` through a matplotlib colormap (jet)."""
    import matplotlib

    image = _rgb(image).astype(np.float32)
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    heat = matplotlib.colormaps[cmap](cam)[..., :3] * 255.0
    out = (1 - alpha) * image + alpha * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _font():
    try:
        return ImageFont.load_default()
    except Exception:  # pragma: no cover - very old Pillow
        return None


def panel(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None,
          pad: int = 2) -> np.ndarray:
    """Compose a grid image from rows of tiles; ``titles`` name the columns (a header strip).

    Tiles may be HxW (grey) or HxWx3; a tile of another size than the first one is resized
    to it (nearest), and short rows are padded with white tiles.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("panel needs at least one tile")
    first = _rgb(next(t for r in rows for t in r))
    th, tw = first.shape[:2]
    n_cols = max(len(r) for r in rows)
    header = 14 if titles else 0
    height = header + len(rows) * th + (len(rows) + 1) * pad
    width = n_cols * tw + (n_cols + 1) * pad
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            tile = _rgb(tile)
            if tile.shape[:2] != (th, tw):
                tile = np.asarray(Image.fromarray(tile).resize((tw, th), Image.NEAREST))
            y = header + pad + r * (th + pad)
            x = pad + c * (tw + pad)
            canvas[y:y + th, x:x + tw] = tile
    if titles:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        font = _font()
        for c, title in enumerate(list(titles)[:n_cols]):
            draw.text((pad + c * (tw + pad) + 1, 1), str(title), fill=(0, 0, 0), font=font)
        canvas = np.asarray(img)
    return canvas


def iou_bar_chart(per_class_iou: dict[str, float], title: str = "per-class IoU"):
    """A horizontal bar chart (matplotlib Figure, no pyplot) of IoU per class, with the mean."""
    from matplotlib.figure import Figure

    names = list(per_class_iou)
    values = [float(per_class_iou[n]) for n in names]
    fig = Figure(figsize=(6, 0.25 * max(len(names), 4) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    ypos = np.arange(len(names))
    ax.barh(ypos, values, color="tab:blue")
    ax.set_yticks(ypos)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    if values:
        mean = float(np.mean(values))
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1)
        title = f"{title} (mIoU {mean:.3f})"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("IoU")
    fig.tight_layout()
    return fig
