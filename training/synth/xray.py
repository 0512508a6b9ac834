"""Synthetic chest radiographs with and without a pneumothorax, for tests, demos and CI.

:func:`synth_xray_dataset` writes a dataset in the generic format (``training.format``): one
CR chest PA image per study, built on a real radiograph varied per study (a small rotation,
scale and shift, gamma, contrast and noise), a pneumothorax inserted into about
``prevalence`` of them, a 2D NIfTI mask of the pneumothorax region and a ``labels.csv`` row
(finding ``pneumothorax``).

Base radiographs: the real ones in ``<shared>/data/xray`` when present (the SIIM-ACR CR
``siim-cr-chest.dcm`` read through ``triage.preprocess.xray.load_radiograph``, and the NIH
ChestX-ray14 PNGs), else the ``pydicom-data`` CR chest PA that ``triage.demo.xray`` uses.

How a pneumothorax is drawn (:func:`insert_pneumothorax`), on presentation values in [0, 1]
(1 = bright, MONOCHROME2):

* The lungs are found in two template boxes of a PA chest (the patient's right lung on the
  image's left) as the dark pixels (below Otsu's threshold of the smoothed image within the
  boxes), largest component per side, holes filled.
* The collapsed lung is the lung scaled towards its medial edge and its base, with a wavy
  edge; the pneumothorax is the lung minus the collapsed lung: an apical and lateral crescent.
* In the crescent, lung markings (bright structures narrower than ~4 mm) are removed by a grey
  opening (ribs, wider, stay), the result is blurred, darkened and given fresh fine noise; a
  thin bright visceral pleural line is drawn along the collapsed lung's edge; the crescent's
  edge is feathered over a pixel or two.

Everything is deterministic in ``seed``. Pixel spacing is nominal (the field of view taken as
350 mm wide): the sources' own spacings describe other resolutions than the files hold.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from scipy import ndimage

from training.format import DICOM_DIR, MASKS_DIR, PNEUMOTHORAX
from training.synth.dicomio import (
    NOT_FOR_DIAGNOSIS,
    SynthReport,
    SynthStudy,
    default_shared_dir,
    params_key,
    study_ids,
    write_dataset_files,
    write_label_map,
    write_radiograph,
)

__all__ = [
    "PTX_CLASS",
    "XRAY_ATTRIBUTION",
    "BaseRadiograph",
    "InsertedPneumothorax",
    "base_radiographs",
    "insert_pneumothorax",
    "lung_masks",
    "synth_xray_dataset",
]

logger = logging.getLogger(__name__)

Size = Literal["full", "small"]

PTX_CLASS: Final[int] = 1
"""Label of the pneumothorax region in the masks."""

FIELD_MM: Final[float] = 350.0
"""Nominal width of the radiographs' field of view, mm (sets the pixel spacing)."""

_LONG_SIDE: Final[dict[str, int]] = {"full": 1024, "small": 256}
_XRAY_SUBDIR: Final = Path("data") / "xray"

XRAY_ATTRIBUTION: Final[dict[str, dict[str, str]]] = {
    "siim-cr-chest.dcm": {
        "dataset": "SIIM-ACR Pneumothorax Segmentation challenge, one CR chest PA",
        "labels": "pneumothorax negative per the challenge",
        "distribution": "test folder of mlmed/torchxrayvision (Apache-2.0)",
    },
    "00000001_000.png": {
        "dataset": "NIH ChestX-ray14 (Wang et al., CVPR 2017); use unrestricted per NIH",
        "labels": "Cardiomegaly",
        "distribution": "test folder of mlmed/torchxrayvision (Apache-2.0)",
    },
    "00027426_000.png": {
        "dataset": "NIH ChestX-ray14 (Wang et al., CVPR 2017); use unrestricted per NIH",
        "labels": "No Finding",
        "distribution": "test folder of mlmed/torchxrayvision (Apache-2.0)",
    },
    "pydicom-data": {
        "dataset": "David Clunie's public CR test image RG1 (Philips THORAVISION chest PA)",
        "labels": "unknown",
        "distribution": "the pydicom-data package",
    },
}


@dataclass(frozen=True, eq=False)
class BaseRadiograph:
    """A real chest PA radiograph in presentation grey scale.

    Attributes:
        pixels: float32 (rows, columns) in [0, 1], 1 = brightest (bone), long side at most
            1024 pixels.
        name: Its source file name (a key of :data:`XRAY_ATTRIBUTION`).
    """

    pixels: np.ndarray
    name: str


def _fit_long_side(pixels: np.ndarray, long_side: int) -> np.ndarray:
    """Downscale (area-averaging, anti-aliased) so the long side is at most ``long_side``."""
    scale = long_side / max(pixels.shape)
    if scale >= 1.0:
        return pixels.astype(np.float32)
    smoothed = ndimage.gaussian_filter(pixels.astype(np.float32), sigma=0.5 / scale)
    out = ndimage.zoom(smoothed, scale, order=1, grid_mode=True, mode="nearest")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def base_radiographs(shared_dir: Path | None = None) -> tuple[list[BaseRadiograph], str]:
    """The real chest PA radiographs to build on.

    Args:
        shared_dir: The ``shared`` folder; default ``../shared`` beside the checkout.

    Returns:
        (radiographs, base name): the SIIM-ACR CR and the NIH PNGs (``siim+nih``) when
        ``<shared>/data/xray`` holds them, else the ``pydicom-data`` CR (``pydicom-data``).

    Raises:
        RuntimeError: Neither is available (see ``triage.demo.xray.demo_radiograph_paths``).
    """
    from triage.preprocess.xray import load_radiograph

    shared = shared_dir if shared_dir is not None else default_shared_dir()
    folder = shared / _XRAY_SUBDIR
    out: list[BaseRadiograph] = []
    dicom = folder / "siim-cr-chest.dcm"
    if dicom.is_file():
        out.append(BaseRadiograph(_fit_long_side(load_radiograph(dicom).pixels, 1024), dicom.name))
    for png in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if png.name not in XRAY_ATTRIBUTION:
            continue
        from PIL import Image

        with Image.open(png) as im:
            grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        out.append(BaseRadiograph(_fit_long_side(grey, 1024), png.name))
    if out:
        return out, "siim+nih"
    from triage.demo.xray import demo_radiograph_paths

    path = demo_radiograph_paths()[0]
    pixels = _fit_long_side(load_radiograph(path).pixels, 1024)
    return [BaseRadiograph(pixels, "pydicom-data")], "pydicom-data"


def _vary(pixels: np.ndarray, rng: np.random.Generator, long_side: int) -> np.ndarray:
    """A per-study variant: rotation ±3°, scale ±5 %, shift ±3 %, gamma, contrast, noise.

    Args:
        pixels: float32 (rows, columns) in [0, 1].
        rng: Random generator.
        long_side: Long side of the output in pixels.

    Returns:
        float32 (rows', columns') in [0, 1].
    """
    small = _fit_long_side(pixels, long_side)
    rows, cols = small.shape
    angle = math.radians(float(rng.uniform(-3.0, 3.0)))
    scale = float(rng.uniform(0.95, 1.05))
    shift = rng.uniform(-0.03, 0.03, size=2) * np.array([rows, cols])
    c, s = math.cos(angle), math.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) / scale
    centre = np.array([(rows - 1) / 2.0, (cols - 1) / 2.0])
    offset = centre - matrix @ (centre + shift)
    moved = ndimage.affine_transform(small, matrix, offset=offset, order=1, mode="nearest")
    gamma = float(rng.uniform(0.85, 1.15))
    lo, hi = float(rng.uniform(0.0, 0.04)), float(rng.uniform(0.96, 1.0))
    out = lo + (hi - lo) * np.clip(moved, 0.0, 1.0) ** gamma
    out += float(rng.uniform(0.002, 0.008)) * rng.standard_normal(out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def lung_masks(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lungs of a PA chest radiograph, roughly (for placing lesions, not for measuring).

    Args:
        pixels: float (rows, columns) in [0, 1], 1 = bright (bone).

    Returns:
        (right, left): bool masks (rows, columns) of the patient's right lung (image left)
        and left lung (image right); either may be empty.
    """
    from skimage.filters import threshold_multiotsu, threshold_otsu

    rows, cols = pixels.shape
    sigma = max(1.0, cols / 256.0)
    smooth = ndimage.gaussian_filter(pixels.astype(np.float32), sigma)
    boxes = []
    for x0, x1 in ((0.08, 0.50), (0.50, 0.92)):
        box = np.zeros(pixels.shape, dtype=bool)
        box[int(0.06 * rows) : int(0.80 * rows), int(x0 * cols) : int(x1 * cols)] = True
        boxes.append(box)
    inside = smooth[boxes[0] | boxes[1]]
    threshold = float(threshold_otsu(inside))
    # Air outside the body (darker than the lungs, reaching the image's edge) is not lung.
    air_level = float(threshold_multiotsu(smooth, classes=3)[0])
    labels, _ = ndimage.label(smooth < min(air_level, threshold))
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    outside = ndimage.binary_dilation(outside, iterations=max(1, int(round(cols / 128.0))))
    out: list[np.ndarray] = []
    for box in boxes:
        dark = box & (smooth < threshold) & ~outside
        dark = ndimage.binary_opening(dark, iterations=max(1, int(round(cols / 256.0))))
        labels, n = ndimage.label(dark)
        if n == 0:
            out.append(np.zeros(pixels.shape, dtype=bool))
            continue
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        lung = labels == int(counts.argmax())
        # smooth over the rib shadows that notch the lung edge
        lung = ndimage.binary_closing(lung, iterations=max(1, int(round(cols / 50.0))))
        out.append(ndimage.binary_fill_holes(lung))
    return out[0], out[1]


@dataclass(frozen=True, eq=False)
class InsertedPneumothorax:
    """A pneumothorax drawn into a radiograph.

    Attributes:
        pixels: float32 (rows, columns) in [0, 1], the image with the pneumothorax.
        mask: bool (rows, columns), the pneumothorax region (air between chest wall and lung).
        side: ``right`` or ``left`` (the patient's).
        area_cm2: Area of ``mask`` at the given pixel spacing.
    """

    pixels: np.ndarray
    mask: np.ndarray
    side: str
    area_cm2: float


def _wavy(mask: np.ndarray, rng: np.random.Generator, amplitude_px: float) -> np.ndarray:
    """``mask`` with its edge moved in and out smoothly by up to ~``amplitude_px``."""
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    signed = np.where(mask, -inside, outside).astype(np.float32)
    sigma = max(2.0, 8.0 * amplitude_px)
    noise = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma)
    noise /= max(float(noise.std()), 1e-6)
    return (signed + np.float32(amplitude_px) * noise) < 0


def insert_pneumothorax(
    pixels: np.ndarray,
    rng: np.random.Generator,
    *,
    pixel_spacing_mm: float,
    side: str | None = None,
) -> InsertedPneumothorax:
    """Draw an apical and lateral pneumothorax into a PA chest radiograph.

    Args:
        pixels: float32 (rows, columns) in [0, 1], 1 = bright (MONOCHROME2 presentation).
        rng: Random generator (side, size, edge, darkening, noise).
        pixel_spacing_mm: Square pixel spacing in mm (structure sizes are in mm).
        side: ``right`` or ``left`` (the patient's); None: chosen at random.

    Returns:
        The :class:`InsertedPneumothorax`.

    Raises:
        ValueError: No lung found on the chosen side.
    """
    right, left = lung_masks(pixels)
    if side is None:
        side = "right" if rng.random() < 0.5 else "left"
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    lung = right if side == "right" else left
    if np.count_nonzero(lung) < 0.01 * pixels.size:
        raise ValueError(f"no {side} lung found in this radiograph")
    rows_idx, cols_idx = np.nonzero(lung)
    top, bottom = float(rows_idx.min()), float(rows_idx.max())
    # The patient's right lung is on the image's left: its medial edge is its largest column.
    medial = float(cols_idx.max()) if side == "right" else float(cols_idx.min())
    # Collapse towards the medial edge and the base; the gap opens apically and laterally.
    sx = float(rng.uniform(0.75, 0.92))
    sy = float(rng.uniform(0.8, 0.94))
    anchor = np.array([top + 0.9 * (bottom - top), medial])
    matrix = np.diag([1.0 / sy, 1.0 / sx])
    offset = anchor - matrix @ anchor
    collapsed = (
        ndimage.affine_transform(lung.astype(np.float32), matrix, offset=offset, order=1) > 0.5
    )
    collapsed = _wavy(collapsed, rng, amplitude_px=1.5 / pixel_spacing_mm) & lung
    ptx = lung & ~collapsed
    ptx = ndimage.binary_opening(ptx, iterations=max(1, int(round(1.0 / pixel_spacing_mm))))

    px = pixel_spacing_mm
    # Lung markings (vessels, narrower than ~5 mm) go; ribs (wider) stay.
    size = max(3, int(round(5.0 / px)) | 1)
    opened = ndimage.grey_opening(pixels, size=(size, size))
    air = ndimage.gaussian_filter(opened, sigma=max(1.0, 1.5 / px))
    contrast = float(np.percentile(pixels[lung], 90) - np.percentile(pixels[lung], 10))
    darker = float(rng.uniform(0.25, 0.45)) * max(contrast, 0.05)
    fine = pixels - ndimage.gaussian_filter(pixels, 1.0)
    noise_sd = float(np.std(fine[lung])) * 0.4
    air = air - np.float32(darker) + np.float32(noise_sd) * rng.standard_normal(pixels.shape)
    weight = ndimage.gaussian_filter(ptx.astype(np.float32), sigma=max(0.5, 0.6 / px))
    weight = np.where(ptx, np.maximum(weight, 0.5), weight)
    out = pixels * (1.0 - weight) + air * weight

    # Visceral pleural line: the collapsed lung's edge facing the air, ~0.5-1 mm thick.
    edge = collapsed & ndimage.binary_dilation(ptx, iterations=max(1, int(round(0.7 / px))))
    line = ndimage.gaussian_filter(edge.astype(np.float32), sigma=max(0.4, 0.3 / px))
    line /= max(float(line.max()), 1e-6)
    out += np.float32(float(rng.uniform(0.6, 0.9)) * darker) * line
    area = float(np.count_nonzero(ptx)) * px * px / 100.0
    return InsertedPneumothorax(
        pixels=np.clip(out, 0.0, 1.0).astype(np.float32), mask=ptx, side=side, area_cm2=area
    )


def synth_xray_dataset(
    out: Path,
    *,
    n_studies: int,
    seed: int,
    prevalence: float = 0.5,
    shared_dir: Path | None = None,
    size: Size = "full",
) -> SynthReport:
    """Write a synthetic chest radiograph dataset (``training.format``, task ``chest``,
    source ``synth``) with and without pneumothorax.

    Layout: ``dicom/<nnnn>/CR0001.dcm`` (CR Image Storage, MONOCHROME2, 12 bits, PA,
    BodyPartExamined CHEST, ViewPosition PA), ``masks/<nnnn>.nii.gz`` (2D uint8, 1 in the
    pneumothorax, all 0 without one), ``labels.csv`` (finding ``pneumothorax``, label,
    subtype ``pneumothorax`` or ``normal``; about a third of the patients have two studies)
    and ``dataset.json`` (parameters and the base images' attribution).

    Args:
        out: Dataset folder (created; files in it are overwritten).
        n_studies: Number of studies (>= 1).
        seed: Seed of every random choice; the same arguments write identical files (but for
            ``dataset.json``'s ``created``).
        prevalence: Share of studies with a pneumothorax, in [0, 1].
        shared_dir: The ``shared`` folder; default ``../shared`` beside the checkout.
        size: ``full`` (long side up to 1024 pixels) or ``small`` (256, fast, for CI).

    Returns:
        The :class:`SynthReport`.

    Raises:
        ValueError: An argument is out of range.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence must lie in [0, 1], got {prevalence}")
    if size not in _LONG_SIDE:
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    bases, base_name = base_radiographs(shared_dir)
    params = {
        "generator": "training.synth.xray",
        "n_studies": n_studies,
        "seed": seed,
        "prevalence": prevalence,
        "base": base_name,
        "size": size,
    }
    key = params_key(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan_rng = np.random.default_rng([seed, 0])
    n_pos = int(round(prevalence * n_studies))
    positive = np.zeros(n_studies, dtype=bool)
    positive[plan_rng.permutation(n_studies)[:n_pos]] = True
    patients = _patients(n_studies, plan_rng)
    logger.info("writing %d synthetic chest radiographs (%s base, %s)", n_studies, base_name, size)

    studies: list[SynthStudy] = []
    for index in range(n_studies):
        rng = np.random.default_rng([seed, 1, index])
        patient, visit = patients[index]
        base = bases[patient % len(bases)]
        pixels = _vary(base.pixels, rng, _LONG_SIDE[size])
        spacing = FIELD_MM / max(pixels.shape)
        mask = np.zeros(pixels.shape, dtype=np.uint8)
        extra: dict[str, Any] = {"base": base.name, "pixel_spacing_mm": round(spacing, 4)}
        if positive[index]:
            ptx = insert_pneumothorax(pixels, rng, pixel_spacing_mm=spacing)
            pixels = ptx.pixels
            mask[ptx.mask] = PTX_CLASS
            extra.update({"side": ptx.side, "area_cm2": round(ptx.area_cm2, 2)})
        ids = study_ids(key, index, patient, visit=visit)
        name = f"{index + 1:04d}"
        path = write_radiograph(
            out / DICOM_DIR / name / "CR0001.dcm",
            pixels,
            pixel_spacing_mm=spacing,
            ids=ids,
            comment=f"{NOT_FOR_DIAGNOSIS}; training.synth",  # the label stays out of headers
        )
        mask_path = Path(MASKS_DIR) / f"{name}.nii.gz"
        write_label_map(out / mask_path, mask, spacing_mm=(spacing, spacing), origin_mm=(0.0, 0.0))
        studies.append(
            SynthStudy(
                StudyInstanceUID=ids.StudyInstanceUID,
                SeriesInstanceUID=ids.SeriesInstanceUID,
                PatientID=ids.PatientID,
                finding=PNEUMOTHORAX,
                label=int(positive[index]),
                subtype="pneumothorax" if positive[index] else "normal",
                volume_ml=None,
                requested_ml=None,
                mask=mask_path,
                files=(path,),
                extra=extra,
            )
        )
    used = sorted({s.extra["base"] for s in studies})
    meta = {
        "generator": params,
        "base": {"kind": base_name, "images": {n: XRAY_ATTRIBUTION[n] for n in used}},
        "classes": {"0": "background", str(PTX_CLASS): "pneumothorax"},
        "pixel_spacing": f"nominal: {FIELD_MM:g} mm over the long side",
    }
    write_dataset_files(out, task="chest", studies=studies, meta=meta)
    return SynthReport(dataset=out, studies=studies, base=base_name)


def _patients(n_studies: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(patient, visit) per study; about a third of the patients have two studies."""
    out: list[tuple[int, int]] = []
    patient = 0
    while len(out) < n_studies:
        visits = 2 if (n_studies - len(out) >= 2 and rng.random() < 0.35) else 1
        out.extend((patient, v) for v in range(visits))
        patient += 1
    return out
