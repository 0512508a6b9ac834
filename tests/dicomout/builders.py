"""Synthetic CT series with a cube "bleed" at a known place, the haemorrhage model's overlay
and finding from a label map (without running the network), and the DICOM validator."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.uid import generate_uid

from tests.preprocess.ct_builders import write_slice
from triage.domain import Finding
from triage.models.haemorrhage import (
    BLAST_CT_V1,
    HaemorrhageFindingModel,
    HaemorrhageModel,
    HaemorrhageResult,
)
from triage.preprocess.ct import HeadCT
from triage.results import Overlay

Layout = Literal["axial", "reversed", "tilted_plane", "tilted_positions", "missing_slice"]

HEAD_CENTRE = np.array([0.0, 0.0, 40.0])
HEAD_RADIUS = 38.0
CUBE_CENTRE = np.array([6.3, -4.7, 38.2])  # off every grid, LPS mm
CUBE_HALF = 5.0  # a 10 mm cube: 1 ml
BRAIN_HU, BLEED_HU, AIR_HU = 30.0, 70.0, -1000.0
TILT_DEG = 18.0


@dataclass(frozen=True)
class Series:
    paths: list[Path]  # in the order the files were written
    slice_spacing_mm: float  # between slice planes, along their normal
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)


def in_cube(points: np.ndarray, grow_mm: float = 0.0) -> np.ndarray:
    """Whether points (..., 3) lie inside the cube grown by ``grow_mm`` (shrunk if < 0)."""
    return np.all(np.abs(points - CUBE_CENTRE) < CUBE_HALF + grow_mm, axis=-1)


def pixel_centres(
    position: np.ndarray,
    orientation: np.ndarray,
    spacing: tuple[float, float],
    rows: int,
    columns: int,
) -> np.ndarray:
    """LPS centres (rows, columns, 3) of a slice's pixels; ``spacing`` is PixelSpacing (between
    rows, between columns)."""
    m = np.arange(rows, dtype=np.float64)[:, None, None]
    n = np.arange(columns, dtype=np.float64)[None, :, None]
    return position + n * spacing[1] * orientation[:3] + m * spacing[0] * orientation[3:]


def write_cube_series(
    directory: Path,
    layout: Layout,
    *,
    size: int = 100,
    pixel_spacing: tuple[float, float] = (0.8, 0.95),
    slice_spacing: float = 1.5,
    n: int = 60,
) -> Series:
    """A spherical "head" (30 HU) holding a 10 mm cube of blood (70 HU) in air.

    Layouts: ``axial``; ``reversed`` (files written top-down with InstanceNumber running the
    other way); ``tilted_plane`` (gantry tilted by ``TILT_DEG`` about x: tilted
    ImageOrientationPatient, the table moving along z); ``tilted_positions`` (axial
    ImageOrientationPatient, ImagePositionPatient shifted along y slice by slice, as some
    scanners encode a tilted gantry); ``missing_slice`` (axial, one slice through the cube
    left out, so the spacing is uneven).
    """
    directory.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    tilt = np.deg2rad(TILT_DEG)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, 1.0, 0.0])
    if layout == "tilted_plane":
        col = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    half_rows, half_columns = ((size - 1) * s / 2 for s in pixel_spacing)
    z0 = HEAD_CENTRE[2] - (n - 1) * slice_spacing / 2
    order = list(range(n))
    if layout == "reversed":
        order = order[::-1]
    skip = set()
    if layout == "missing_slice":  # one slice through the cube
        skip.add(int(round((CUBE_CENTRE[2] - z0) / slice_spacing)))
    paths = []
    for file_index, k in enumerate(order):
        if k in skip:
            continue
        centre = np.array([0.0, 0.0, z0 + k * slice_spacing])
        if layout == "tilted_positions":
            centre[1] += (k - (n - 1) / 2) * slice_spacing * np.tan(tilt)
        position = centre - half_columns * row - half_rows * col
        points = pixel_centres(position, np.concatenate([row, col]), pixel_spacing, size, size)
        head = np.linalg.norm(points - HEAD_CENTRE, axis=-1) < HEAD_RADIUS
        hu = np.where(head, BRAIN_HU, AIR_HU)
        hu[in_cube(points)] = BLEED_HU
        paths.append(
            write_slice(
                directory / f"IM{file_index:04d}.dcm",
                hu,
                position=tuple(position),
                orientation=(*row, *col),
                pixel_spacing=pixel_spacing,
                series_uid=series,
                study_uid=study,
                instance=file_index + 1,
            )
        )
    normal_spacing = slice_spacing * (np.cos(tilt) if layout == "tilted_plane" else 1.0)
    return Series(paths=paths, slice_spacing_mm=normal_spacing, pixel_spacing_mm=pixel_spacing)


def model_output(prepared: HeadCT, labels: np.ndarray, series_uid: str) -> tuple[Overlay, Finding]:
    """The haemorrhage model's overlay and finding for a label map on its grid, through the
    model's own ``interpret`` (probabilities: the labels, one-hot)."""
    classes = BLAST_CT_V1.outputs
    probabilities = np.zeros((len(classes), *labels.shape), dtype=np.float16)
    for i in range(len(classes)):
        probabilities[i] = labels == i
    voxel_ml = float(np.prod(prepared.spacing_mm)) / 1000
    raw = HaemorrhageResult(
        labels=labels.astype(np.uint8),
        probabilities=probabilities,
        volumes_ml={c: float((labels == i).sum()) * voxel_ml for i, c in enumerate(classes) if i},
        max_probability={c: float(np.any(labels == i)) for i, c in enumerate(classes) if i},
        spacing_mm=prepared.spacing_mm,
        members=(1,),
        device="cpu",
        precision="fp32",
        timing_s={"total": 0.0},
    )
    model = HaemorrhageFindingModel(HaemorrhageModel(None, device="cpu"))
    output = model.interpret(prepared, raw, series_uid)
    (finding,) = output.findings
    return output.overlays[finding.finding], finding


@dataclass(frozen=True)
class Validation:
    errors: list[str]
    warnings: list[str]


def dciodvfy_path() -> str | None:
    return shutil.which("dciodvfy")


def dciodvfy(path: Path) -> Validation:
    """Runs dicom3tools' ``dciodvfy`` on a file; its Error and Warning lines."""
    exe = dciodvfy_path()
    assert exe is not None
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return Validation(
        errors=[line for line in lines if re.match(r"^\s*Error", line)],
        warnings=[line for line in lines if re.match(r"^\s*Warning", line)],
    )
