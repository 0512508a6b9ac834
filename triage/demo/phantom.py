"""Synthetic non-contrast head CT studies that exist on a fresh machine.

``triage demo`` and the end-to-end tests send these series over DICOM. They are built to look
like a real adult non-contrast head CT to the haemorrhage model (which sees HU clipped to
[-15, 100] at 1 mm isotropic), so the pretrained network flags the synthetic bleed and leaves
the normal alone.

Anatomy (values in HU before noise): air -1000; scalp ~40 with a thin fat layer and temporalis
muscle; skull 5-8 mm of cortical tables (~1400) around diploe (~650) with smooth irregularity;
cranial floor (anterior, middle and posterior fossae) with petrous ridges; brain with a grey
matter rim (~38) along gyri and sulci, white matter (~27) with smooth spatial variation, deep
grey nuclei, lateral ventricles (frontal horns, bodies, trigones, occipital and temporal horns),
third and fourth ventricles, sylvian and interhemispheric fissures, basal cisterns, falx,
brainstem and cerebellum. Noise is white noise filtered by the scanner's point-spread function
(3.5 HU standard deviation by default). The haemorrhage is acute blood (~65 HU): an irregular
lobulated intraparenchymal bleed (``"iph"``) in the basal ganglia or a lobe with a thin rim of
oedema (~18 HU), or a subdural crescent (``"sdh"``) over one convexity that effaces the sulci
beneath it.

Geometry: patient coordinates are LPS millimetres (x to the patient's left, y posterior,
z superior); arrays are indexed (z, y, x) with z increasing towards the vertex; images are axial
(ImageOrientationPatient 1\\0\\0\\0\\1\\0).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "HAEMORRHAGE_KINDS",
    "HeadPhantom",
    "PhantomSpec",
    "head_ct_phantom",
    "head_ct_volume",
    "phantom_uids",
    "write_head_ct_series",
]

HAEMORRHAGE_KINDS: Final[tuple[str, ...]] = ("iph", "sdh")
"""Supported haemorrhage kinds: intraparenchymal and subdural."""

RESCALE_INTERCEPT: Final[int] = -1024
"""HU = stored value + this (RescaleSlope is 1), as on most scanners."""

MANUFACTURER: Final[str] = "triage-phantom"

_UID_ROOT: Final[str] = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses
_HU_MIN: Final[int] = -1024
_HU_MAX: Final[int] = 3071  # 12 bits stored

# Tissue values (HU) before noise.
_AIR: Final[float] = -1000.0
_FAT: Final[float] = -60.0
_SOFT: Final[float] = 42.0
_MUSCLE: Final[float] = 48.0
_BONE_CORTEX: Final[float] = 1400.0
_BONE_DIPLOE: Final[float] = 650.0
_CSF: Final[float] = 5.0
_GREY: Final[float] = 38.0
_WHITE: Final[float] = 27.5
_DEEP_GREY: Final[float] = 35.0
_THALAMUS: Final[float] = 33.5
_BRAINSTEM: Final[float] = 30.0
_CEREBELLUM: Final[float] = 35.0
_FALX: Final[float] = 48.0
_BLOOD: Final[float] = 66.0
_OEDEMA: Final[float] = 18.0


@dataclass(frozen=True)
class PhantomSpec:
    """What synthetic head CT to build.

    Attributes:
        haemorrhage: Whether the study holds an acute haemorrhage.
        kind: ``"iph"`` (intraparenchymal, basal ganglia or lobar) or ``"sdh"`` (subdural
            crescent over one convexity). Ignored when ``haemorrhage`` is False.
        seed: Seed of every random choice (head size, sulcal pattern, skull, noise, bleed site);
            the same spec always gives the same voxels.
        rows: Image rows (A-P matrix size).
        columns: Image columns (L-R matrix size).
        pixel_spacing_mm: In-plane pixel spacing in mm (0.9 mm × 256 gives a 230 mm field of
            view).
        slice_thickness_mm: Slice thickness and spacing in mm (contiguous slices).
        slices: Number of axial slices. The last one lies ~3 mm above the vertex and the
            series extends down from there: the default 52 slices of 2.5 mm reach just below
            the cranial floor (fewer slices leave out the skull base).
        bleed_volume_ml: Target haemorrhage volume in ml (the built volume is within a few
            per cent of it).
        noise_hu: Standard deviation of the image noise in HU (in a uniform region).
    """

    haemorrhage: bool = False
    kind: str = "iph"
    seed: int = 0
    rows: int = 256
    columns: int = 256
    pixel_spacing_mm: float = 0.9
    slice_thickness_mm: float = 2.5
    slices: int = 52
    bleed_volume_ml: float = 25.0
    noise_hu: float = 3.5

    def __post_init__(self) -> None:
        if self.kind not in HAEMORRHAGE_KINDS:
            raise ValueError(f"kind must be one of {HAEMORRHAGE_KINDS}, got {self.kind!r}")
        if not 64 <= self.rows <= 1024 or not 64 <= self.columns <= 1024:
            raise ValueError("rows and columns must lie in [64, 1024]")
        if not 0.3 <= self.pixel_spacing_mm <= 2.0:
            raise ValueError("pixel_spacing_mm must lie in [0.3, 2.0]")
        if not 0.5 <= self.slice_thickness_mm <= 10.0:
            raise ValueError("slice_thickness_mm must lie in [0.5, 10]")
        if not 8 <= self.slices <= 512:
            raise ValueError("slices must lie in [8, 512]")
        if not 2.0 <= self.bleed_volume_ml <= 120.0:
            raise ValueError("bleed_volume_ml must lie in [2, 120]")
        if not 0.0 <= self.noise_hu <= 50.0:
            raise ValueError("noise_hu must lie in [0, 50]")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")

    @property
    def label(self) -> str:
        """Short name: ``normal``, ``iph`` or ``sdh``."""
        return self.kind if self.haemorrhage else "normal"


@dataclass(frozen=True, eq=False)
class HeadPhantom:
    """A synthetic head CT volume and its ground truth.

    Attributes:
        hu: int16 array (z, y, x) of Hounsfield units in [-1024, 3071]; z increases towards the
            vertex (slice 0 is the most inferior), y posterior, x to the patient's left.
        spacing_mm: Voxel spacing (z, y, x) in mm.
        origin_mm: LPS position (x, y, z) in mm of the centre of voxel ``hu[0, 0, 0]``
            (the ImagePositionPatient of slice 0).
        bleed_mask: bool array, same shape as ``hu``: True in acute blood.
        oedema_mask: bool array, same shape as ``hu``: True in the perilesional oedema rim.
        spec: The spec it was built from.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    bleed_mask: np.ndarray
    oedema_mask: np.ndarray
    spec: PhantomSpec = field(repr=False)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def bleed_volume_ml(self) -> float:
        """Volume of acute blood in ml (0 for a normal study)."""
        return float(np.count_nonzero(self.bleed_mask)) * self.voxel_volume_ml


# ---------------------------------------------------------------------------------------------
# Small field helpers. Coordinates are broadcastable float32 arrays in mm:
# Z (n, 1, 1), Y (1, r, 1), X (1, 1, c).


@dataclass(frozen=True)
class _Grid:
    """Broadcastable LPS coordinates (mm) of a (sub)volume."""

    z: np.ndarray  # (n, 1, 1)
    y: np.ndarray  # (1, r, 1)
    x: np.ndarray  # (1, 1, c)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.shape[0], self.y.shape[1], self.x.shape[2])

    def sub(self, zs: slice, ys: slice, xs: slice) -> _Grid:
        return _Grid(self.z[zs], self.y[:, ys], self.x[:, :, xs])


def _box(grid: _Grid, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
    """Index slices of ``grid`` covering the LPS box [lo, hi] (x, y, z order, mm)."""

    def rng(c: np.ndarray, a: float, b: float) -> slice:
        idx = np.flatnonzero((c >= a) & (c <= b))
        if idx.size == 0:
            return slice(0, 0)
        return slice(int(idx[0]), int(idx[-1]) + 1)

    return (
        rng(grid.z.ravel(), lo[2], hi[2]),
        rng(grid.y.ravel(), lo[1], hi[1]),
        rng(grid.x.ravel(), lo[0], hi[0]),
    )


def _ellipsoid(
    g: _Grid,
    centre: Sequence[float],
    axes: Sequence[float],
    angle_deg: float = 0.0,
) -> np.ndarray:
    """Normalised radius of an ellipsoid (<1 inside), rotated about z by ``angle_deg``.

    Args:
        g: Coordinates.
        centre: (x, y, z) centre in mm.
        axes: (a, b, c) semi-axes in mm along the rotated x, y and z.
        angle_deg: Rotation in the axial plane.

    Returns:
        float32 array broadcast to ``g.shape``: sqrt of the quadratic form.
    """
    dx = g.x - np.float32(centre[0])
    dy = g.y - np.float32(centre[1])
    dz = g.z - np.float32(centre[2])
    if angle_deg:
        t = math.radians(angle_deg)
        c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
        u = dx * c + dy * s
        v = -dx * s + dy * c
    else:
        u, v = dx, dy
    q = (u / np.float32(axes[0])) ** 2 + (v / np.float32(axes[1])) ** 2
    return np.sqrt(q + (dz / np.float32(axes[2])) ** 2)


def _interp_to(
    g: _Grid, coarse_axes: Sequence[np.ndarray], step: float, arr: np.ndarray
) -> np.ndarray:
    """Linearly interpolate ``arr`` (on the regular coarse grid) onto the points of ``g``."""
    out = arr.astype(np.float32)
    fine_axes = (g.z.ravel(), g.y.ravel(), g.x.ravel())
    for axis, (fine, coarse) in enumerate(zip(fine_axes, coarse_axes, strict=True)):
        pos = (fine.astype(np.float64) - coarse[0]) / step
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, len(coarse) - 2)
        wshape = [1, 1, 1]
        wshape[axis] = len(fine)
        w = (pos - i0).astype(np.float32).reshape(wshape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out


def _coarse_field(
    rng: np.random.Generator, g: _Grid, wavelength_mm: float, step: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """Unit-variance Gaussian-filtered white noise on a coarse grid covering ``g``."""
    axes = (g.z.ravel(), g.y.ravel(), g.x.ravel())
    coarse_axes = [
        np.arange(float(a.min()) - step, float(a.max()) + 2 * step, step, dtype=np.float64)
        for a in axes
    ]
    shape = tuple(len(c) for c in coarse_axes)
    spectrum = np.fft.rfftn(rng.standard_normal(shape))
    freqs = [np.fft.fftfreq(n, d=step) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1], d=step)]
    k2 = freqs[0][:, None, None] ** 2 + freqs[1][None, :, None] ** 2 + freqs[2][None, None, :] ** 2
    field_ = np.fft.irfftn(spectrum * np.exp(-0.5 * k2 * wavelength_mm**2), s=shape, axes=(0, 1, 2))
    std = float(field_.std())
    return coarse_axes, field_ / (std if std > 0 else 1.0)


def _lowpass_noise(
    rng: np.random.Generator, g: _Grid, wavelength_mm: float, step_mm: float | None = None
) -> np.ndarray:
    """Smooth random field with unit standard deviation, sampled on ``g``.

    White noise on a coarse grid (default step ``wavelength/4``) is Gaussian-filtered in
    Fourier space (frequency sigma ``1/wavelength``) and linearly interpolated onto ``g``, which
    is cheap even for a full volume.

    Returns:
        float32 array of shape ``g.shape``, mean ~0, standard deviation ~1.
    """
    step = step_mm if step_mm is not None else wavelength_mm / 4.0
    coarse_axes, field_ = _coarse_field(rng, g, wavelength_mm, step)
    return _interp_to(g, coarse_axes, step, field_)


def _radial_sheet_distance(
    rng: np.random.Generator,
    g: _Grid,
    mask: np.ndarray,
    wavelength_mm: float,
    centre: Sequence[float],
    radius_mm: float = 70.0,
) -> np.ndarray:
    """Distance (mm) to radial sheets (sulci), at the voxels of ``mask``.

    A smooth random field ``f`` (as in ``_lowpass_noise``) is sampled on a sphere of
    ``radius_mm`` around ``centre`` and extended along rays from the centre, so its zero
    sheets meet the brain surface at right angles, like sulci. The distance is
    ``|f| / |grad f|`` scaled by the ratio of the voxel's radius to the sphere's.

    Args:
        rng: Random generator.
        g: Coordinates.
        mask: bool array of ``g.shape``: where to evaluate.
        wavelength_mm: Wavelength of the field on the sphere (sheets ~0.7 x this apart).
        centre: (x, y, z) centre of the rays in mm.
        radius_mm: Radius of the sphere the field is sampled on.

    Returns:
        float32 array of the masked voxels' distances (in ``np.nonzero(mask)`` order).
    """
    step = wavelength_mm / 6.0
    r = radius_mm + 3 * step
    ax = np.arange(-r, r + step, step)
    box = _Grid(ax[:, None, None], ax[None, :, None], ax[None, None, :])
    _, f = _coarse_field(rng, box, wavelength_mm, step)
    gz, gy, gx = np.gradient(f, step)
    grad = np.sqrt(gz * gz + gy * gy + gx * gx)
    iz, iy, ix = np.nonzero(mask)
    pz = g.z.ravel()[iz] - np.float32(centre[2])
    py = g.y.ravel()[iy] - np.float32(centre[1])
    px = g.x.ravel()[ix] - np.float32(centre[0])
    rad = np.sqrt(px * px + py * py + pz * pz) + np.float32(1e-3)
    k = np.float32(radius_mm) / rad
    # coarse axes start at ax[0] - step (see _coarse_field)
    origin = float(ax[0]) - step
    n = f.shape[0]
    fi = np.zeros(rad.shape, dtype=np.float64)
    gi = np.zeros(rad.shape, dtype=np.float64)
    pos = [(p * k - origin) / step for p in (pz, py, px)]
    i0 = [np.clip(np.floor(p).astype(np.intp), 0, n - 2) for p in pos]
    w = [p - i for p, i in zip(pos, i0, strict=True)]
    for dz in (0, 1):
        wz = w[0] if dz else 1 - w[0]
        for dy in (0, 1):
            wy = w[1] if dy else 1 - w[1]
            for dx in (0, 1):
                wx = w[2] if dx else 1 - w[2]
                idx = (i0[0] + dz, i0[1] + dy, i0[2] + dx)
                wt = wz * wy * wx
                fi += wt * f[idx]
                gi += wt * grad[idx]
    return (np.abs(fi) / np.maximum(gi, 1e-3) / k).astype(np.float32)


def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur_inplane(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable convolution along y and x (axes 1, 2) with edge padding."""
    r = len(kernel) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        out = np.zeros_like(a)
        for i, w in enumerate(kernel):
            sl = [slice(None)] * 3
            sl[axis] = slice(i, i + n)
            out += w * p[tuple(sl)]
        a = out
    return a


def _smoothstep(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - np.float32(e0)) / np.float32(e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ---------------------------------------------------------------------------------------------
# The head.


@dataclass(frozen=True)
class _Head:
    """Random per-seed anatomy parameters (mm)."""

    ax: float  # outer head (skin) semi-axis L-R
    ay: float  # A-P
    az_up: float  # S-I above the centre (vertex)
    az_down: float  # taper below the centre
    scale: float  # brain structures scale
    ventricle: float  # ventricle size factor
    sulcal_width: float  # half width of the sulci in mm (atrophy)


def _random_head(rng: np.random.Generator) -> _Head:
    s = float(rng.uniform(0.96, 1.04))
    return _Head(
        ax=76.0 * s * float(rng.uniform(0.98, 1.02)),
        ay=94.0 * s,
        az_up=73.0 * s,
        az_down=140.0,
        scale=s,
        ventricle=float(rng.uniform(0.9, 1.15)),
        sulcal_width=float(rng.uniform(0.4, 0.6)),
    )


def _head_distance(g: _Grid, h: _Head, wobble: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to the skin surface, negative inside.

    The head is an egg: an ellipsoid that is wider posteriorly, tapers at the vertex and stays
    wide below the centre (the skull base), with a few mm of smooth irregularity.
    """
    ax = np.float32(h.ax) * (1 + np.float32(0.06) * g.y / np.float32(h.ay))
    az = np.where(g.z > 0, np.float32(h.az_up), np.float32(h.az_down)).astype(np.float32)
    ay = np.float32(h.ay) * (1 + np.float32(0.02) * (g.z < 0))  # a little longer below
    u, v, w = g.x / ax, g.y / ay, g.z / az
    f = u * u + v * v + w * w - 1
    grad = 2 * np.sqrt((u / ax) ** 2 + (v / ay) ** 2 + (w / az) ** 2) + np.float32(1e-6)
    return f / grad + wobble


def _floor_z(g: _Grid, h: _Head) -> np.ndarray:
    """z (mm) of the cranial floor under each (y, x): anterior, middle and posterior fossae.

    Three bowls: the anterior fossa (orbital roofs, with the cribriform plate lower in the
    midline), the middle fossa (deepest under the temporal lobes, rising to the sella), and the
    posterior fossa (deepest behind the foramen magnum), separated by the sphenoid wings and the
    petrous ridges.
    """
    s = np.float32(h.scale)
    x, y = g.x / s, g.y / s
    ax = np.abs(x)
    anterior = (
        np.float32(-19.0)
        - np.float32(5.0) * np.exp(-((x / 10) ** 2))
        + np.float32(3.0) * np.exp(-(((ax - 30) / 14) ** 2))
        + np.float32(0.06) * np.minimum(-y - 40, 0)
    )
    middle = np.float32(-30.0) - np.float32(13.0) * np.exp(
        -(((ax - 38) / 18) ** 2) - ((y + 2) / 22) ** 2
    )
    posterior = np.float32(-34.0) - np.float32(22.0) * np.exp(
        -((x / 38) ** 2) - ((y - 42) / 32) ** 2
    )
    t1 = _smoothstep(-5.0, 5.0, y + 25 + np.float32(0.3) * ax)  # sphenoid wings
    t2 = _smoothstep(-4.0, 4.0, y - (np.float32(0.875) * ax - 14))  # petrous ridges
    fz = anterior * (1 - t1) + middle * t1
    fz = fz * (1 - t2) + posterior * t2
    return fz * s


def _build(spec: PhantomSpec) -> HeadPhantom:
    rng = np.random.default_rng([spec.seed, 0x7A1A])
    n, r, c = spec.slices, spec.rows, spec.columns
    ps, st = spec.pixel_spacing_mm, spec.slice_thickness_mm
    h = _random_head(rng)

    # The last slice lies just above the vertex; the series extends down from there (to just
    # below the cranial floor with the default 52 slices of 2.5 mm).
    z0 = h.az_up + 3.0 - st * (n - 1)
    z = (z0 + st * np.arange(n)).astype(np.float32)
    y = ((np.arange(r) - (r - 1) / 2) * ps).astype(np.float32)
    x = ((np.arange(c) - (c - 1) / 2) * ps).astype(np.float32)
    full = _Grid(z[:, None, None], y[None, :, None], x[None, None, :])

    hu = np.full((n, r, c), _AIR, dtype=np.float32)
    bleed = np.zeros((n, r, c), dtype=bool)
    oedema = np.zeros((n, r, c), dtype=bool)

    # Work inside the head's bounding box only.
    box = _box(full, (-h.ax - 6, -h.ay * 1.1 - 6, -1e9), (h.ax * 1.1 + 6, h.ay * 1.1 + 6, 1e9))
    g = full.sub(*box)
    sub_hu = hu[box]

    wobble = np.float32(1.2) * _lowpass_noise(rng, g, 60.0, step_mm=10.0)
    d = _head_distance(g, h, wobble)  # mm, negative inside the skin
    head = d < 0
    depth = -d  # mm below the skin

    # Scalp: skin/galea, a thin fat layer, temporalis muscle laterally.
    temporal = (
        _smoothstep(0.55, 0.85, np.abs(g.x) / np.float32(h.ax))
        * _smoothstep(-40.0, -20.0, g.y)
        * (1 - _smoothstep(10.0, 35.0, g.y))
        * _smoothstep(-45.0, -30.0, g.z)
        * (1 - _smoothstep(5.0, 30.0, g.z))
    )
    scalp_t = np.float32(4.5) + np.float32(6.0) * temporal
    sub_hu[head] = _SOFT
    fat = head & (depth > 1.5) & (depth < 2.6) & (g.z < 35)
    sub_hu[fat] = _FAT
    sub_hu[head & (depth > 2.6) & (depth < scalp_t) & (temporal > 0.3)] = _MUSCLE

    # Skull: outer table, diploe, inner table; thinner over the temporal squama.
    skull_var = _lowpass_noise(rng, g, 40.0, step_mm=8.0)
    skull_t = (
        np.float32(6.8)
        + np.float32(0.6) * skull_var
        + np.float32(0.8) * _smoothstep(0.0, 80.0, g.y)  # thicker occiput
        - np.float32(3.0) * temporal
    )
    below_outer = depth - scalp_t  # mm below the outer table
    bone = head & (below_outer >= 0) & (below_outer < skull_t)
    rel = below_outer / np.maximum(skull_t, np.float32(1.0))
    diploe = bone & (rel > 0.3) & (rel < 0.7) & (skull_t > 4.5)
    sub_hu[bone] = _BONE_CORTEX
    sub_hu[diploe] = _BONE_DIPLOE
    inner = below_outer - skull_t  # mm below the inner table (cranial cavity depth)

    # Cranial floor: the cavity ends at the floor; the skull base lies below it, with the
    # orbits, the ethmoid, sphenoid and mastoid air cells.
    fz = _floor_z(g, h)
    above_floor = g.z - fz  # mm
    s = h.scale
    cavity = head & (inner > 0) & (above_floor > 0)
    base = head & (inner > 0) & (above_floor <= 0)
    texture = _lowpass_noise(rng, g, 6.0, step_mm=2.0)
    base_hu = np.float32(850.0) + np.float32(350.0) * texture
    base_hu = np.where(above_floor > -2.5, np.float32(_BONE_CORTEX), base_hu)
    plate = np.float32(11.0) + np.float32(3.0) * texture
    base_hu = np.where(above_floor < -plate, np.float32(_MUSCLE), base_hu)
    sub_hu[base] = base_hu[base]
    for side in (-1.0, 1.0):
        # petrous ridges: bone wedges between the middle and posterior fossae
        ridge = _ellipsoid(g, (side * 30 * s, 12 * s, -41 * s), (26, 5, 11), side * 41.0)
        sub_hu[head & (inner > 0) & (ridge < 1)] = _BONE_CORTEX
        mastoid = _ellipsoid(g, (side * 52 * s, 26 * s, -44 * s), (9, 11, 9)) < 1
        sub_hu[base & mastoid & (texture > -0.2)] = _AIR
        orbit = _ellipsoid(g, (side * 30 * s, -60 * s, -33 * s), (15, 22, 13)) < 1
        globe = _ellipsoid(g, (side * 31 * s, -69 * s, -34 * s), (11.5, 11.5, 11)) < 1
        sub_hu[head & orbit & (depth > 3) & (above_floor < 0)] = _FAT
        sub_hu[head & globe & (depth > 2.5)] = 12.0
    ethmoid = _ellipsoid(g, (0.0, -52 * s, -32 * s), (10, 20, 11)) < 1
    sphenoid = _ellipsoid(g, (0.0, -26 * s, -43 * s), (13, 10, 8)) < 1
    sub_hu[base & (ethmoid | sphenoid) & (texture > -0.6) & (above_floor < -2.5)] = _AIR
    cavity &= sub_hu < 200  # anything claimed by bone stays bone

    # ----- Brain -----------------------------------------------------------------------------
    sdh_t = np.zeros_like(inner)
    sdh = np.zeros(g.shape, dtype=bool)
    if spec.haemorrhage and spec.kind == "sdh":
        side = 1.0 if rng.random() < 0.5 else -1.0
        sdh_t, sdh = _subdural(g, h, rng, inner, cavity, side, spec.bleed_volume_ml, ps * ps * st)
    # Depth below the brain surface: a thin subarachnoid CSF layer under the inner table, and the
    # brain pushed in by a subdural collection where there is one.
    effaced = _smoothstep(0.0, 2.0, sdh_t)  # sulci and CSF squeezed out under a subdural
    csf_layer = (np.float32(1.2) + np.float32(0.6) * _smoothstep(20.0, 60.0, g.z)) * (1 - effaced)
    bd_convex = inner - sdh_t - csf_layer  # mm below the brain surface (convexity)
    bd = np.minimum(bd_convex, above_floor - np.float32(1.0))  # ... or above the floor
    brain = cavity & (bd > 0)
    sub_hu[cavity] = _CSF

    # Cortex and sulci: sulci are the zero sheets of a smooth random field (about 14 mm
    # apart) near the surface; grey matter lines the surface and the sulci, white matter lies
    # beneath.
    sulcal_depth = np.float32(15.0) + np.float32(4.0) * _lowpass_noise(rng, g, 50.0, step_mm=10.0)
    shell = brain & (bd_convex < sulcal_depth + 3) & (above_floor > 4)
    sd = np.full(g.shape, np.inf, dtype=np.float32)  # mm to the nearest sulcus sheet
    sd[shell] = _radial_sheet_distance(rng, g, shell, 20.0 * s, centre=(0.0, 5.0 * s, 0.0))
    # wider over the vertex and from sulcus to sulcus, like a normal adult brain
    width_var = np.clip(1 + np.float32(0.5) * _lowpass_noise(rng, g, 30.0, step_mm=6.0), 0.3, 2.0)
    half_w = np.float32(h.sulcal_width) * (1 + np.float32(0.8) * _smoothstep(15.0, 60.0, g.z))
    half_w = half_w * width_var * (1 - effaced)
    sulcus = shell & (sd < half_w) & (bd_convex < sulcal_depth)
    grey = brain & ((bd < 2.6) | (shell & (sd < half_w + np.float32(2.6))))
    tone = np.float32(1.2) * _lowpass_noise(rng, g, 35.0, step_mm=8.0)
    grey_hu = np.float32(_GREY) + tone
    white_hu = np.float32(_WHITE) + tone - np.float32(1.5) * _smoothstep(20.0, 45.0, g.z)
    sub_hu[brain] = np.broadcast_to(white_hu, g.shape)[brain]
    sub_hu[grey] = np.broadcast_to(grey_hu, g.shape)[grey]
    sub_hu[sulcus] = _CSF

    # Deep structures in a central box.
    inner_box = _box(g, (-60 * s, -70 * s, -60 * s), (60 * s, 70 * s, 45 * s))
    gi = g.sub(*inner_box)
    v_hu = sub_hu[inner_box]
    in_brain = brain[inner_box]
    tone_i = tone[inner_box]
    _deep_anatomy(gi, h, v_hu, in_brain, tone_i, full_bd=bd[inner_box])

    # Interhemispheric fissure and falx (above the corpus callosum, and front and back).
    mid = np.abs(g.x)
    fissure_low = np.float32(28.0 * s) - np.float32(40.0) * _smoothstep(
        45.0 * s, 70.0 * s, np.abs(g.y)
    )
    fissure = brain & (g.z > fissure_low) & (mid < np.float32(1.6))
    sub_hu[fissure] = _CSF
    falx = cavity & (g.z > fissure_low - 4) & (mid < np.float32(0.55)) & (above_floor > 10)
    sub_hu[falx] = _FALX

    # Haemorrhage.
    if spec.haemorrhage:
        if spec.kind == "iph":
            deep = brain & (bd_convex > 5.0)  # parenchymal: keep off the cortical surface
            blood, rim = _intraparenchymal(g, h, rng, deep, spec.bleed_volume_ml, ps * ps * st)
        else:
            blood, rim = sdh, np.zeros_like(sdh)
            # oedema is not typical for SDH: leave the cortex alone
        blood_hu = np.float32(_BLOOD) + np.float32(3.0) * _lowpass_noise(rng, g, 10.0, step_mm=3.0)
        sub_hu[rim] = _OEDEMA
        sub_hu[blood] = blood_hu[blood]
        bleed[box] = blood
        oedema[box] = rim

    hu[box] = sub_hu

    # Scanner: point-spread function and correlated noise (same filter for both).
    kernel = _gauss_kernel(0.75)
    white_std = spec.noise_hu / float(np.sum(kernel.astype(np.float64) ** 2))
    if spec.noise_hu > 0:
        hu += np.float32(white_std) * rng.standard_normal(hu.shape, dtype=np.float32)
    hu = _blur_inplane(hu, kernel)
    out = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16)
    origin = (float(x[0]), float(y[0]), float(z[0]))
    return HeadPhantom(
        hu=out,
        spacing_mm=(float(st), float(ps), float(ps)),
        origin_mm=origin,
        bleed_mask=bleed,
        oedema_mask=oedema,
        spec=spec,
    )


def _deep_anatomy(
    g: _Grid,
    h: _Head,
    v: np.ndarray,
    brain: np.ndarray,
    tone: np.ndarray,
    full_bd: np.ndarray,
) -> None:
    """Paint deep grey nuclei, ventricles, cisterns, brainstem and cerebellum into ``v``.

    Args:
        g: Coordinates of the sub-box.
        h: Head parameters.
        v: float32 HU sub-volume, modified in place.
        brain: bool mask of brain tissue in the sub-box.
        tone: float32 smooth intensity variation (HU) in the sub-box.
        full_bd: float32 depth below the brain surface (mm) in the sub-box.
    """
    s = h.scale
    vs = h.ventricle

    def ell(c: Sequence[float], a: Sequence[float], ang: float = 0.0) -> np.ndarray:
        return _ellipsoid(g, [ci * s for ci in c], [ai * s for ai in a], ang)

    # Posterior fossa: below the tentorium, behind the clivus.
    tentorium = (
        np.float32(-10.0 * s)
        - np.float32(0.25) * (g.y - np.float32(20 * s))
        - np.float32(0.15) * np.abs(g.x)
    )
    behind_petrous = g.y > (np.float32(0.875) * np.abs(g.x) - np.float32(10.0)) * np.float32(s)
    post = brain & behind_petrous & (g.y > np.float32(8 * s)) & (g.z < tentorium)
    radial = np.sqrt(g.x**2 + (g.y - np.float32(30 * s)) ** 2 + (g.z + np.float32(30 * s)) ** 2)
    folia = np.float32(2.0) * np.sin(radial * np.float32(2 * math.pi / 4.0))
    cereb = np.float32(_CEREBELLUM) + folia + tone
    v[post] = cereb[post]
    # tentorial edge / vermis CSF cleft and cisterna magna
    v[post & (ell((0, 62, -40), (7, 12, 10)) < 1)] = _CSF
    v[post & (np.abs(g.x) < 1.2) & (g.y > np.float32(55 * s))] = _CSF

    # Brainstem (midbrain above, pons below) with the cisterns around it.
    pons = ell((0, 14, -36), (14, 12, 14))
    midbrain = ell((0, 10, -18), (12, 11, 9))
    stem = (pons < 1) | (midbrain < 1)
    prepontine = (ell((0, 12, -36), (17, 15, 16)) < 1) & ~stem & (g.y < np.float32(18 * s))
    ambient = (ell((0, 10, -18), (15, 14, 9.5)) < 1) & ~stem
    v[brain & stem] = _BRAINSTEM + tone[brain & stem]
    v[brain & (prepontine | ambient)] = _CSF
    v[brain & (ell((0, 12, -18), (2.2, 3.0, 4)) < 1)] = _CSF  # aqueduct region
    v[brain & (ell((0, 30, -37), (6, 3.5, 6)) < 1)] = _CSF  # fourth ventricle
    # suprasellar cistern (star shaped) and quadrigeminal cistern
    star = (ell((0, -6, -24), (13, 8, 4.5)) < 1) | (ell((0, -8, -24), (6, 12, 4.5)) < 1)
    v[brain & star] = _CSF
    v[brain & (ell((0, 26, -13), (7, 6, 6)) < 1)] = _CSF

    # Sylvian fissures: thin CSF clefts from the lateral surface towards the insula.
    for side in (-1.0, 1.0):
        syl = ell((side * 46, -8, -6), (13, 1.8, 12), side * 32.0) < 1
        v[brain & syl & (full_bd < 25)] = _CSF
        # insular cortex
        ins = (ell((side * 36, -2, -2), (4, 20, 14)) < 1) & ~syl
        v[brain & ins] = _GREY + tone[brain & ins]

    # Deep grey nuclei.
    for side in (-1.0, 1.0):
        for m, val in (
            (ell((side * 22, -4, -1), (7, 17, 11), side * 12.0), _DEEP_GREY),  # lentiform
            (ell((side * 10, 10, -2), (9, 13, 9)), _THALAMUS),  # thalamus
            (ell((side * 13, -18, 9), (6, 9, 9)), _DEEP_GREY),  # caudate head
        ):
            sel = brain & (m < 1)
            v[sel] = val + tone[sel]

    # Ventricles: frontal horns (butterfly, cut by the caudate heads), bodies, trigones,
    # occipital and temporal horns; third ventricle.
    parts: list[np.ndarray] = []
    for side in (-1.0, 1.0):
        parts += [
            ell((side * 7.0, -19, 13), (4.5 * vs, 12, 7 * vs), side * -18.0),  # frontal horn
            ell((side * 9.5, 4, 19), (5.0 * vs, 20, 5.5 * vs), side * 8.0),  # body
            ell((side * 19, 29, 11), (6.5 * vs, 9, 8 * vs), side * 25.0),  # trigone
            ell((side * 21, 42, 7), (3.5 * vs, 9, 4 * vs), side * 10.0),  # occipital horn
            ell((side * 30, 6, -14), (3.0 * vs, 15, 3.5), side * 20.0),  # temporal horn
        ]
    lat = np.min(np.stack(parts), axis=0) < 1
    caudate = (ell((-13, -18, 9), (6, 9, 9)) < 1) | (ell((13, -18, 9), (6, 9, 9)) < 1)
    septum = np.abs(g.x) < np.float32(1.0)
    vent = brain & lat & ~caudate & ~septum
    vent |= brain & (ell((0, 2, -2), (2.2 * vs, 13, 10)) < 1)  # third ventricle
    v[vent] = _CSF


def _scaled_blob(
    g: _Grid,
    centre: np.ndarray,
    offsets: np.ndarray,
    radii: np.ndarray,
    rough: np.ndarray,
    k: float,
) -> np.ndarray:
    """Signed-distance-like field (mm, <0 inside) of a union of spheroids scaled by ``k``."""
    best: np.ndarray | None = None
    for off, rad in zip(offsets, radii, strict=True):
        c = centre + k * off
        e = _ellipsoid(g, c, k * rad)
        dist = (e - 1) * np.float32(k * float(np.mean(rad)))
        best = dist if best is None else np.minimum(best, dist)
    assert best is not None
    return best + rough


def _intraparenchymal(
    g: _Grid,
    h: _Head,
    rng: np.random.Generator,
    brain: np.ndarray,
    volume_ml: float,
    voxel_mm3: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Blood and oedema masks of a lobulated intraparenchymal haemorrhage.

    Returns:
        (blood, oedema) bool arrays of ``g.shape``.
    """
    s = h.scale
    side = 1.0 if rng.random() < 0.5 else -1.0
    sites = (
        (side * 24, -2, 3),  # putamen / external capsule (hypertensive)
        (side * 26, -30, 18),  # frontal lobar (deep white matter)
        (side * 27, 16, 26),  # parietal lobar (deep white matter)
        (side * 30, 40, 2),  # temporo-occipital lobar
    )
    centre = np.array(sites[int(rng.integers(len(sites)))], dtype=np.float64) * s
    n_lobes = int(rng.integers(3, 6))
    offsets = rng.normal(0.0, 5.0, size=(n_lobes, 3))
    offsets[0] = 0.0
    radii = rng.uniform(7.0, 13.0, size=(n_lobes, 3))
    radii[:, 2] *= 0.9
    reach = 60.0
    box = _box(g, list(centre - reach), list(centre + reach))
    gb = g.sub(*box)
    rough = np.float32(1.6) * _lowpass_noise(rng, gb, 9.0, step_mm=2.5)
    inside = brain[box]
    k = 1.0
    blood_b = np.zeros(gb.shape, dtype=bool)
    for _ in range(4):
        dist = _scaled_blob(gb, centre, offsets, radii, rough, k)
        blood_b = inside & (dist < 0)
        vol = float(np.count_nonzero(blood_b)) * voxel_mm3 / 1000.0
        if vol <= 0:
            k *= 1.5
            continue
        ratio = volume_ml / vol
        if abs(ratio - 1) < 0.02:
            break
        k *= ratio ** (1 / 3)
    rim_b = inside & ~blood_b & (dist < np.float32(3.0))
    blood = np.zeros(g.shape, dtype=bool)
    rim = np.zeros(g.shape, dtype=bool)
    blood[box] = blood_b
    rim[box] = rim_b
    return blood, rim


def _subdural(
    g: _Grid,
    h: _Head,
    rng: np.random.Generator,
    inner: np.ndarray,
    cavity: np.ndarray,
    side: float,
    volume_ml: float,
    voxel_mm3: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Thickness field and mask of a subdural crescent over one fronto-parietal convexity.

    Returns:
        (thickness_mm float32 of ``g.shape``, blood bool of ``g.shape``).
    """
    s = h.scale
    cy = float(rng.uniform(-25.0, 15.0)) * s
    cz = float(rng.uniform(5.0, 20.0)) * s
    spread_y = np.float32(float(rng.uniform(42.0, 50.0)) * s)
    spread_z = np.float32(float(rng.uniform(30.0, 36.0)) * s)
    # distance along the convexity from the centre point (on the lateral surface)
    dist2 = ((g.y - np.float32(cy)) / spread_y) ** 2 + ((g.z - np.float32(cz)) / spread_z) ** 2
    profile = np.clip(1 - dist2, 0.0, None) ** np.float32(0.8)
    profile = profile * (np.sign(g.x) == side) * _smoothstep(8.0, 30.0, np.abs(g.x))
    rough = 1 + np.float32(0.08) * _lowpass_noise(rng, g, 25.0, step_mm=6.0)
    profile = (profile * rough).astype(np.float32)
    tmax = 10.0
    blood = np.zeros(g.shape, dtype=bool)
    thick = np.zeros(g.shape, dtype=np.float32)
    for _ in range(5):
        thick = np.float32(tmax) * profile
        blood = cavity & (inner > 0) & (inner < thick)
        vol = float(np.count_nonzero(blood)) * voxel_mm3 / 1000.0
        ratio = volume_ml / max(vol, 1e-3)
        if abs(ratio - 1) < 0.02:
            break
        tmax *= ratio**0.8
    return thick, blood


def head_ct_phantom(spec: PhantomSpec) -> HeadPhantom:
    """Build a synthetic head CT with its ground truth.

    Args:
        spec: What to build.

    Returns:
        The phantom: int16 HU volume (z, y, x) of shape (slices, rows, columns), spacing,
        origin and bleed/oedema masks.
    """
    return _build(spec)


def head_ct_volume(spec: PhantomSpec) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Build a synthetic head CT volume.

    Args:
        spec: What to build.

    Returns:
        (hu, spacing): int16 HU array (z, y, x) of shape (slices, rows, columns) with z
        increasing towards the vertex, values in [-1024, 3071]; spacing (z, y, x) in mm.
    """
    p = _build(spec)
    return p.hu, p.spacing_mm


# ---------------------------------------------------------------------------------------------
# DICOM.


def _uid(*parts: object) -> UID:
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=["triage-phantom", *map(str, parts)])


def phantom_uids(
    spec: PhantomSpec, *, StudyInstanceUID: str | None = None
) -> tuple[str, str, list[str]]:
    """The (deterministic) UIDs of a phantom series.

    Args:
        spec: The phantom spec; every field enters the UIDs, so different specs never collide.
        StudyInstanceUID: Use this study UID; the series and instance UIDs are then derived from
            it, so they differ between studies.

    Returns:
        (StudyInstanceUID, SeriesInstanceUID, one SOPInstanceUID per slice in slice order).
    """
    key = repr(spec)
    study = StudyInstanceUID or str(_uid(key, "study"))
    series = str(_uid(key, study, "series"))
    sops = [str(_uid(key, study, series, "sop", i)) for i in range(spec.slices)]
    return study, series, sops


def _patient_id(spec: PhantomSpec) -> str:
    return f"PHANTOM-{spec.seed:04d}"


def _default_accession(spec: PhantomSpec, study_uid: str) -> str:
    digest = hashlib.sha256(study_uid.encode()).hexdigest()[:8].upper()
    return f"PH{digest}"


def write_head_ct_series(
    out_dir: Path,
    spec: PhantomSpec,
    *,
    StudyInstanceUID: str | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    accession: str | None = None,
    study_datetime: datetime | None = None,
) -> list[Path]:
    """Write a phantom as an axial CT series, one DICOM Part 10 file per slice.

    Files are CT Image Storage, Explicit VR Little Endian, named ``CT0001.dcm``... in slice
    order (inferior to superior). Stored values are HU + 1024 as uint16 (12 bits stored) with
    RescaleIntercept -1024 and RescaleSlope 1, like a scanner.

    Args:
        out_dir: Folder to write into (created if missing).
        spec: What to build.
        StudyInstanceUID: Put the series in this study; default: a UID derived from ``spec``,
            so repeated runs write identical files.
        patient_name: PatientName; default ``PHANTOM^NORMAL``, ``PHANTOM^IPH`` or
            ``PHANTOM^SDH``.
        patient_id: PatientID; default ``PHANTOM-<seed>``.
        accession: AccessionNumber; default derived from the study UID.
        study_datetime: StudyDate/StudyTime; default now.

    Returns:
        The written paths, in slice order.
    """
    phantom = _build(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, sop_uids = phantom_uids(spec, StudyInstanceUID=StudyInstanceUID)
    when = study_datetime or datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    name = patient_name or f"PHANTOM^{spec.label.upper()}"
    pid = patient_id or _patient_id(spec)
    acc = accession if accession is not None else _default_accession(spec, study_uid)
    frame_uid = str(_uid(repr(spec), study_uid, series_uid, "frame"))
    st, ps, _ = phantom.spacing_mm
    ox, oy, oz = phantom.origin_mm
    stored = (phantom.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)
    description = {
        "normal": "Synthetic head CT, normal",
        "iph": "Synthetic head CT, intraparenchymal haemorrhage",
        "sdh": "Synthetic head CT, subdural haemorrhage",
    }[spec.label]

    paths: list[Path] = []
    for i, sop_uid in enumerate(sop_uids):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(_UID_ROOT + "1")
        meta.ImplementationVersionName = "TRIAGE_PHANTOM"
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
        ds.AccessionNumber = acc
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = "synthetic head phantom"
        ds.InstitutionName = "triage demo"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.SeriesDescription = description
        ds.PatientName = name
        ds.PatientID = pid
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientIdentityRemoved = "YES"
        ds.BodyPartExamined = "HEAD"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = f"{st:g}"
        ds.SpacingBetweenSlices = f"{st:g}"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 300
        ds.ConvolutionKernel = "STANDARD"
        ds.ReconstructionDiameter = f"{ps * spec.columns:.1f}"
        ds.GantryDetectorTilt = "0"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z_mm = oz + i * st
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{z_mm:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z_mm:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [f"{ps:g}", f"{ps:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[i]).astype("<u2").tobytes()
        path = out_dir / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
