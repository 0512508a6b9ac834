"""Key-image previews of a finding's overlay (PNG), marked "not for diagnostic use".

A segmentation is shown on its key slice (brain window, classes blended in colour); a
saliency map is blended over the radiograph in a blue-to-red colour scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from triage.results import Overlay, load_overlay

# RGB per class label 1..4 (IPH, EAH, oedema, IVH).
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (255, 40, 40),
    2: (255, 160, 0),
    3: (60, 200, 60),
    4: (60, 120, 255),
}
#: Saliency below this fraction of the map's range is not drawn.
HEATMAP_FLOOR = 0.2
#: Longest side of a radiograph preview, pixels.
RADIOGRAPH_PREVIEW_PX = 512


def brain_window(hu: np.ndarray, level: float = 40.0, width: float = 80.0) -> np.ndarray:
    """HU (any shape) -> uint8 grey values with the brain window (level/width in HU)."""
    lo = level - width / 2
    scaled = (hu.astype(np.float32) - lo) / width
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def key_slice(labels: np.ndarray) -> int:
    """The axial slice (z index) with the most lesion voxels; the middle one when none."""
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.max() > 0 else labels.shape[0] // 2


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> float32 RGB (..., 3) from blue through yellow to red."""
    v = np.clip(values.astype(np.float32), 0.0, 1.0)[..., None]
    blue = np.array([40, 80, 255], dtype=np.float32)
    yellow = np.array([255, 230, 0], dtype=np.float32)
    red = np.array([255, 30, 30], dtype=np.float32)
    low = blue + (yellow - blue) * np.clip(v * 2, 0, 1)
    return np.where(v < 0.5, low, yellow + (red - yellow) * np.clip(v * 2 - 1, 0, 1))


def _banner(img: Image.Image, footer: str) -> Image.Image:
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, img.width, 14), fill=(0, 0, 0))
    draw.text((4, 2), "AI OVERLAY - NOT FOR DIAGNOSTIC USE", fill=(255, 255, 0))
    draw.text((4, img.height - 12), footer, fill=(255, 255, 255))
    return img


def _labels_image(overlay: Overlay, scale: int) -> Image.Image:
    labels, hu = overlay.data, overlay.background
    z = key_slice(labels)
    grey = brain_window(hu[z])
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for value, colour in CLASS_COLOURS.items():
        m = labels[z] == value
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(colour, dtype=np.float32)
    img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return _banner(img, f"slice {z}  {'  '.join(overlay.classes)}")


def _heatmap_image(overlay: Overlay) -> Image.Image:
    grey = overlay.background.astype(np.float32)
    heat = overlay.data.astype(np.float32)
    side = max(grey.shape)
    if side > RADIOGRAPH_PREVIEW_PX:
        f = RADIOGRAPH_PREVIEW_PX / side
        size = (max(1, round(grey.shape[1] * f)), max(1, round(grey.shape[0] * f)))
        grey = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))
        heat = np.asarray(Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    alpha = np.clip((heat - HEATMAP_FLOOR) / (1.0 - HEATMAP_FLOOR), 0.0, 1.0)[..., None] * 0.6
    rgb = rgb * (1.0 - alpha) + heat_colours(heat) * alpha
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    return _banner(img, f"saliency (Grad-CAM): {', '.join(overlay.classes)}")


def render_key_image(mask_path: Path, scale: int = 2) -> Image.Image:
    """The finding's preview with a warning banner: the key slice of a segmentation, or the
    radiograph with its saliency map."""
    overlay = load_overlay(mask_path)
    if overlay.kind == "heatmap":
        return _heatmap_image(overlay)
    return _labels_image(overlay, scale)
