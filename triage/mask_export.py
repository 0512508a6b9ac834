"""An analysis's label overlays written as mask files, for tools outside the product (scoring
the haemorrhage model against expert masks): ``triage predict --masks``.

For each finding whose model left a ``labels`` overlay with its grid geometry, one mask and a
JSON sidecar go into ``<out_dir>/<study key>/``:

* ``<model>__<finding>.nii.gz`` (format ``nifti``): a uint8 NIfTI label map, the overlay's
  class indices (0 background, 1..N the model's classes in output-index order: IPH, EAH,
  oedema, IVH for BLAST-CT), written by SimpleITK (LPS in memory, RAS in the file header, as
  every ITK-based tool expects). Grid ``model``: the model's own 1 mm grid, the overlay as it
  is (no resampling). Grid ``source``: the label map on the source CT series' own voxels,
  by the mapping the DICOM Segmentation and the viewer use
  (:func:`~triage.dicomout.geometry.labels_on_source`, nearest neighbour), stacked in slice
  order along the normal: the grid an ITK reader gives the source series (origin at the
  first slice's ImagePositionPatient, direction from ImageOrientationPatient and the slice
  normal), so it compares voxel for voxel with a mask drawn on the original images. A series
  whose slices do not form such a grid (gantry tilt, a missing slice, uneven spacing) gets
  no source-grid mask, with the reason.
* ``<model>__<finding>.dcm`` (format ``seg``): the DICOM Segmentation the product makes
  (:func:`~triage.dicomout.seg.make_segmentation`, the same series number); none when no class
  has a pixel on the source images (the sidecar says so).
* ``<model>__<finding>.json``: the model (name, version, weights sha256), the finding, the
  classes, the grid (size, LPS origin, spacing, direction), voxel counts and volumes per
  class in the mask written, the finding's reported volumes, the study and source series
  UIDs; no patient names, IDs or dates.

The study key is the StudyInstanceUID (``triage predict`` prints it) when it is a well-formed
UID, else a sha256 prefix of it, so no header text can steer a path. Files are written to a
temporary name and renamed into place, so a reader never sees half a file. A finding whose
mask cannot be made is reported with the reason (no patient data); the others are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

import triage
from triage.dicomout.geometry import SourceLabels, labels_on_source
from triage.dicomout.patient import complete_type2
from triage.dicomout.terminology import NOT_FOR_DIAGNOSTIC_USE
from triage.domain import Finding
from triage.preprocess.ct_geometry import MAX_TILT_DEG, sort_along_normal, stack_geometry
from triage.preprocess.ct_headers import read_headers
from triage.preprocess.errors import PreprocessError
from triage.results import Overlay

__all__ = [
    "MASK_FORMATS",
    "MASK_GRIDS",
    "MaskExportError",
    "MaskFile",
    "MaskFormat",
    "MaskGrid",
    "SourceGrid",
    "export_study_masks",
    "mask_name",
    "model_grid_image",
    "prepare_out_dir",
    "source_grid",
    "source_grid_image",
    "study_key",
]

log = logging.getLogger(__name__)

MaskFormat = Literal["nifti", "seg"]
MaskGrid = Literal["model", "source"]
MASK_FORMATS: tuple[MaskFormat, ...] = ("nifti", "seg")
MASK_GRIDS: tuple[MaskGrid, ...] = ("model", "source")

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SUFFIX: dict[MaskFormat, str] = {"nifti": ".nii.gz", "seg": ".dcm"}
# Largest distance (a fraction of the slice spacing) of a source slice from its place on
# the regular grid for the slices to count as one grid.
_UNEVEN_TOLERANCE = 0.05
# highdicom warns about a person name of one component with the name in the message (patient
# data in the log): kept out, as dicomout.results does.
_PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"
# Errors whose messages are written for users (no patient data): kept as the reason.
_EXPECTED_ERRORS = (PreprocessError, InvalidDicomError, ValueError, OSError)


class MaskExportError(ValueError):
    """The output folder cannot take the masks (the message names the folder and why)."""


@dataclass(frozen=True)
class MaskFile:
    """What became of one finding's mask.

    Attributes:
        model: the model's name.
        finding: the finding code.
        format: ``nifti`` or ``seg``.
        grid: ``model`` or ``source`` (a Segmentation is always on the source images).
        path: the mask file; None when none was written (an error, or a Segmentation with no
            pixel to hold).
        sidecar: its JSON sidecar; None when nothing was written.
        volumes_ml: volume per class in the mask written, ml (voxel count x voxel volume).
        error: why no mask was written (no patient data); None otherwise.
    """

    model: str
    finding: str
    format: MaskFormat
    grid: MaskGrid
    path: Path | None = None
    sidecar: Path | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "finding": self.finding,
            "format": self.format,
            "grid": self.grid,
            "path": str(self.path) if self.path else None,
            "sidecar": str(self.sidecar) if self.sidecar else None,
            "volumes_ml": dict(self.volumes_ml),
            "error": self.error,
        }


@dataclass(frozen=True)
class SourceGrid:
    """The source series' slices as a grid (what an ITK reader makes of the series).

    Attributes:
        order: indices into the mapped slices, sorted along the slice normal.
        size: (columns, rows, slices).
        origin: LPS mm, (x, y, z), of the centre of the first pixel of the first sorted slice.
        spacing: (between columns, between rows, between slices along the normal), mm.
        direction: 3 x 3 row-major; columns: the row direction, the column direction, the
            slice normal (LPS).
        voxel_ml: volume of one voxel in ml (a tilted stack's voxels have the area times the
            distance between slice planes).
        problem: why the slices are not one regular, unsheared grid (gantry tilt, a missing
            slice, uneven spacing); None when they are.
    """

    order: tuple[int, ...]
    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    voxel_ml: float
    problem: str | None


def study_key(study_uid: str) -> str:
    """The study's folder name: the StudyInstanceUID when it is a well-formed UID (digits and
    dots, at most 64 characters), else the first 24 hex digits of its sha256."""
    if len(study_uid) <= 64 and _UID.fullmatch(study_uid):
        return study_uid
    return hashlib.sha256(study_uid.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _safe(name: str) -> str:
    if _SAFE_NAME.fullmatch(name):
        return name
    return "x" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def mask_name(model: str, finding: str) -> str:
    """The files' base name, ``<model>__<finding>`` (names that are not plain file names are
    replaced by a hash)."""
    return f"{_safe(model)}__{_safe(finding)}"


def prepare_out_dir(out_dir: Path) -> None:
    """Creates the output folder (and its parents) and checks that files can be made in it.

    Raises:
        MaskExportError: the path is a file, cannot be created or is not writable.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise MaskExportError(f"--masks {out_dir}: not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe-"):
            pass
    except OSError as exc:
        raise MaskExportError(
            f"--masks {out_dir}: cannot write there ({exc.strerror or type(exc).__name__})"
        ) from None


def model_grid_image(overlay: Overlay) -> sitk.Image:
    """The overlay's label map on the model's own grid, as it is.

    Args:
        overlay: a ``labels`` overlay with its grid geometry: uint8 (z, y, x), 0 background,
            1..N ``overlay.classes``; LPS ``grid_origin``, ``grid_spacing`` (x, y, z) in mm and
            ``grid_direction``.

    Returns:
        A uint8 image of size (x, y, z) with the overlay's origin, spacing and direction.

    Raises:
        ValueError: not a labels overlay, no grid geometry, or not uint8 (z, y, x).
    """
    _check_labels(overlay)
    assert overlay.grid_origin and overlay.grid_spacing and overlay.grid_direction
    image = sitk.GetImageFromArray(np.ascontiguousarray(overlay.data, dtype=np.uint8))
    image.SetOrigin(tuple(float(v) for v in overlay.grid_origin))
    image.SetSpacing(tuple(float(v) for v in overlay.grid_spacing))
    image.SetDirection(tuple(float(v) for v in overlay.grid_direction))
    return image


def _check_labels(overlay: Overlay) -> None:
    if overlay.kind != "labels":
        raise ValueError(f"only a labels overlay is a mask, not a {overlay.kind}")
    if not overlay.has_geometry:
        raise ValueError("the overlay has no grid geometry (written before it was kept)")
    if overlay.data.ndim != 3 or overlay.data.dtype != np.uint8:
        raise ValueError(
            f"overlay data must be uint8 (z, y, x), got {overlay.data.dtype} {overlay.data.shape}"
        )


def source_grid(labels: SourceLabels) -> SourceGrid:
    """The mapped source slices sorted along their normal and described as a grid.

    Args:
        labels: a label map on the source images (:func:`labels_on_source`).

    Raises:
        PreprocessError: the slices differ in size, orientation or spacing, share a position
            or do not lie on a line.
    """
    frames = list(labels.slices)
    row, col, normal = sort_along_normal(list(frames))  # checks; the copy is sorted
    order = sorted(range(len(frames)), key=lambda i: float(frames[i].position @ normal))
    positions = np.array([frames[i].position for i in order], dtype=np.float64)
    first = frames[order[0]]
    stack = stack_geometry(
        positions,
        normal,
        thickness=first.thickness,
        max_tilt_deg=MAX_TILT_DEG,
        min_coverage_mm=None,
    )
    problem = None
    if stack.tilt_deg > 0:
        problem = (
            f"the source slices are stacked with a gantry tilt of {stack.tilt_deg:.1f} degrees"
            " (a sheared grid)"
        )
    elif stack.n_out != len(frames):
        problem = f"the source series misses {stack.n_out - len(frames)} slice(s)"
    else:
        uneven = float(np.max(np.abs(stack.t - np.arange(len(frames)) * stack.spacing)))
        if uneven > _UNEVEN_TOLERANCE * stack.spacing:
            problem = f"the source slices are unevenly spaced (off the grid by {uneven:.2f} mm)"
    row_spacing, col_spacing = first.pixel_spacing
    between_planes = stack.spacing * float(np.clip(stack.u @ normal, -1.0, 1.0))
    return SourceGrid(
        order=tuple(order),
        size=(first.columns, first.rows, len(frames)),
        origin=(float(positions[0][0]), float(positions[0][1]), float(positions[0][2])),
        spacing=(float(col_spacing), float(row_spacing), float(stack.spacing)),
        direction=tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()),
        voxel_ml=float(row_spacing * col_spacing * between_planes) / 1000.0,
        problem=problem,
    )


def source_grid_image(overlay: Overlay, sources: Sequence[pydicom.Dataset]) -> sitk.Image:
    """The overlay's label map on the source series' voxels (nearest neighbour).

    Args:
        overlay: a ``labels`` overlay with its grid geometry (see :func:`model_grid_image`).
        sources: the series' CT image objects (headers are enough, e.g.
            :func:`~triage.preprocess.ct_headers.read_headers`), in any order.

    Returns:
        A uint8 image of size (columns, rows, slices): slice k is the k-th source slice along
        the normal, each pixel the label of the model voxel nearest to its centre; origin,
        spacing and direction as :class:`SourceGrid`.

    Raises:
        ValueError: the overlay is unusable (see :func:`labels_on_source`), or the slices do
            not form one regular, unsheared grid (:attr:`SourceGrid.problem`).
        PreprocessError: a source's geometry attributes are missing or malformed.
    """
    _check_labels(overlay)
    on_source = labels_on_source(overlay, sources)
    grid = source_grid(on_source)
    if grid.problem:
        raise ValueError(
            f"{grid.problem}: no regular grid to write the mask on; the model grid "
            "(--mask-grid model) or a DICOM Segmentation (--mask-format seg) holds it"
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(on_source.labels[list(grid.order)]))
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    return image


def _replace_into(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary file beside ``path`` (same suffix), then rename it over
    ``path``; the temporary file goes on failure."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{uuid.uuid4().hex}.part{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def _classes(overlay: Overlay) -> dict[str, str]:
    return {"0": "background", **{str(i): c for i, c in enumerate(overlay.classes, start=1)}}


def _counts(labels: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=len(classes) + 1)
    return {name: int(counts[i]) for i, name in enumerate(classes, start=1)}


def _image_grid(image: sitk.Image, kind: MaskGrid) -> dict[str, Any]:
    return {
        "kind": kind,
        "coordinates": "LPS mm (DICOM, ITK); the NIfTI header holds the same grid in RAS",
        "size": list(image.GetSize()),
        "origin": list(image.GetOrigin()),
        "spacing": list(image.GetSpacing()),
        "direction": list(image.GetDirection()),
    }


def _sidecar(
    *,
    study_uid: str,
    finding: Finding,
    overlay: Overlay,
    mask: Path | None,
    fmt: MaskFormat,
    grid: dict[str, Any],
    counts: dict[str, int],
    voxel_ml: float,
) -> dict[str, Any]:
    return {
        "mask": mask.name if mask else None,
        "format": "nifti" if fmt == "nifti" else "dicom-seg",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": overlay.SeriesInstanceUID,
        "model": finding.model.to_json(),
        "finding": finding.finding,
        "flag": finding.flag,
        "score": finding.score,
        "classes": _classes(overlay),
        "grid": grid,
        "voxel_ml": voxel_ml,
        "voxel_counts": counts,
        "volumes_ml": {k: round(v * voxel_ml, 6) for k, v in counts.items()},
        "finding_volumes_ml": dict(finding.volumes_ml),
        "software": f"triage {triage.__version__}",
        "note": f"AI output, {NOT_FOR_DIAGNOSTIC_USE}",
    }


def _write_nifti(
    folder: Path,
    base: str,
    *,
    study_uid: str,
    finding: Finding,
    overlay: Overlay,
    grid: MaskGrid,
    source_paths: Sequence[Path],
) -> tuple[Path | None, dict[str, Any]]:
    if grid == "model":
        image = model_grid_image(overlay)
    else:
        image = source_grid_image(overlay, read_headers(source_paths))
    path = folder / f"{base}.nii.gz"
    _replace_into(path, lambda p: sitk.WriteImage(image, str(p), True))
    counts = _counts(sitk.GetArrayViewFromImage(image), overlay.classes)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    doc = _sidecar(
        study_uid=study_uid,
        finding=finding,
        overlay=overlay,
        mask=path,
        fmt="nifti",
        grid=_image_grid(image, grid),
        counts=counts,
        voxel_ml=voxel_ml,
    )
    return path, doc


def _write_seg(
    folder: Path,
    base: str,
    *,
    study_uid: str,
    finding: Finding,
    overlay: Overlay,
    source_paths: Sequence[Path],
) -> tuple[Path | None, dict[str, Any]]:
    from triage.dicomout.results import SEG_SERIES_NUMBER  # the product's series number
    from triage.dicomout.seg import make_segmentation

    _check_labels(overlay)
    sources = read_headers(source_paths)  # this call's own objects: completed in place
    for ds in sources:
        complete_type2(ds)
    on_source = labels_on_source(overlay, sources)
    counts = on_source.voxel_counts()
    grid = source_grid(on_source)
    path: Path | None = None
    if any(counts.values()):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)
            seg = make_segmentation(on_source, finding.model, series_number=SEG_SERIES_NUMBER)
        buf = io.BytesIO()
        seg.save_as(buf, enforce_file_format=True)
        path = folder / f"{base}.dcm"
        _replace_into(path, _write_bytes(buf.getvalue()))
    grid_doc: dict[str, Any] = {
        "kind": "source",
        "coordinates": "LPS mm (DICOM)",
        "size": list(grid.size),
        "origin": list(grid.origin),
        "spacing": list(grid.spacing),
        "direction": list(grid.direction),
        "irregular": grid.problem,
    }
    doc = _sidecar(
        study_uid=study_uid,
        finding=finding,
        overlay=overlay,
        mask=path,
        fmt="seg",
        grid=grid_doc,
        counts=counts,
        voxel_ml=grid.voxel_ml,
    )
    return path, doc


def export_study_masks(
    out_dir: Path,
    *,
    study_uid: str,
    findings: Sequence[Finding],
    overlays: Mapping[str, Overlay],
    series_paths: Mapping[str, Sequence[Path]],
    mask_format: MaskFormat = "nifti",
    grid: MaskGrid = "model",
) -> list[MaskFile]:
    """Writes the masks of one analysed study (see the module doc for the files).

    Args:
        out_dir: the output folder (see :func:`prepare_out_dir`); the study's files go into
            ``out_dir / study_key(study_uid)``.
        study_uid: the study.
        findings: the analysis's findings; those with a ``labels`` overlay get a mask.
        overlays: finding code -> overlay, as the analysis left them.
        series_paths: SeriesInstanceUID -> the series' files (the source images of a
            ``source`` grid or a Segmentation).
        mask_format: ``nifti`` or ``seg``.
        grid: ``model`` or ``source`` for NIfTI; a Segmentation is always on the source
            images (``grid`` is then ignored).

    Returns:
        One entry per finding with a label overlay: its files, or why none were written.
        Never raises for one finding's failure.
    """
    if mask_format not in MASK_FORMATS or grid not in MASK_GRIDS:
        raise ValueError(f"unknown mask format or grid: {mask_format!r}, {grid!r}")
    grid = "source" if mask_format == "seg" else grid
    folder = out_dir / study_key(study_uid)
    made: list[MaskFile] = []
    for finding in findings:
        overlay = overlays.get(finding.finding)
        if overlay is None or overlay.kind != "labels":
            continue
        name = finding.model.name
        base = mask_name(name, finding.finding)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            paths = series_paths.get(overlay.SeriesInstanceUID, ())
            if grid == "source" and not paths:
                raise ValueError("the files of the series the model read are not among the input")
            if mask_format == "nifti":
                path, doc = _write_nifti(
                    folder,
                    base,
                    study_uid=study_uid,
                    finding=finding,
                    overlay=overlay,
                    grid=grid,
                    source_paths=paths,
                )
            else:
                path, doc = _write_seg(
                    folder,
                    base,
                    study_uid=study_uid,
                    finding=finding,
                    overlay=overlay,
                    source_paths=paths,
                )
            sidecar = folder / f"{base}.json"
            text = json.dumps(doc, indent=2) + "\n"
            _replace_into(sidecar, _write_bytes(text.encode("utf-8")))
        except _EXPECTED_ERRORS as exc:
            log.warning(
                "mask of %s (%s) not written: %s", name, finding.finding, type(exc).__name__
            )
            reason = str(exc)[:1000] or type(exc).__name__
            made.append(MaskFile(name, finding.finding, mask_format, grid, error=reason))
            continue
        except Exception as exc:  # one finding's failure leaves the others' masks
            log.exception("mask of %s (%s) failed unexpectedly", name, finding.finding)
            reason = f"internal error ({type(exc).__name__})"
            made.append(MaskFile(name, finding.finding, mask_format, grid, error=reason))
            continue
        for fmt, suffix in _SUFFIX.items():  # an earlier run's mask of this finding
            if fmt != mask_format or path is None:
                with contextlib.suppress(OSError):
                    (folder / f"{base}{suffix}").unlink(missing_ok=True)
        log.info("mask of %s (%s) written (%s, %s grid)", name, finding.finding, mask_format, grid)
        made.append(
            MaskFile(
                name,
                finding.finding,
                mask_format,
                grid,
                path=path,
                sidecar=sidecar,
                volumes_ml=dict(doc["volumes_ml"]),
            )
        )
    return made
