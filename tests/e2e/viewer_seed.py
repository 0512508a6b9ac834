"""Studies for the viewer's page tests and its browser benchmark, stored in a running
``triage serve`` as a site's scanner leaves them and analysed as its worker does, without
running a network.

- The images go in through STOW-RS (``POST /dicomweb/studies``), so the files are the
  server's own, in its data folder.
- The analysis is the server's own ``Worker.run_one`` (assembly, job, findings, overlay
  files, DICOM results, critical-finding events), run in the test's process with a stand-in
  for the analyser that returns what the model would have said: the haemorrhage model's
  finding and label overlay made by its own ``interpret`` from a label map drawn where the
  test put the blood (``tests.dicomout.builders.model_output``), or the chest model's
  findings with Grad-CAM-like heatmaps where the test wants them.
- The server runs with the worker's polling switched off (:data:`SERVER_ENV`), so its own
  worker never picks up a study before the test's stand-in does.

The synthetic head (:func:`write_head_series`): an ellipsoid head with scalp, skull, brain
and two ventricles, an intraparenchymal bleed (an ellipsoid at :data:`BLEED_CENTRE`) and
some blood in the left ventricle; axial slices, written bottom-up with InstanceNumbers
counting from 101 upwards from the feet, so that display order (head first) and
InstanceNumber disagree with the file order and with the index.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.dicomout.builders import model_output
from tests.preprocess.ct_builders import write_slice
from triage.analysis import SeriesFiles, StudyAnalysis
from triage.db import Database
from triage.domain import AIStatus, Finding, ModelRef
from triage.ingest.assembly import complete_quiet_series
from triage.jobs.worker import Worker
from triage.preprocess.ct import prepare_head_ct
from triage.results import Overlay
from triage.serve.launcher import ServerProcess

SERVER_ENV = {
    # Nothing is assembled or analysed by the server itself: the test's Worker does it.
    "TRIAGE_SERIES_QUIET_SECONDS": "3600",
    "TRIAGE_WORKER_POLL_SECONDS": "86400",
}
BOUNDARY = "viewer-seed-boundary"

BLAST = ModelRef("blast-ct-v1", "1.0.0", ("0" * 63 + "1", "0" * 63 + "2"))
XRV = ModelRef("xrv-densenet121-res224-all", "1.0.1", ("0" * 63 + "3",))

# The head, LPS millimetres, centred on the origin.
HEAD_AXES = np.array([72.0, 90.0, 62.0])  # outer surface (scalp), semi-axes x, y, z
SKULL_OUTER, SKULL_INNER = 0.95, 0.89  # of the head's axes
SCALP_HU, BONE_HU, BRAIN_HU, CSF_HU, AIR_HU = 40.0, 1300.0, 32.0, 6.0, -1000.0
BLEED_HU = 68.0
VENTRICLES = (
    (np.array([-11.0, -4.0, 12.0]), np.array([6.0, 20.0, 11.0])),
    (np.array([11.0, -4.0, 12.0]), np.array([6.0, 20.0, 11.0])),
)
BLEED_CENTRE = np.array([28.0, 22.0, 6.0])  # in the patient's left posterior brain
BLEED_AXES = np.array([13.0, 16.0, 11.0])  # about 9.6 ml
IVH_CENTRE = np.array([11.0, 8.0, 12.0])  # blood in the left ventricle's posterior part
IVH_AXES = np.array([5.0, 6.0, 6.0])
IPH, IVH = 1, 4  # the haemorrhage model's label values (IPH, EAH, oedema, IVH)


def inside(points: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Whether points (..., 3) lie inside the ellipsoid."""
    return np.sum(((points - centre) / axes) ** 2, axis=-1) < 1.0


@dataclass(frozen=True)
class HeadSeries:
    """A written series: files bottom-up, and each slice's position and InstanceNumber."""

    directory: Path
    paths: list[Path]
    StudyInstanceUID: str
    SeriesInstanceUID: str
    positions: list[tuple[float, ...]]  # ImagePositionPatient per file
    instance_numbers: dict[str, int]  # SOPInstanceUID -> InstanceNumber
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    size: int

    def pixel_of(self, point: Sequence[float] | np.ndarray) -> tuple[int, int]:
        """(row, column) of the pixel holding LPS ``point`` (axial slices)."""
        x0, y0, _ = self.positions[0]
        column = int(round((point[0] - x0) / self.pixel_spacing[1]))
        row = int(round((point[1] - y0) / self.pixel_spacing[0]))
        return row, column


def write_head_series(
    directory: Path,
    *,
    bleed: bool,
    size: int = 256,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_spacing: float = 3.0,
    n: int = 40,
    description: str = "CT HEAD",
    patient: tuple[str, str] = ("TEST^VIEWER", "VIEW-0001"),
    accession: str = "ACC-VIEW-1",
) -> HeadSeries:
    """A synthetic axial head CT (see the module doc), with the bleed when ``bleed``."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    half = (size - 1) * np.array(pixel_spacing) / 2
    z0 = -(n - 1) * slice_spacing / 2
    paths, positions, numbers = [], [], {}
    for k in range(n):  # bottom-up: k = 0 is the lowest slice
        position = np.array([-half[1], -half[0], z0 + k * slice_spacing])
        rows = np.arange(size, dtype=np.float64)[:, None, None]
        cols = np.arange(size, dtype=np.float64)[None, :, None]
        points = position + cols * pixel_spacing[1] * np.array([1.0, 0, 0])
        points = points + rows * pixel_spacing[0] * np.array([0, 1.0, 0])
        hu = np.full((size, size), AIR_HU)
        hu[inside(points, np.zeros(3), HEAD_AXES)] = SCALP_HU
        hu[inside(points, np.zeros(3), HEAD_AXES * SKULL_OUTER)] = BONE_HU
        brain = inside(points, np.zeros(3), HEAD_AXES * SKULL_INNER)
        hu[brain] = BRAIN_HU
        for centre, axes in VENTRICLES:
            hu[brain & inside(points, centre, axes)] = CSF_HU
        if bleed:
            hu[brain & inside(points, BLEED_CENTRE, BLEED_AXES)] = BLEED_HU
            hu[brain & inside(points, IVH_CENTRE, IVH_AXES)] = BLEED_HU - 8
        path = write_slice(
            directory / f"IM{k:04d}.dcm",
            hu,
            position=tuple(position),
            pixel_spacing=pixel_spacing,
            series_uid=series,
            study_uid=study,
            instance=101 + k,
        )
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = patient
        ds.AccessionNumber = accession
        ds.StudyDescription = description
        ds.SeriesDescription = "Head axial 3 mm"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID = frame
        ds.SliceThickness = slice_spacing
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        positions.append(tuple(float(v) for v in position))
        numbers[str(ds.SOPInstanceUID)] = 101 + k
    return HeadSeries(directory, paths, study, series, positions, numbers, pixel_spacing, size)


def stow(server: ServerProcess, files: Iterable[Path | bytes], per_request: int = 32) -> None:
    """Store the files in the server through STOW-RS, as a sending system does
    (``per_request`` files in each request)."""
    items = list(files)
    for start in range(0, len(items), per_request):
        parts = [f if isinstance(f, bytes) else f.read_bytes() for f in items[start:][:per_request]]
        body = b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in parts
        )
        body += f"--{BOUNDARY}--\r\n".encode()
        answer = httpx.post(
            f"{server.http_url}/dicomweb/studies",
            content=body,
            headers={
                **server.headers,
                "Content-Type": f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
            },
            timeout=300,
        )
        assert answer.status_code == 200, answer.text


Make = Callable[[str, list[SeriesFiles]], StudyAnalysis]


@dataclass
class StandIn:
    """The analyser's stand-in: what each study's models would have said, by study."""

    makers: dict[str, Make] = field(default_factory=dict)

    def analyze(self, study_uid: str, series: list[SeriesFiles]) -> StudyAnalysis:
        return self.makers[study_uid](study_uid, series)


def analyse(server: ServerProcess, study_uid: str, make: Make) -> None:
    """Complete the study's series and analyse it with the server's ``Worker`` (its database
    and results folder), ``make`` standing in for the models."""
    db = Database(server.database_url)
    try:
        queued = complete_quiet_series(db, quiet_seconds=0)
        assert queued == [study_uid], queued
        worker = Worker(
            db=db,
            analyzer=StandIn({study_uid: make}),  # type: ignore[arg-type]
            results_dir=server.data_dir / "results",
            quiet_seconds=3600,
        )
        assert worker.run_one()
    finally:
        db.dispose()


def route(model: str, series_uid: str, reason: str) -> dict[str, Any]:
    """One model's entry in the routing document, as the router writes it for a run."""
    return {
        "model": model,
        "run": True,
        "SeriesInstanceUID": series_uid,
        "reason": reason,
        "incomplete": False,
        "series": [{"SeriesInstanceUID": series_uid, "eligible": True, "reasons": ["chosen"]}],
        "status": "ok",
    }


def haemorrhage(*, bleed: bool) -> Make:
    """The haemorrhage model's output for a series from :func:`write_head_series` (or any
    head CT): IPH where the bleed ellipsoid is, IVH in the left ventricle, both shrunk by a
    millimetre, on the model's own grid; nothing when not ``bleed``."""

    def make(study_uid: str, series: list[SeriesFiles]) -> StudyAnalysis:
        (files,) = series
        prepared = prepare_head_ct(files.paths, min_coverage_mm=None)
        labels = np.zeros(prepared.hu.shape, dtype=np.uint8)
        if bleed:
            grid, _ = model_output(prepared, labels, files.SeriesInstanceUID)
            centres = voxel_centres(grid)
            labels[inside(centres, BLEED_CENTRE, BLEED_AXES - 1.0)] = IPH
            labels[inside(centres, IVH_CENTRE, IVH_AXES - 1.0)] = IVH
        overlay, finding = model_output(prepared, labels, files.SeriesInstanceUID)
        finding = Finding(**{**vars(finding), "model": BLAST})
        return StudyAnalysis(
            study_uid,
            AIStatus.ok,
            [finding],
            routing={"models": [route(BLAST.name, files.SeriesInstanceUID, "axial head CT")]},
            overlays={finding.finding: overlay},
        )

    return make


def blob_haemorrhage(radius_mm: float = 15.0) -> Make:
    """A made-up haemorrhage output for any head CT (the benchmark's real series): IPH in a
    ball of ``radius_mm`` at the middle of the head, EAH on every head voxel of 55 to 85 HU
    (scattered, as a noisy map would be)."""

    def make(study_uid: str, series: list[SeriesFiles]) -> StudyAnalysis:
        (files,) = series
        prepared = prepare_head_ct(files.paths, min_coverage_mm=None)
        labels = np.zeros(prepared.hu.shape, dtype=np.uint8)
        labels[prepared.head_mask & (prepared.hu > 55) & (prepared.hu < 85)] = 2
        middle = np.argwhere(prepared.head_mask).mean(axis=0)
        grid = np.moveaxis(np.indices(labels.shape), 0, -1) * np.asarray(prepared.spacing_mm)
        ball = np.linalg.norm(grid - middle * np.asarray(prepared.spacing_mm), axis=-1)
        labels[ball < radius_mm] = IPH
        overlay, finding = model_output(prepared, labels, files.SeriesInstanceUID)
        finding = Finding(**{**vars(finding), "model": BLAST})
        return StudyAnalysis(
            study_uid,
            AIStatus.ok,
            [finding],
            routing={"models": [route(BLAST.name, files.SeriesInstanceUID, "axial head CT")]},
            overlays={finding.finding: overlay},
        )

    return make


def voxel_centres(overlay: Overlay) -> np.ndarray:
    """LPS centres (z, y, x, 3) of a label overlay's voxels, from its grid geometry."""
    assert overlay.has_geometry
    origin = np.asarray(overlay.grid_origin)
    spacing = np.asarray(overlay.grid_spacing)
    direction = np.asarray(overlay.grid_direction).reshape(3, 3)
    k, j, i = np.meshgrid(*(np.arange(s) for s in overlay.data.shape), indexing="ij")
    index = np.stack([i, j, k], axis=-1) * spacing
    return origin + index @ direction.T


@dataclass(frozen=True)
class Heat:
    """A finding of the chest model with its saliency blob (map pixels on a 64² map laid on
    the whole image)."""

    code: str
    label: str
    score: float
    peak: tuple[int, int]  # (row, column) on the map
    threshold: float = 0.5


HEAT_SIDE = 64


def heat_map(peak: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0:HEAT_SIDE, 0:HEAT_SIDE]
    heat = np.exp(-((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2) / 60.0)
    return heat.astype(np.float16)


def chest(heats: Sequence[Heat]) -> Make:
    """The chest model's findings for a one-image series, each with a heatmap whose peak is
    at ``Heat.peak`` of a 64 × 64 map covering the whole image."""

    def make(study_uid: str, series: list[SeriesFiles]) -> StudyAnalysis:
        (files,) = series
        ds = pydicom.dcmread(files.paths[0])
        grey = np.asarray(ds.pixel_array, dtype=np.float64)
        small = grey[:: ds.Rows // HEAT_SIDE, :: ds.Columns // HEAT_SIDE][:HEAT_SIDE, :HEAT_SIDE]
        background = np.clip(small / max(1.0, small.max()) * 255, 0, 255).astype(np.uint8)
        sop = str(ds.SOPInstanceUID)
        findings, overlays = [], {}
        for h in heats:
            findings.append(
                Finding(
                    h.code,
                    h.score >= h.threshold,
                    h.score,
                    {},
                    XRV,
                    details={
                        "label": h.label,
                        "probability": h.score,
                        "threshold": h.threshold,
                        "SOPInstanceUID": sop,
                        "SeriesInstanceUID": files.SeriesInstanceUID,
                    },
                )
            )
            overlays[h.code] = Overlay(
                "heatmap",
                heat_map(h.peak),
                background,
                (h.code,),
                (0, 0),
                files.SeriesInstanceUID,
                (ds.Rows / HEAT_SIDE, ds.Columns / HEAT_SIDE),
                sop,
            )
        return StudyAnalysis(
            study_uid,
            AIStatus.ok,
            findings,
            routing={"models": [route(XRV.name, files.SeriesInstanceUID, "CR chest PA")]},
            overlays=overlays,
        )

    return make


def heat_peak_pixel(peak: tuple[int, int], rows: int, columns: int) -> tuple[int, int]:
    """The source pixel at the centre of a map pixel (row, column)."""
    return (
        int((peak[0] + 0.5) * rows / HEAT_SIDE),
        int((peak[1] + 0.5) * columns / HEAT_SIDE),
    )


def radiograph_copy(source: Path, *, accession: str, description: str) -> bytes:
    """The radiograph as a new study (new UIDs, same pixels), Part 10 bytes."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = accession
    ds.StudyDescription = description
    ds.PatientName = "TEST^RADIOGRAPH"
    ds.PatientID = "VIEW-0002"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def window_grey(value: float, center: float, width: float) -> float:
    """The grey level (0..255) of ``value`` in the window (DICOM PS3.3 C.11.2.1.2.1, linear)."""
    c, w = center, max(1.0, width)
    if value <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if value > c - 0.5 + (w - 1) / 2:
        return 255.0
    return ((value - (c - 0.5)) / (w - 1) + 0.5) * 255.0
