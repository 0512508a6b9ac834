"""Synthetic head CT with intracranial haemorrhage, for tests, demos and CI.

:func:`synth_ct_dataset` writes a dataset in the generic format (``training.format``): one
axial CT series per study, built on a normal head (the real CQ500 series in
``../shared/data/cq500-ct0`` or the demo phantom ``triage.demo.phantom``), with a lesion of a
requested type and volume inserted, a NIfTI label map of the BLAST-CT classes on the series'
grid and a ``labels.csv`` row with the voxel-counted true volume.

How a lesion is inserted (:func:`insert_haemorrhage`), on the grid that is written:

* The intracranial space comes from HU thresholds (:func:`head_anatomy`): bone (> 300 HU)
  closed and hole-filled in each axial slice, the holes kept where the in-plane smoothed HU is
  soft tissue or CSF, the largest 3D component. Depth below the inner table is its Euclidean
  distance transform; the CSF fraction of a voxel is where its smoothed HU lies between the
  brain's and the CSF's median; ventricles are deep CSF components near the midline.
* Intraparenchymal: a lobulated blob (union of 3-5 ellipsoids with a rough surface) in deep
  brain, 55-75 HU, with a 2-4 mm oedema rim at 15-25 HU (class 3) in most studies.
  Subdural: a crescent along the inner table over one convexity, thickest at its centre and
  a few mm thin, 50-70 HU. Epidural: a biconvex lens against the inner table, 60-80 HU.
  Subarachnoid: the CSF of the sulci and cisterns around a point near the brain surface or in
  the basal cisterns raised to 45-65 HU (sulci next to it are filled when there is too little
  CSF). Intraventricular: the dependent (posterior) CSF of the lateral ventricles below a fluid
  level, 50-70 HU (the ventricles widen when they cannot hold the volume).
* The size parameter of each shape (scale, thickness, radius, fluid level) is bisected until
  the voxel count hits the requested volume (within a few per cent), inside the intracranial
  space only. Edges are partial volumes: a voxel's blood fraction falls from 1 to 0 across one
  voxel along the lesion's surface normal (or is its CSF fraction for SAH and IVH); the label
  map holds the voxels that are at least half blood. HU = base + fraction × (blood level +
  texture − local tissue level), so the base image's noise stays.

Everything is deterministic in ``seed``: the same call writes identical pixel data, masks and
UIDs.

Limits: lesions do not push the brain aside (no mass effect, midline shift or sulcal
effacement), and every CQ500-based study is the same real head under a small pose change.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from training.format import DICOM_DIR, HAEMORRHAGE, HAEMORRHAGE_SUBTYPES, MASKS_DIR
from training.synth.dicomio import (
    NOT_FOR_DIAGNOSIS,
    SynthReport,
    SynthStudy,
    default_shared_dir,
    params_key,
    study_ids,
    write_ct_series,
    write_dataset_files,
    write_label_map,
)
from triage.demo.phantom import PhantomSpec, head_ct_phantom
from triage.preprocess.ct import load_ct_series
from triage.preprocess.hu import HU_AIR

__all__ = [
    "BLOOD_HU",
    "CQ500_ATTRIBUTION",
    "OEDEMA_CLASS",
    "OEDEMA_HU",
    "Anatomy",
    "BaseVolume",
    "InsertedLesion",
    "head_anatomy",
    "insert_haemorrhage",
    "synth_ct_dataset",
]

logger = logging.getLogger(__name__)

Base = Literal["auto", "cq500", "phantom"]
_Box = tuple[slice, slice, slice]
Size = Literal["full", "small"]

BLOOD_HU: Final[dict[str, tuple[float, float]]] = {
    "intraparenchymal": (55.0, 75.0),
    "subdural": (50.0, 70.0),
    "epidural": (60.0, 80.0),
    "subarachnoid": (45.0, 65.0),
    "intraventricular": (50.0, 70.0),
}
"""Range (HU) of the blood level of each subtype (before partial volume and noise)."""

OEDEMA_HU: Final[tuple[float, float]] = (15.0, 25.0)
OEDEMA_CLASS: Final[int] = 3
"""BLAST-CT's perilesional oedema class."""

OEDEMA_PROBABILITY: Final[float] = 0.75
"""Share of intraparenchymal bleeds given an oedema rim."""

CQ500_ATTRIBUTION: Final[dict[str, str]] = {
    "dataset": "CQ500 (qure.ai), patient CQ500-CT-0, one non-contrast head CT series",
    "citation": (
        "Chilamkurthy S, Ghosh R, Tanamala S, et al. Deep learning algorithms for detection of "
        "critical findings in head CT scans: a retrospective study. Lancet 2018;392:2388-96."
    ),
    "licence": "CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike)",
    "reads": (
        "reader 1 marked a subarachnoid haemorrhage, readers 2 and 3 a normal scan; majority "
        "label normal (the base is treated as normal)"
    ),
}

_BONE_HU: Final[float] = 300.0
_MAX_BRAIN_HU: Final[float] = 45.0  # smoothed brain (grey matter ~38 HU) stays below this
_CQ500_SUBDIR: Final = Path("data") / "cq500-ct0"

# Base grids: (matrix, in-plane spacing mm or None for the source's, slice thicknesses mm).
_PHANTOM_GRID: Final[dict[str, tuple[int, float, tuple[float, ...]]]] = {
    "full": (256, 0.9, (2.5, 5.0)),
    "small": (128, 1.8, (5.0,)),
}
_CQ500_GRID: Final[dict[str, tuple[int, float | None, tuple[float, ...]]]] = {
    "full": (512, None, (2.5, 5.0)),
    "small": (128, 1.8, (5.0,)),
}
_PHANTOM_COVERAGE_MM: Final[dict[str, float]] = {"full": 130.0, "small": 150.0}
"""Coverage of the phantom series, mm (from just above the vertex down; the phantom's own
default is 52 slices of 2.5 mm)."""


# ---------------------------------------------------------------------------------------------
# Base volumes


@dataclass(frozen=True, eq=False)
class BaseVolume:
    """A normal head CT on an axial grid.

    Attributes:
        hu: float32 array (z, y, x) in HU, z increasing towards the vertex, y posterior,
            x towards the patient's left.
        spacing_mm: (z, y, x) spacing in mm (z is the slice thickness).
        origin_mm: LPS (x, y, z) in mm of the centre of voxel ``hu[0, 0, 0]``.
        description: Where it came from (no patient data).
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    description: str


def _phantom_base(seed: int, size: Size, thickness: float) -> BaseVolume:
    matrix, spacing, _ = _PHANTOM_GRID[size]
    slices = int(round(_PHANTOM_COVERAGE_MM[size] / thickness))
    spec = PhantomSpec(
        haemorrhage=False,
        seed=seed,
        rows=matrix,
        columns=matrix,
        pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness,
        slices=slices,
    )
    p = head_ct_phantom(spec)
    return BaseVolume(
        hu=p.hu.astype(np.float32),
        spacing_mm=p.spacing_mm,
        origin_mm=p.origin_mm,
        description=f"triage.demo.phantom normal head, phantom seed {seed}",
    )


class _Cq500:
    """The real CQ500 series, loaded once; :meth:`volume` resamples it onto an axial grid
    under a small random pose change, with thick slices averaged from thin ones."""

    def __init__(self, folder: Path) -> None:
        paths = sorted(p for p in folder.iterdir() if p.is_file())
        self.image = load_ct_series(paths).image
        size = np.asarray(self.image.GetSize(), dtype=np.float64)
        spacing = np.asarray(self.image.GetSpacing(), dtype=np.float64)
        origin = np.asarray(self.image.GetOrigin(), dtype=np.float64)
        direction = np.asarray(self.image.GetDirection(), dtype=np.float64).reshape(3, 3)
        self.in_plane_mm = float(spacing[0])
        corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in size], indexing="ij"))
        corners = corners.reshape(3, -1)
        physical = origin[:, None] + direction @ (spacing[:, None] * corners)
        bottom = physical[2][corners[2] == 0]
        top = physical[2][corners[2] > 0]
        self.z_range = (float(bottom.max()), float(top.min()))
        small = sitk.Shrink(self.image, [4, 4, 4])
        body = np.argwhere(sitk.GetArrayViewFromImage(small) > -300.0)
        if body.size == 0:
            raise ValueError("the CQ500 series holds no head")
        cz, cy, cx = body.mean(axis=0)
        self.centre = small.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))

    def volume(self, rng: np.random.Generator, size: Size, thickness: float) -> BaseVolume:
        matrix, spacing_opt, _ = _CQ500_GRID[size]
        dxy = spacing_opt if spacing_opt is not None else self.in_plane_mm
        sub = max(1, int(round(thickness / 1.25)))
        dz = thickness / sub
        margin = 6.0
        z_lo, z_hi = self.z_range
        n = int((z_hi - z_lo - 2 * margin) // thickness)
        z_mid = 0.5 * (z_lo + z_hi)
        z_first = z_mid - 0.5 * (n - 1) * thickness
        cx, cy, _ = self.centre
        half = 0.5 * (matrix - 1) * dxy
        origin = (cx - half, cy - half, z_first - 0.5 * thickness + 0.5 * dz)
        transform = sitk.Euler3DTransform()
        transform.SetCenter(self.centre)
        transform.SetRotation(
            math.radians(float(rng.uniform(-2.0, 2.0))),
            math.radians(float(rng.uniform(-2.0, 2.0))),
            math.radians(float(rng.uniform(-6.0, 6.0))),
        )
        transform.SetTranslation(
            (float(rng.uniform(-4.0, 4.0)), float(rng.uniform(-4.0, 4.0)), 0.0)
        )
        resampled = sitk.Resample(
            self.image,
            [matrix, matrix, n * sub],
            transform,
            sitk.sitkLinear,
            origin,
            (dxy, dxy, dz),
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            HU_AIR,
            sitk.sitkFloat32,
        )
        fine = sitk.GetArrayFromImage(resampled)
        hu = fine.reshape(n, sub, matrix, matrix).mean(axis=1, dtype=np.float32)
        return BaseVolume(
            hu=hu,
            spacing_mm=(float(thickness), float(dxy), float(dxy)),
            origin_mm=(float(origin[0]), float(origin[1]), float(z_first)),
            description="CQ500-CT-0 (real normal head CT) under a small pose change",
        )


@functools.lru_cache(maxsize=1)
def _cq500(folder: Path) -> _Cq500:
    return _Cq500(folder)


# ---------------------------------------------------------------------------------------------
# Anatomy from HU


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Where things are in a head CT, from HU thresholds (arrays (z, y, x) like the volume).

    Attributes:
        intracranial: bool, inside the skull (brain, CSF, not bone or air).
        depth_mm: float32, distance in mm below the cavity's boundary (the inner table);
            0 outside.
        smooth: float32 HU smoothed in-plane (sigma ~1 mm) over the intracranial space only.
        csf_fraction: float32 in [0, 1], share of CSF in a voxel (0 brain, 1 pure CSF).
        ventricles: bool, the ventricles (deep CSF components near the midline).
        brain_hu: Median HU of brain tissue.
        csf_hu: Median HU of CSF.
        midline_x_mm: x (mm, from voxel 0) of the midline.
        slice_share: float per slice, intracranial area over the largest slice's.
        spacing_mm: (z, y, x) spacing in mm.
    """

    intracranial: np.ndarray
    depth_mm: np.ndarray
    smooth: np.ndarray
    csf_fraction: np.ndarray
    ventricles: np.ndarray
    brain_hu: float
    csf_hu: float
    midline_x_mm: float
    slice_share: np.ndarray
    spacing_mm: tuple[float, float, float]

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable voxel-centre coordinates in mm from voxel 0: Z (n,1,1), Y (1,r,1),
        X (1,1,c)."""
        n, r, c = self.intracranial.shape
        sz, sy, sx = self.spacing_mm
        return (
            (np.arange(n, dtype=np.float32) * np.float32(sz))[:, None, None],
            (np.arange(r, dtype=np.float32) * np.float32(sy))[None, :, None],
            (np.arange(c, dtype=np.float32) * np.float32(sx))[None, None, :],
        )


def _disk(radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1)
    return (t[:, None] ** 2 + t[None, :] ** 2) <= radius * radius


def _inplane_sigma(spacing: Sequence[float], mm: float) -> tuple[float, float, float]:
    return (0.0, mm / float(spacing[1]), mm / float(spacing[2]))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(counts.argmax())


def head_anatomy(hu: np.ndarray, spacing_mm: Sequence[float]) -> Anatomy:
    """Find the intracranial space, its depth, CSF and ventricles from HU thresholds.

    Args:
        hu: float array (z, y, x) in HU of a normal head CT, axial slices, any spacing (about
            0.4-2 mm in-plane, 0.6-5 mm slices).
        spacing_mm: (z, y, x) spacing in mm.

    Returns:
        The :class:`Anatomy` on the same grid.

    Raises:
        ValueError: No intracranial space is found (no closed skull in any slice).
    """
    sz, sy, sx = (float(v) for v in spacing_mm)
    hu = np.asarray(hu, dtype=np.float32)
    bone = hu > _BONE_HU
    disk = _disk(max(1, int(round(3.0 / sx))))
    near_air = _disk(max(1, int(round(3.0 / sx))))
    cavity = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):
        if not bone[z].any():
            continue
        closed = ndimage.binary_closing(bone[z], structure=disk, border_value=0)
        # Sinuses and mastoid cells are air enclosed by bone: their walls are not brain.
        air = ndimage.binary_dilation(hu[z] < -150.0, structure=near_air)
        cavity[z] = ndimage.binary_fill_holes(closed) & ~closed & ~air
    sm_raw = ndimage.gaussian_filter(hu, _inplane_sigma(spacing_mm, 0.7))
    # Soft tissue denser than brain enclosed by bone (muscle, vessels under the skull base)
    # is not intracranial: its mean over the non-bone voxels around it is above brain.
    soft = (hu < 80.0).astype(np.float32)
    sigma2 = _inplane_sigma(spacing_mm, 2.0)
    tissue = ndimage.gaussian_filter(hu * soft, sigma2) / np.maximum(
        ndimage.gaussian_filter(soft, sigma2), 1e-3
    )
    cavity &= (sm_raw > -40.0) & (sm_raw < 100.0) & (hu < 120.0) & (tissue < _MAX_BRAIN_HU)
    intracranial = _largest_component(cavity)
    if not intracranial.any():
        raise ValueError("no intracranial space found (no closed skull in any slice)")

    # Smoothing over the intracranial space only (normalised convolution): no bone bleeds in.
    w = intracranial.astype(np.float32)
    sigma = _inplane_sigma(spacing_mm, 1.0)
    num = ndimage.gaussian_filter(hu * w, sigma)
    den = ndimage.gaussian_filter(w, sigma)
    smooth = np.where(intracranial, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)
    fine = np.where(intracranial, sm_raw, 0.0)

    values = fine[intracranial]
    tissue = values[(values > 18.0) & (values < 50.0)]
    brain_hu = float(np.median(tissue)) if tissue.size else 30.0
    # White matter (the darker brain) counts as no CSF at all: the fraction is measured from
    # the lower quartile of brain tissue.
    white_hu = float(np.percentile(tissue, 25)) - 2.0 if tissue.size else 25.0
    fluid = values[(values > -10.0) & (values < brain_hu - 14.0)]
    csf_hu = float(np.clip(np.median(fluid), -5.0, 15.0)) if fluid.size else 5.0
    white_hu = max(white_hu, csf_hu + 8.0)
    csf_fraction = np.clip((white_hu - fine) / (white_hu - csf_hu), 0.0, 1.0).astype(np.float32)
    csf_fraction[~intracranial] = 0.0

    depth = ndimage.distance_transform_edt(intracranial, sampling=(sz, sy, sx)).astype(np.float32)
    depth = np.where(intracranial, np.maximum(depth - 0.5 * min(sy, sx), 0.0), 0.0)

    area = intracranial.sum(axis=(1, 2)).astype(np.float64)
    share = area / max(float(area.max()), 1.0)
    xs = np.flatnonzero(intracranial.any(axis=(0, 1)))
    midline = 0.5 * (float(xs[0]) + float(xs[-1])) * sx

    ventricles = _ventricles(intracranial, csf_fraction, depth, share, midline, spacing_mm)
    return Anatomy(
        intracranial=intracranial,
        depth_mm=depth.astype(np.float32),
        smooth=smooth,
        csf_fraction=csf_fraction,
        ventricles=ventricles,
        brain_hu=brain_hu,
        csf_hu=csf_hu,
        midline_x_mm=midline,
        slice_share=share,
        spacing_mm=(sz, sy, sx),
    )


def _ventricles(
    intracranial: np.ndarray,
    csf_fraction: np.ndarray,
    depth: np.ndarray,
    share: np.ndarray,
    midline: float,
    spacing: Sequence[float],
) -> np.ndarray:
    """The largest deep CSF components near the midline in the upper slices."""
    sz, sy, sx = (float(v) for v in spacing)
    voxel_ml = sz * sy * sx / 1000.0
    deep = intracranial & (csf_fraction >= 0.5) & (depth > 12.0)
    # The lateral ventricles lie at and above the widest slice; the cisterns lie below it.
    lowest = max(0, int(np.argmax(share)) - int(round(5.0 / sz)))
    deep[:lowest] = False
    deep &= (share > 0.45)[:, None, None]
    labels, n = ndimage.label(deep)
    if n == 0:
        return np.zeros_like(deep)
    counts = np.bincount(labels.ravel())
    keep: list[tuple[int, int]] = []
    for k in range(1, n + 1):
        if counts[k] * voxel_ml < 0.3:
            continue
        _, _, ix = np.nonzero(labels == k)
        if abs(float(ix.mean()) * sx - midline) < 30.0:
            keep.append((int(counts[k]), k))
    keep.sort(reverse=True)
    return np.isin(labels, [k for _, k in keep[:3]])


# ---------------------------------------------------------------------------------------------
# Lesions


@dataclass(frozen=True, eq=False)
class InsertedLesion:
    """A lesion put into a head CT.

    Attributes:
        hu: float32 array (z, y, x) in HU, the base with the lesion.
        labels: uint8 array (z, y, x): the subtype's BLAST-CT class where a voxel is at least
            half blood, 3 in the oedema rim, 0 elsewhere.
        volume_ml: Voxel-counted volume of blood (voxels labelled with the subtype's class).
        blood_hu: The blood level used (HU, before texture, partial volume and noise).
        extra: Shape facts (side, oedema, fitted size parameter).
    """

    hu: np.ndarray
    labels: np.ndarray
    volume_ml: float
    blood_hu: float
    extra: dict[str, Any] = field(default_factory=dict)


def _bisect(count: Callable[[float], int], target: float, lo: float, hi: float) -> float:
    """The parameter in [lo, hi] whose (non-decreasing) voxel count is nearest ``target``."""
    best, best_err = hi, math.inf
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        c = count(mid)
        err = abs(c - target)
        if err < best_err:
            best, best_err = mid, err
        if err <= 0.01 * target:
            break
        if c < target:
            lo = mid
        else:
            hi = mid
    return best


def _box_around(
    shape: Sequence[int], centre_idx: Sequence[float], half_mm: float, spacing: Sequence[float]
) -> tuple[slice, slice, slice]:
    out = []
    for n, c, s in zip(shape, centre_idx, spacing, strict=True):
        h = int(math.ceil(half_mm / float(s)))
        out.append(slice(max(0, int(c) - h), min(int(n), int(c) + h + 1)))
    return out[0], out[1], out[2]


def _smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], mm: float
) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (correlation ~``mm``)."""
    field_ = ndimage.gaussian_filter(
        rng.standard_normal(tuple(shape)).astype(np.float32),
        [mm / float(s) for s in spacing],
        mode="nearest",
    )
    std = float(field_.std())
    return field_ / (std if std > 0 else 1.0)


def _edge_fraction(phi: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Blood fraction of each voxel from a signed distance ``phi`` (mm, <= 0 inside): a box
    voxel crossed by a plane, 1 → 0 across the voxel's extent along the normal."""
    grads = np.gradient(phi, *[float(s) for s in spacing])
    norm = np.sqrt(sum(g * g for g in grads)) + np.float32(1e-6)
    width = sum(np.abs(g) * np.float32(s) for g, s in zip(grads, spacing, strict=True)) / norm
    width = np.maximum(width, np.float32(0.3))
    return np.clip(0.5 - phi / width, 0.0, 1.0).astype(np.float32)


def _choose(rng: np.random.Generator, mask: np.ndarray, what: str) -> tuple[int, int, int]:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        raise ValueError(f"no room for a {what} in this head")
    flat = int(idx[int(rng.integers(idx.size))])
    z, y, x = np.unravel_index(flat, mask.shape)
    return int(z), int(y), int(x)


def _iph(
    an: Anatomy, rng: np.random.Generator, target_vox: float
) -> tuple[_Box, np.ndarray, np.ndarray, dict[str, Any]]:
    sz, sy, sx = an.spacing_mm
    Z, Y, X = an.coords()
    vent_near = ndimage.binary_dilation(an.ventricles, iterations=2)
    off_mid = np.abs(X - np.float32(an.midline_x_mm)) > 12.0
    centres = an.intracranial & (an.depth_mm > 22.0) & ~vent_near & off_mid
    centres &= (an.csf_fraction < 0.3) & (an.slice_share > 0.5)[:, None, None]
    cz, cy, cx = _choose(rng, centres, "intraparenchymal haemorrhage")
    centre = np.array([cz * sz, cy * sy, cx * sx])
    box = _box_around(an.intracranial.shape, (cz, cy, cx), 45.0, an.spacing_mm)
    zb, yb, xb = Z[box[0]], Y[:, box[1]], X[:, :, box[2]]
    allowed = an.intracranial[box] & (an.depth_mm[box] > 4.0) & ~vent_near[box]
    allowed &= an.csf_fraction[box] < 0.6  # stops at ventricles and cisterns
    n_lobes = int(rng.integers(3, 6))
    offsets = rng.normal(0.0, 4.0, size=(n_lobes, 3))
    offsets[0] = 0.0
    radii = rng.uniform(7.0, 13.0, size=(n_lobes, 3))
    radii[:, 0] *= 0.9  # a little flatter along z
    rough = 1.5 * _smooth_noise(rng, allowed.shape, an.spacing_mm, 4.0)

    def phi_at(k: float) -> np.ndarray:
        best: np.ndarray | None = None
        for off, rad in zip(offsets, radii, strict=True):
            c = centre + k * off
            q = (
                ((zb - np.float32(c[0])) / np.float32(k * rad[0])) ** 2
                + ((yb - np.float32(c[1])) / np.float32(k * rad[1])) ** 2
                + ((xb - np.float32(c[2])) / np.float32(k * rad[2])) ** 2
            )
            dist = (np.sqrt(q) - 1) * np.float32(k * float(np.mean(rad)))
            best = dist if best is None else np.minimum(best, dist)
        assert best is not None
        return best + rough * np.float32(min(1.0, k))

    k = _bisect(lambda k: int(np.count_nonzero(allowed & (phi_at(k) <= 0))), target_vox, 0.05, 4.0)
    return box, phi_at(k), allowed, {"scale": round(k, 4)}


def _extra_axial(
    an: Anatomy, rng: np.random.Generator, target_vox: float, kind: str, target_ml: float
) -> tuple[_Box, np.ndarray, np.ndarray, dict[str, Any]]:
    """Subdural crescent or epidural lens: a thickness profile over the inner table."""
    sz, sy, sx = an.spacing_mm
    Z, Y, X = an.coords()
    side = 1.0 if rng.random() < 0.5 else -1.0
    lateral = (X - np.float32(an.midline_x_mm)) * np.float32(side)
    halfwidth = float(
        np.abs(np.flatnonzero(an.intracranial.any(axis=(0, 1))) * sx - an.midline_x_mm).max()
    )
    upper = np.zeros(an.slice_share.shape, dtype=bool)
    top = int(np.argmax(an.slice_share))
    upper[top:] = True
    shell = an.intracranial & (an.depth_mm <= 2.5) & (lateral > 0.45 * halfwidth)
    shell &= ((an.slice_share > 0.5) & upper)[:, None, None]
    cz, cy, cx = _choose(rng, shell, f"{kind} haemorrhage")
    subdural = kind == "subdural"
    radius = (22.0 if subdural else 13.0) * target_ml ** (1.0 / 3.0)
    power = 0.7 if subdural else 1.0
    t_max = 15.0 if subdural else 35.0
    allowed_all = an.intracranial & (lateral > 3.0) & (an.depth_mm < 40.0)
    allowed_all &= (an.slice_share > 0.15)[:, None, None]
    for _ in range(6):
        box = _box_around(an.intracranial.shape, (cz, cy, cx), radius + 4.0, an.spacing_mm)
        d = np.sqrt(
            (Z[box[0]] - np.float32(cz * sz)) ** 2
            + (Y[:, box[1]] - np.float32(cy * sy)) ** 2
            + (X[:, :, box[2]] - np.float32(cx * sx)) ** 2
        )
        profile = np.clip(1.0 - (d / np.float32(radius)) ** 2, 0.0, None) ** np.float32(power)
        profile *= 1.0 + np.float32(0.1) * _smooth_noise(rng, d.shape, an.spacing_mm, 12.0)
        depth = an.depth_mm[box]
        allowed = allowed_all[box]

        def phi_at(
            t: float, depth: np.ndarray = depth, profile: np.ndarray = profile
        ) -> np.ndarray:
            return depth - np.float32(t) * profile

        def count(t: float, allowed: np.ndarray = allowed, phi_at: Any = phi_at) -> int:
            return int(np.count_nonzero(allowed & (phi_at(t) <= 0)))

        if count(t_max) >= target_vox:
            t = _bisect(count, target_vox, 0.0, t_max)
            return (
                box,
                phi_at(t),
                allowed,
                {
                    "side": "left" if side > 0 else "right",
                    "thickness_mm": round(t, 2),
                    "radius_mm": round(radius, 1),
                },
            )
        radius *= 1.25
    raise ValueError(f"no room for a {kind} haemorrhage of this volume in this head")


def _csf_lesion(
    an: Anatomy,
    rng: np.random.Generator,
    target_vox: float,
    kind: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Blood in CSF spaces: returns (mask, fraction, replaced HU, extra) on the whole grid."""
    sz, sy, sx = an.spacing_mm
    Z, Y, X = an.coords()
    replaced = np.full(an.intracranial.shape, np.float32(an.csf_hu), dtype=np.float32)
    fraction = an.csf_fraction.copy()
    if kind == "intraventricular":
        space = an.ventricles.copy()
        if not space.any():
            raise ValueError("no ventricles found for an intraventricular haemorrhage")
        grow_into = an.intracranial & (an.depth_mm > 6.0)
        edge_into = an.intracranial
    else:
        vent_near = ndimage.binary_dilation(an.ventricles, iterations=2)
        space = an.intracranial & ~vent_near & (an.depth_mm < 25.0) & (fraction >= 0.5)
        space &= (an.slice_share > 0.3)[:, None, None]
        grow_into = an.intracranial & ~vent_near & (an.depth_mm < 15.0) & (an.smooth < 45.0)
        edge_into = an.intracranial & ~vent_near

    grown = 0
    while grown < 12 and np.count_nonzero(space & (fraction >= 0.5)) < 1.05 * target_vox:
        # Too little CSF for the volume: the blood fills the neighbouring voxels (sulci
        # packed with clot, ventricles widened by a cast).
        ring = ndimage.binary_dilation(space, structure=_plane_cross()) & grow_into & ~space
        if not ring.any():
            break
        fraction[ring] = 1.0
        replaced[ring] = an.smooth[ring]
        space |= ring
        grown += 1
    core = space & (fraction >= 0.5)
    # Partial-volume voxels (part CSF, part brain) along the edges of the CSF spaces.
    edge = ndimage.binary_dilation(space, structure=_plane_cross()) & (fraction >= 0.15)
    space |= edge & edge_into
    extra: dict[str, Any] = {"widened_voxels": int(grown)}

    if kind == "intraventricular":
        # Blood layers in the dependent (posterior: +y, supine patient) part below a level.
        ys = np.flatnonzero(core.any(axis=(0, 2)))
        lo, hi = float(ys[0]) * sy - sy, float(ys[-1]) * sy + sy

        def count_iv(level: float) -> int:
            return int(np.count_nonzero(core & (Y >= np.float32(hi - level))))

        level = _bisect(count_iv, target_vox, 0.0, hi - lo)
        y_level = hi - level
        mask = core & (Y >= np.float32(y_level))
        weight = np.clip((Y - np.float32(y_level)) / np.float32(sy) + 1.0, 0.0, 1.0)
        near = ndimage.binary_dilation(mask, structure=_plane_cross(), iterations=2)
        frac = np.where(space & near, fraction * weight, 0.0).astype(np.float32)
        extra["fluid_level_y_mm"] = round(y_level, 2)
        return mask, frac, replaced, extra

    # Subarachnoid: the CSF around a point near the surface or in the basal cisterns.
    basal = rng.random() < 0.4
    start = core.copy()
    if basal:
        lowest = int(np.argmax(an.slice_share > 0.3))
        zone = np.zeros(core.shape[0], dtype=bool)
        zone[lowest : lowest + max(1, int(round(30.0 / sz)))] = True
        start &= zone[:, None, None] & (np.abs(X - np.float32(an.midline_x_mm)) < 30.0)
    else:
        start &= (an.depth_mm < 10.0) & (an.slice_share > 0.5)[:, None, None]
    if not start.any():
        start = core
    cz, cy, cx = _choose(rng, start, "subarachnoid haemorrhage")
    dist = np.sqrt(
        (Z - np.float32(cz * sz)) ** 2
        + (Y - np.float32(cy * sy)) ** 2
        + (X - np.float32(cx * sx)) ** 2
    )
    radius = _bisect(
        lambda r: int(np.count_nonzero(core & (dist <= np.float32(r)))), target_vox, 0.0, 250.0
    )
    within = dist <= np.float32(radius)
    mask = core & within
    # partial-volume blood only in the voxels next to the labelled ones
    near = ndimage.binary_dilation(mask, structure=_plane_cross())
    frac = np.where(space & within & near, fraction, 0.0).astype(np.float32)
    extra.update(
        {"site": "basal cisterns" if basal else "convexity", "radius_mm": round(radius, 1)}
    )
    return mask, frac, replaced, extra


def _plane_cross() -> np.ndarray:
    """In-plane 4-neighbourhood (no growth across slices)."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = ndimage.generate_binary_structure(2, 1)
    return s


def insert_haemorrhage(
    hu: np.ndarray,
    spacing_mm: Sequence[float],
    subtype: str,
    volume_ml: float,
    rng: np.random.Generator,
    *,
    anatomy: Anatomy | None = None,
) -> InsertedLesion:
    """Insert an acute haemorrhage of a given type and volume into a normal head CT.

    Args:
        hu: float array (z, y, x) in HU of a normal head (axial slices).
        spacing_mm: (z, y, x) spacing in mm.
        subtype: A ``training.format.HAEMORRHAGE_SUBTYPES`` key.
        volume_ml: Requested blood volume in ml (the voxel count lands within a few per cent).
        rng: Random generator (site, shape, blood level, texture).
        anatomy: :func:`head_anatomy` of ``hu`` when already computed.

    Returns:
        The :class:`InsertedLesion` (new HU, label map, true volume).

    Raises:
        ValueError: Unknown subtype, non-positive volume, or no room for the lesion.
    """
    if subtype not in HAEMORRHAGE_SUBTYPES:
        raise ValueError(f"subtype must be one of {sorted(HAEMORRHAGE_SUBTYPES)}, got {subtype!r}")
    if not volume_ml > 0:
        raise ValueError(f"volume_ml must be positive, got {volume_ml}")
    spacing = tuple(float(v) for v in spacing_mm)
    an = anatomy if anatomy is not None else head_anatomy(hu, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    target_vox = volume_ml / voxel_ml
    cls = HAEMORRHAGE_SUBTYPES[subtype]
    lo, hi = BLOOD_HU[subtype]
    blood = float(rng.uniform(lo + 4.0, hi - 4.0))
    out = np.asarray(hu, dtype=np.float32).copy()
    labels = np.zeros(out.shape, dtype=np.uint8)
    extra: dict[str, Any] = {}

    if subtype in ("subarachnoid", "intraventricular"):
        mask, frac, replaced, extra = _csf_lesion(an, rng, target_vox, subtype)
        box = _bbox(frac > 0)
        texture = 2.0 * _smooth_noise(rng, out[box].shape, spacing, 3.0)
        out[box] += frac[box] * (np.float32(blood) + texture - replaced[box])
        labels[mask] = cls
    else:
        if subtype == "intraparenchymal":
            box, phi, allowed, extra = _iph(an, rng, target_vox)
        else:
            box, phi, allowed, extra = _extra_axial(an, rng, target_vox, subtype, volume_ml)
        inside = allowed & (phi <= 0)
        # Partial volume only in the voxels touching the lesion (not along every boundary).
        frac = _edge_fraction(phi, spacing) * (allowed & ndimage.binary_dilation(inside))
        tissue = np.clip(an.smooth[box], -10.0, 70.0)
        texture = 2.0 * _smooth_noise(rng, phi.shape, spacing, 3.0)
        sub = out[box]
        sub += frac * (np.float32(blood) + texture - tissue)
        lab = labels[box]
        if subtype == "intraparenchymal" and rng.random() < OEDEMA_PROBABILITY:
            rim = float(rng.uniform(2.0, 4.0))
            oedema = float(rng.uniform(OEDEMA_HU[0] + 2.0, OEDEMA_HU[1] - 2.0))
            shell = allowed & (phi > 0) & (phi <= rim)
            near = allowed & ndimage.binary_dilation(shell | inside)
            ofrac = np.clip(_edge_fraction(phi - np.float32(rim), spacing) - frac, 0.0, 1.0)
            sub += ofrac * near * (np.float32(oedema) - tissue)
            lab[shell] = OEDEMA_CLASS
            extra.update({"oedema_rim_mm": round(rim, 2), "oedema_hu": round(oedema, 1)})
        lab[inside] = cls
    volume = float(np.count_nonzero(labels == cls)) * voxel_ml
    return InsertedLesion(hu=out, labels=labels, volume_ml=volume, blood_hu=blood, extra=extra)


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    if not mask.any():
        return slice(0, 0), slice(0, 0), slice(0, 0)
    out = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(int(present[0]), int(present[-1]) + 1))
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class _Plan:
    index: int
    patient: int
    visit: int
    subtype: str  # "normal" or a HAEMORRHAGE_SUBTYPES key
    volume_ml: float | None


def _plan(
    n_studies: int,
    subtypes: Sequence[str],
    volumes_ml: Sequence[float],
    normal_fraction: float,
    rng: np.random.Generator,
) -> list[_Plan]:
    """Which study gets which lesion, and which studies share a patient.

    Lesions cycle through subtypes × volumes (so every subtype and volume is represented);
    about a third of the patients have two studies.
    """
    n_normal = int(round(normal_fraction * n_studies))
    kinds: list[tuple[str, float | None]] = [("normal", None)] * n_normal
    combos = [(s, float(v)) for v in volumes_ml for s in subtypes]
    offset = int(rng.integers(len(combos))) if combos else 0
    for j in range(n_studies - n_normal):
        s, v = combos[(j + offset) % len(combos)]
        kinds.append((s, v))
    order = rng.permutation(n_studies)
    kinds = [kinds[int(i)] for i in order]
    plans: list[_Plan] = []
    patient, i = 0, 0
    while i < n_studies:
        visits = 2 if (n_studies - i >= 2 and rng.random() < 0.35) else 1
        for v in range(visits):
            s, vol = kinds[i]
            plans.append(_Plan(i, patient, v, s, vol))
            i += 1
        patient += 1
    return plans


def _resolve_base(base: Base, shared_dir: Path | None) -> tuple[str, Path | None]:
    folder = (shared_dir if shared_dir is not None else default_shared_dir()) / _CQ500_SUBDIR
    present = folder.is_dir() and any(folder.iterdir())
    if base == "phantom":
        return "phantom", None
    if base == "cq500":
        if not present:
            raise FileNotFoundError(f"the CQ500 series is not at {folder}")
        return "cq500", folder
    if base == "auto":
        return ("cq500", folder) if present else ("phantom", None)
    raise ValueError(f"base must be 'auto', 'cq500' or 'phantom', got {base!r}")


def synth_ct_dataset(
    out: Path,
    *,
    n_studies: int,
    seed: int,
    subtypes: Sequence[str] = tuple(HAEMORRHAGE_SUBTYPES),
    volumes_ml: Sequence[float] = (2, 5, 10, 25),
    normal_fraction: float = 0.3,
    base: Base = "auto",
    shared_dir: Path | None = None,
    size: Size = "full",
) -> SynthReport:
    """Write a synthetic head-CT haemorrhage dataset (``training.format``, task
    ``haemorrhage``, source ``synth``).

    Layout: ``dicom/<nnnn>/CT0001.dcm``... (one axial series per study),
    ``masks/<nnnn>.nii.gz`` (uint8 label map on the series' grid: the subtype's BLAST-CT
    class, 3 for oedema, 0 elsewhere; all 0 for normals), ``labels.csv`` (finding
    ``intracranial_haemorrhage``, label, mask, subtype, volume_ml = voxel-counted blood volume,
    PatientID; about a third of the patients have two studies) and ``dataset.json`` (the
    parameters and the base image's attribution).

    Args:
        out: Dataset folder (created; files in it are overwritten).
        n_studies: Number of studies (>= 1).
        seed: Seed of every random choice; the same arguments write identical pixel data,
            masks and UIDs.
        subtypes: Haemorrhage types to cycle through (``HAEMORRHAGE_SUBTYPES`` keys).
        volumes_ml: Blood volumes to cycle through, ml (each in [0.5, 120]).
        normal_fraction: Share of studies without haemorrhage, in [0, 1].
        base: ``cq500`` (the real normal head CT in ``<shared_dir>/data/cq500-ct0``),
            ``phantom`` (``triage.demo.phantom`` normal heads, one per patient) or ``auto``
            (cq500 when present, else phantom).
        shared_dir: The ``shared`` folder; default ``../shared`` beside the checkout.
        size: ``full`` (phantom 256² at 0.9 mm, CQ500 512² at 0.44 mm; 2.5 or 5 mm slices)
            or ``small`` (128² at 1.8 mm, 5 mm slices: fast, for CI).

    Returns:
        The :class:`SynthReport`.

    Raises:
        ValueError: An argument is out of range.
        FileNotFoundError: ``base="cq500"`` and the series is absent.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if not 0.0 <= normal_fraction <= 1.0:
        raise ValueError(f"normal_fraction must lie in [0, 1], got {normal_fraction}")
    if size not in ("full", "small"):
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    unknown = [s for s in subtypes if s not in HAEMORRHAGE_SUBTYPES]
    if unknown or not subtypes:
        raise ValueError(f"subtypes must be among {sorted(HAEMORRHAGE_SUBTYPES)}, got {unknown}")
    if not volumes_ml or any(not 0.5 <= float(v) <= 120.0 for v in volumes_ml):
        raise ValueError(f"volumes_ml must be in [0.5, 120], got {list(volumes_ml)}")
    kind, folder = _resolve_base(base, shared_dir)
    params = {
        "generator": "training.synth.ct",
        "n_studies": n_studies,
        "seed": seed,
        "subtypes": list(subtypes),
        "volumes_ml": [float(v) for v in volumes_ml],
        "normal_fraction": normal_fraction,
        "base": kind,
        "size": size,
    }
    key = params_key(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plans = _plan(
        n_studies, subtypes, volumes_ml, normal_fraction, np.random.default_rng([seed, 0])
    )
    source = _cq500(folder) if folder is not None else None
    thicknesses = (_CQ500_GRID if source is not None else _PHANTOM_GRID)[size][2]
    logger.info("writing %d synthetic head CT studies (%s base, %s)", n_studies, kind, size)

    studies: list[SynthStudy] = []
    for plan in plans:
        rng = np.random.default_rng([seed, 1, plan.index])
        thickness = float(thicknesses[int(rng.integers(len(thicknesses)))])
        if source is not None:
            vol = source.volume(rng, size, thickness)
        else:
            head_seed = int(np.random.default_rng([seed, 2, plan.patient]).integers(0, 2**31 - 1))
            vol = _phantom_base(head_seed, size, thickness)
        extra: dict[str, Any] = {"base": vol.description, "slice_thickness_mm": thickness}
        if plan.subtype == "normal":
            hu, labels, volume, label = vol.hu, np.zeros(vol.hu.shape, np.uint8), 0.0, 0
        else:
            assert plan.volume_ml is not None
            lesion = insert_haemorrhage(vol.hu, vol.spacing_mm, plan.subtype, plan.volume_ml, rng)
            hu, labels, volume, label = lesion.hu, lesion.labels, lesion.volume_ml, 1
            extra.update({"blood_hu": round(lesion.blood_hu, 1), **lesion.extra})
        ids = study_ids(key, plan.index, plan.patient, visit=plan.visit)
        name = f"{plan.index + 1:04d}"
        files = write_ct_series(
            out / DICOM_DIR / name,
            hu,
            spacing_mm=vol.spacing_mm,
            origin_mm=vol.origin_mm,
            ids=ids,
            comment=f"{NOT_FOR_DIAGNOSIS}; training.synth",  # the label stays out of headers
        )
        mask = Path(MASKS_DIR) / f"{name}.nii.gz"
        write_label_map(out / mask, labels, spacing_mm=vol.spacing_mm, origin_mm=vol.origin_mm)
        studies.append(
            SynthStudy(
                StudyInstanceUID=ids.StudyInstanceUID,
                SeriesInstanceUID=ids.SeriesInstanceUID,
                PatientID=ids.PatientID,
                finding=HAEMORRHAGE,
                label=label,
                subtype=plan.subtype,
                volume_ml=volume,
                requested_ml=plan.volume_ml,
                mask=mask,
                files=tuple(files),
                extra=extra,
            )
        )
    meta: dict[str, Any] = {"generator": params}
    if kind == "cq500":
        meta["base"] = {
            "kind": "cq500",
            **CQ500_ATTRIBUTION,
            "note": "every study is the same real head under a small pose change",
        }
    else:
        meta["base"] = {
            "kind": "phantom",
            "dataset": "triage.demo.phantom normal heads",
            "licence": "Apache-2.0 (generated)",
        }
    meta["classes"] = {"0": "background", "1": "IPH", "2": "EAH", "3": "oedema", "4": "IVH"}
    write_dataset_files(out, task="haemorrhage", studies=studies, meta=meta)
    return SynthReport(dataset=out, studies=studies, base=kind)
