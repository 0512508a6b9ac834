"""Key-image previews of a model's mask (PNG), marked "not for diagnostic use"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from triage.results import load_overlay

# RGB per class label 1..4 (IPH, EAH, oedema, IVH).
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (255, 40, 40),
    2: (255, 160, 0),
    3: (60, 200, 60),
    4: (60, 120, 255),
}


def brain_window(hu: np.ndarray, level: float = 40.0, width: float = 80.0) -> np.ndarray:
    """HU (any shape) -> uint8 grey values with the brain window (level/width in HU)."""
    lo = level - width / 2
    scaled = (hu.astype(np.float32) - lo) / width
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def key_slice(labels: np.ndarray) -> int:
    """The axial slice (z index) with the most lesion voxels; the middle one when none."""
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.max() > 0 else labels.shape[0] // 2


def render_key_image(mask_path: Path, scale: int = 2) -> Image.Image:
    """The key slice, brain window, lesions blended in colour, with a warning banner."""
    labels, hu, classes = load_overlay(mask_path)
    z = key_slice(labels)
    grey = brain_window(hu[z])
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for value, colour in CLASS_COLOURS.items():
        m = labels[z] == value
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(colour, dtype=np.float32)
    img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, img.width, 14), fill=(0, 0, 0))
    draw.text((4, 2), "AI OVERLAY - NOT FOR DIAGNOSTIC USE", fill=(255, 255, 0))
    legend = "  ".join(f"{name}" for name in classes)
    draw.text((4, img.height - 12), f"slice {z}  {legend}", fill=(255, 255, 255))
    return img
