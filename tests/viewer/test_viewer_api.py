"""The viewer's API on studies stored through ingest: a synthetic head CT with a cube of blood
at a known place (axial, reversed, tilted), the haemorrhage overlay made from it through the
model's own ``interpret``, and a real radiograph with a saliency heatmap.

What must hold: slices in display order (along the normal, superior first) with the files'
InstanceNumbers; the file's window, else the default; the overlay's best slice is the one
with the most labels; the pixel route gives the HU written into the files; the overlay route
gives the class exactly on the source pixels the DICOM Segmentation would mark, and within a
model voxel of the cube in patient space; the heatmap lands where its origin and scale put
it; unknown things are 404; one audit record per viewer document.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.conftest import pydicom_file
from tests.dicomout.builders import (
    AIR_HU,
    BLEED_HU,
    BRAIN_HU,
    CUBE_CENTRE,
    HEAD_CENTRE,
    Layout,
    in_cube,
    pixel_centres,
    write_cube_series,
)
from tests.preprocess.ct_builders import cut_slice, to_jpeg_lossless
from tests.signin import auth_headers
from tests.viewer.seed import bleed_overlay, record_finding, store_files, stored_path
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import AuditRow
from triage.dicomout.geometry import labels_on_source
from triage.preprocess.ct_headers import read_headers
from triage.results import Overlay
from triage.serve.app import create_app

FINDING = "intracranial_haemorrhage"
#: Mapping tolerance at the cube's border: one model voxel (1 mm).
TOLERANCE_MM = 1.0
PRESETS = [
    {"name": "brain", "center": 40, "width": 80},
    {"name": "subdural", "center": 75, "width": 215},
    {"name": "stroke", "center": 40, "width": 40},
    {"name": "bone", "center": 600, "width": 2800},
]


@dataclass
class CubeStudy:
    client: TestClient
    db: Database
    data_dir: Path
    study: str
    series: str
    sources: list[pydicom.Dataset]  # the source headers, in file order
    overlay: Overlay

    def manifest(self) -> dict:
        res = self.client.get(f"/api/studies/{self.study}/viewer")
        assert res.status_code == 200, res.text
        return res.json()

    def pixels(self, index: int) -> np.ndarray:
        res = self.client.get(f"/api/studies/{self.study}/series/{self.series}/pixels/{index}")
        assert res.status_code == 200, res.text
        assert res.headers["x-pixel-type"] == "int16"
        shape = (int(res.headers["x-rows"]), int(res.headers["x-columns"]))
        return np.frombuffer(res.content, dtype="<i2").reshape(shape)

    def labels(self, index: int, finding: str = FINDING) -> np.ndarray:
        url = f"/api/studies/{self.study}/series/{self.series}/overlays/{finding}/{index}"
        res = self.client.get(url)
        assert res.status_code == 200, res.text
        assert res.headers["x-pixel-type"] == "uint8"
        shape = (int(res.headers["x-rows"]), int(res.headers["x-columns"]))
        return np.frombuffer(res.content, dtype=np.uint8).reshape(shape)


def client_for(db: Database, **app_kwargs: object) -> TestClient:
    app = create_app(db, **app_kwargs)  # type: ignore[arg-type]
    return TestClient(app, headers=auth_headers(db, "reader", Role.radiologist))


def cube_study(
    db: Database,
    tmp_path: Path,
    layout: Layout = "axial",
    *,
    window: tuple[list[float], list[float]] | None = ([35.0, 600.0], [90.0, 2000.0]),
    jpeg: bool = False,
    **app_kwargs: object,
) -> CubeStudy:
    """A small cube series stored in ``tmp_path/data`` with its haemorrhage finding and
    overlay; ``window``: the (WindowCenter, WindowWidth) values written into the files."""
    series = write_cube_series(tmp_path / "sources", layout, size=64, n=40)
    overlay = bleed_overlay(series.paths)
    if jpeg:
        for path in series.paths:
            to_jpeg_lossless(path)

    def edit(ds: pydicom.Dataset) -> None:
        ds.BodyPartExamined = "HEAD"
        ds.SeriesDescription = "HEAD 1.5"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window

    data_dir = tmp_path / "data"
    store_files(db, data_dir, series.paths, edit=edit)
    sources = read_headers(series.paths)
    study, series_uid = str(sources[0].StudyInstanceUID), str(sources[0].SeriesInstanceUID)
    record_finding(db, data_dir / "results", study, series_uid, FINDING, overlay=overlay)
    return CubeStudy(
        client_for(db, **app_kwargs), db, data_dir, study, series_uid, sources, overlay
    )


def pixel_of(point: np.ndarray, ds: pydicom.Dataset) -> tuple[int, int]:
    """(row, column) of the pixel whose centre is nearest a point in the slice's plane."""
    position = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    spacing = [float(v) for v in ds.PixelSpacing]
    d = point - position
    return round(d @ orientation[3:] / spacing[0]), round(d @ orientation[:3] / spacing[1])


# --- the document -------------------------------------------------------------------------


def test_the_document_lists_the_analysed_series_head_first(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path, "reversed")
    # Another series of the same study that no model read: not listed.
    other = write_cube_series(tmp_path / "other", "axial", size=32, n=5)

    def same_study(ds: pydicom.Dataset) -> None:
        ds.StudyInstanceUID = cube.study

    store_files(db, cube.data_dir, other.paths, edit=same_study)
    doc = cube.manifest()
    assert doc["StudyInstanceUID"] == cube.study
    assert doc["PatientName"] == "VIEWER^VALENTINE" and doc["PatientID"] == "PID-VIEW-2718"
    assert [f["finding"] for f in doc["findings"]] == [FINDING]
    assert doc["overlays_unavailable"] == [] and doc["series_unavailable"] == []
    (series,) = doc["series"]
    assert series["SeriesInstanceUID"] == cube.series
    assert (series["Modality"], series["kind"], series["pixel_type"]) == ("CT", "volume", "int16")
    assert (series["rows"], series["columns"]) == (64, 64)
    assert series["pixel_spacing"] == [0.8, 0.95]
    assert series["photometric"] == "MONOCHROME2"
    assert series["SeriesDescription"] == "HEAD 1.5"
    # The file's first window, and the head-CT presets.
    assert series["window"] == {"center": 35, "width": 90}
    assert series["presets"] == PRESETS
    slices = series["slices"]
    assert [s["index"] for s in slices] == list(range(40))
    z = [s["position"][2] for s in slices]
    assert all(a > b for a, b in zip(z, z[1:], strict=False))  # superior first
    numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in cube.sources}
    assert {s["SOPInstanceUID"]: s["InstanceNumber"] for s in slices} == numbers
    # "reversed" writes files top-down with InstanceNumber 1 at the top.
    assert [s["InstanceNumber"] for s in slices] == list(range(1, 41))
    assert all(s["frame"] == 0 for s in slices)


def test_without_a_window_in_the_files_the_brain_window_is_the_default(
    db: Database, tmp_path: Path
) -> None:
    cube = cube_study(db, tmp_path, window=None)
    (series,) = cube.manifest()["series"]
    assert series["window"] == {"center": 40, "width": 80}
    z = [s["position"][2] for s in series["slices"]]
    assert z == sorted(z, reverse=True)
    # "axial" writes files bottom-up: InstanceNumbers run against the display order.
    assert [s["InstanceNumber"] for s in series["slices"]] == list(range(40, 0, -1))


def test_the_overlay_summary_counts_the_labels_on_the_source_slices(
    db: Database, tmp_path: Path
) -> None:
    cube = cube_study(db, tmp_path)
    (series,) = cube.manifest()["series"]
    (overlay,) = series["overlays"]
    assert overlay["finding"] == FINDING and overlay["kind"] == "labels"
    assert overlay["model"] == {"name": "blast-ct-v1", "version": "1.0.0"}
    counts = [int((cube.labels(i) > 0).sum()) for i in range(len(series["slices"]))]
    assert overlay["best_index"] == int(np.argmax(counts)) and max(counts) > 0
    (iph,) = overlay["classes"]  # only classes with pixels
    assert (iph["value"], iph["name"], iph["color"]) == (1, "IPH", "#ff3b3b")
    assert iph["voxels"] == sum(counts)
    assert iph["best_index"] == overlay["best_index"]
    on_source = labels_on_source(cube.overlay, cube.sources)
    assert iph["voxels"] == on_source.voxel_counts()["IPH"]


def test_one_audit_record_per_viewer_document(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path)

    def views() -> list[AuditRow]:
        with db.session() as s:
            rows = s.scalars(select(AuditRow).where(AuditRow.action == "study_view")).all()
            s.expunge_all()
            return list(rows)

    cube.manifest()
    cube.pixels(3)
    cube.labels(3)
    cube.manifest()
    rows = views()
    assert len(rows) == 2
    for row in rows:
        assert (row.actor, row.target_kind, row.target) == ("reader", "study", cube.study)
        assert row.detail == {"viewer": True} and row.outcome == "success"
    assert cube.client.get("/api/studies/1.2.3.999/viewer").status_code == 404
    assert len(views()) == 2


# --- pixels -------------------------------------------------------------------------------


def test_the_pixels_are_the_hounsfield_units_in_the_files(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path)
    (series,) = cube.manifest()["series"]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in cube.sources}
    # The slice nearest the cube's centre.
    k = int(np.argmin([abs(s["position"][2] - CUBE_CENTRE[2]) for s in series["slices"]]))
    ds = by_uid[series["slices"][k]["SOPInstanceUID"]]
    hu = cube.pixels(k)
    assert hu.shape == (64, 64) and hu.dtype == np.dtype("<i2")
    assert hu[pixel_of(CUBE_CENTRE, ds)] == BLEED_HU
    brain = CUBE_CENTRE + np.array([-12.0, 8.0, 0.0])  # inside the head, outside the cube
    assert hu[pixel_of(brain, ds)] == BRAIN_HU
    assert hu[0, 0] == AIR_HU
    # Every pixel: the HU the builder wrote (head, cube, air).
    points = pixel_centres(
        np.asarray(ds.ImagePositionPatient, float),
        np.asarray(ds.ImageOrientationPatient, float),
        (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        64,
        64,
    )
    head = np.linalg.norm(points - HEAD_CENTRE, axis=-1) < 38.0
    expected = np.where(head, BRAIN_HU, AIR_HU)
    expected[in_cube(points)] = BLEED_HU
    assert np.array_equal(hu, expected)


def test_pixel_bodies_are_gzip_level_1_with_the_contract_headers(
    db: Database, tmp_path: Path
) -> None:
    cube = cube_study(db, tmp_path)
    url = f"/api/studies/{cube.study}/series/{cube.series}/pixels/5"
    with cube.client.stream("GET", url) as res:
        raw = b"".join(res.iter_raw())
        headers = res.headers
    assert headers["content-encoding"] == "gzip"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["cache-control"] == "private, no-cache"  # a re-analysis replaces it
    assert (headers["x-rows"], headers["x-columns"], headers["x-pixel-type"]) == (
        "64",
        "64",
        "int16",
    )
    assert raw[:2] == b"\x1f\x8b" and raw[8] == 4  # gzip, XFL 4: the fastest level
    assert len(gzip.decompress(raw)) == 64 * 64 * 2
    res = cube.client.get(f"/api/studies/{cube.study}/series/{cube.series}/overlays/{FINDING}/5")
    assert res.headers["content-encoding"] == "gzip"
    assert res.headers["cache-control"] == "private, no-cache"
    assert len(res.content) == 64 * 64


def test_jpeg_lossless_slices_decode_and_a_cut_one_is_refused(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path, jpeg=True)
    (series,) = cube.manifest()["series"]
    k = int(np.argmin([abs(s["position"][2] - CUBE_CENTRE[2]) for s in series["slices"]]))
    sop = series["slices"][k]["SOPInstanceUID"]
    ds = next(d for d in cube.sources if str(d.SOPInstanceUID) == sop)
    assert pydicom.dcmread(stored_path(db, sop)).file_meta.TransferSyntaxUID.is_compressed
    assert cube.pixels(k)[pixel_of(CUBE_CENTRE, ds)] == BLEED_HU
    # A stored slice damaged on disk: refused with the reason, never filler rows.
    victim = series["slices"][k + 1]["SOPInstanceUID"]
    cut_slice(stored_path(db, victim))
    res = cube.client.get(f"/api/studies/{cube.study}/series/{cube.series}/pixels/{k + 1}")
    assert res.status_code == 422, res.text
    assert "cut short" in res.json()["detail"]


# --- overlays on the source pixels ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["axial", "reversed", "tilted_plane", "tilted_positions"])
def test_the_overlay_marks_the_bleed_on_its_source_pixels(
    db: Database, tmp_path: Path, layout: Layout
) -> None:
    cube = cube_study(db, tmp_path, layout)
    (series,) = cube.manifest()["series"]
    z = [s["position"][2] for s in series["slices"]]
    assert z == sorted(z, reverse=True)  # superior first, whatever the file order or tilt
    by_uid = {str(ds.SOPInstanceUID): ds for ds in cube.sources}
    expected = labels_on_source(cube.overlay, cube.sources).by_instance()
    total = 0
    for s in series["slices"]:
        ds = by_uid[s["SOPInstanceUID"]]
        labels = cube.labels(s["index"])
        # Exactly the pixels the DICOM Segmentation of this overlay marks ...
        assert np.array_equal(labels, expected[(s["SOPInstanceUID"], None)]), s["index"]
        # ... which are the cube's, within one model voxel at its border.
        points = pixel_centres(
            np.asarray(ds.ImagePositionPatient, float),
            np.asarray(ds.ImageOrientationPatient, float),
            (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            ds.Rows,
            ds.Columns,
        )
        assert set(np.unique(labels)) <= {0, 1}
        assert not np.any(in_cube(points, -TOLERANCE_MM) & (labels != 1)), s["index"]
        assert not np.any((labels == 1) & ~in_cube(points, TOLERANCE_MM)), s["index"]
        total += int((labels == 1).sum())
    assert total > 0


def test_an_overlay_without_grid_geometry_is_listed_as_unavailable(
    db: Database, tmp_path: Path
) -> None:
    cube = cube_study(db, tmp_path)
    old = Overlay(
        "labels", np.ones((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.int16), ("IPH",),
        (0, 0, 0), cube.series,
    )  # fmt: skip
    record_finding(
        db, cube.data_dir / "results", cube.study, cube.series, "midline_shift", overlay=old,
        model=("old-model", "0.1"), route=False,
    )  # fmt: skip
    doc = cube.manifest()
    (series,) = doc["series"]
    assert [o["finding"] for o in series["overlays"]] == [FINDING]
    (missing,) = doc["overlays_unavailable"]
    assert missing["finding"] == "midline_shift"
    assert "analyse the study again" in missing["reason"]
    url = f"/api/studies/{cube.study}/series/{cube.series}/overlays/midline_shift/0"
    res = cube.client.get(url)
    assert res.status_code == 404 and "analyse the study again" in res.json()["detail"]


# --- a radiograph with a saliency heatmap ---------------------------------------------------


def radiograph_study(
    db: Database, tmp_path: Path, source: Path, heat: np.ndarray | None = None
) -> tuple[TestClient, str, str, pydicom.Dataset]:
    data_dir = tmp_path / "data"
    uid = generate_uid()

    def edit(ds: pydicom.Dataset) -> None:
        ds.StudyInstanceUID = uid  # a new study each time (the file is shared)

    store_files(db, data_dir, [source], edit=edit)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    series = str(ds.SeriesInstanceUID)
    overlay = None
    if heat is not None:
        overlay = Overlay(
            kind="heatmap",
            data=heat.astype(np.float16),
            background=np.zeros(heat.shape, np.uint8),
            classes=("pneumothorax",),
            origin=(64, 32),
            SeriesInstanceUID=series,
            scale=(3.0, 3.5),
            SOPInstanceUID=str(ds.SOPInstanceUID),
        )
    record_finding(
        db, data_dir / "results", uid, series, "pneumothorax", overlay=overlay,
        model=("xrv-densenet121-res224-all", "1"),
        details={"SOPInstanceUID": str(ds.SOPInstanceUID)},
    )  # fmt: skip
    return client_for(db), uid, series, ds


@pytest.mark.realdata
def test_a_radiograph_with_its_heatmap(db: Database, tmp_path: Path, xray_dir: Path) -> None:
    heat = np.zeros((256, 256), dtype=np.float32)
    heat[100:120, 30:60] = 1.0
    heat[200:256, 200:256] = 0.5
    source = xray_dir / "siim-cr-chest.dcm"
    client, study, series_uid, ds = radiograph_study(db, tmp_path, source, heat)
    doc = client.get(f"/api/studies/{study}/viewer").json()
    (series,) = doc["series"]
    assert (series["Modality"], series["kind"], series["pixel_type"]) == ("CR", "image", "uint16")
    assert (series["rows"], series["columns"], series["photometric"]) == (
        1024,
        1024,
        "MONOCHROME2",
    )
    assert series["pixel_spacing"] == [0.168, 0.168]
    assert series["presets"] == []
    assert series["window"] == {"center": 128, "width": 256}  # no VOI: the 8 stored bits
    (image,) = series["slices"]
    assert image["SOPInstanceUID"] == ds.SOPInstanceUID and image["position"] is None
    (overlay,) = series["overlays"]
    assert overlay["kind"] == "heatmap" and overlay["classes"] == []
    assert overlay["best_index"] == 0
    res = client.get(f"/api/studies/{study}/series/{series_uid}/pixels/0")
    assert res.headers["x-pixel-type"] == "uint16"
    stored = np.frombuffer(res.content, dtype="<u2").reshape(1024, 1024)
    assert np.array_equal(stored, pydicom.dcmread(source).pixel_array)
    res = client.get(f"/api/studies/{study}/series/{series_uid}/overlays/pneumothorax/0")
    assert res.headers["x-pixel-type"] == "uint8"
    saliency = np.frombuffer(res.content, dtype=np.uint8).reshape(1024, 1024)
    # Source pixel (r, c) lies at map position ((r - 64 + 0.5) / 3 - 0.5, (c - 32 + 0.5) / 3.5
    # - 0.5): the hot block's inside is 255, the half block 128, the rest 0.
    rows = (np.arange(1024) - 64 + 0.5) / 3.0 - 0.5
    cols = (np.arange(1024) - 32 + 0.5) / 3.5 - 0.5
    hot = ((rows > 100) & (rows < 119))[:, None] & ((cols > 30) & (cols < 59))[None, :]
    assert np.all(saliency[hot] == 255)
    half = ((rows > 200) & (rows < 255))[:, None] & ((cols > 200) & (cols < 255))[None, :]
    assert np.all(saliency[half] == 128)
    cold = ((rows < 99) | (rows > 120))[:, None] & ((cols < 29) | (cols > 60))[None, :]
    cold &= ~(((rows > 199) & (rows < 256))[:, None] & ((cols > 199) & (cols < 256))[None, :])
    assert not saliency[cold].any()
    # Outside the map's crop: nothing (rows above 64, columns left of 32).
    assert not saliency[:64].any() and not saliency[:, :32].any()


@pytest.mark.realdata
def test_a_monochrome1_radiograph_says_so(db: Database, tmp_path: Path, xray_dir: Path) -> None:
    source = xray_dir / "siim-cr-chest-monochrome1.dcm"
    client, study, _series, _ds = radiograph_study(db, tmp_path, source)
    (series,) = client.get(f"/api/studies/{study}/viewer").json()["series"]
    assert series["photometric"] == "MONOCHROME1" and series["overlays"] == []


def test_a_radiograph_window_is_brought_onto_the_stored_values(
    db: Database, tmp_path: Path
) -> None:
    """pydicom-data's RG1_UNCR (CR, MONOCHROME1, 15 bits): its window as the file states it,
    the rescale being identity."""
    source = pydicom_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    client, study, series_uid, _ds = radiograph_study(db, tmp_path, source)
    (series,) = client.get(f"/api/studies/{study}/viewer").json()["series"]
    center, width = ds.WindowCenter, ds.WindowWidth
    center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
    width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    assert series["window"]["center"] == pytest.approx((float(center) - intercept) / slope)
    assert series["window"]["width"] == pytest.approx(float(width) / abs(slope))
    assert series["photometric"] == str(ds.PhotometricInterpretation)
    res = client.get(f"/api/studies/{study}/series/{series_uid}/pixels/0")
    values = np.frombuffer(res.content, dtype="<u2").reshape(ds.Rows, ds.Columns)
    assert np.array_equal(values, pydicom.dcmread(source).pixel_array)


# --- not found, not allowed ---------------------------------------------------------------


def test_unknown_things_are_404(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path)
    c, st, se = cube.client, cube.study, cube.series
    for url in (
        "/api/studies/1.2.3.4/viewer",
        f"/api/studies/1.2.3.4/series/{se}/pixels/0",
        f"/api/studies/{st}/series/1.2.3.4/pixels/0",
        f"/api/studies/{st}/series/{se}/pixels/40",
        f"/api/studies/{st}/series/{se}/pixels/-1",
        f"/api/studies/{st}/series/{se}/pixels/99999999999999999999",
        f"/api/studies/1.2.3.4/series/{se}/overlays/{FINDING}/0",
        f"/api/studies/{st}/series/1.2.3.4/overlays/{FINDING}/0",
        f"/api/studies/{st}/series/{se}/overlays/pneumothorax/0",
        f"/api/studies/{st}/series/{se}/overlays/{FINDING}/40",
    ):
        res = c.get(url)
        assert res.status_code == 404, (url, res.text)
    assert c.get(f"/api/studies/{st}/series/{se}/pixels/abc").status_code == 422


def test_the_viewer_needs_view_patients(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path)
    urls = [
        f"/api/studies/{cube.study}/viewer",
        f"/api/studies/{cube.study}/series/{cube.series}/pixels/0",
        f"/api/studies/{cube.study}/series/{cube.series}/overlays/{FINDING}/0",
    ]
    anonymous = TestClient(cube.client.app)
    integration = TestClient(
        cube.client.app, headers=auth_headers(db, "pacs-bridge", Role.integration)
    )
    for url in urls:
        assert anonymous.get(url).status_code == 401
        assert integration.get(url).status_code == 403
    # The page: a browser without a session goes to sign-in.
    res = anonymous.get("/viewer", follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/login"


def test_an_enhanced_ct_is_shown_frame_by_frame(db: Database, tmp_path: Path) -> None:
    """pydicom's two-frame Enhanced CT (frames at z = -159 and -149 mm): two slices of one
    object, superior first, each frame's own HU."""
    source = pydicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(source)
    store_files(db, tmp_path / "data", [source])
    study, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    record_finding(db, tmp_path / "data" / "results", study, series_uid, FINDING)
    client = client_for(db)
    (series,) = client.get(f"/api/studies/{study}/viewer").json()["series"]
    slices = series["slices"]
    assert [s["frame"] for s in slices] == [1, 0]
    assert [s["position"][2] for s in slices] == [-149.0, -159.0]
    assert {s["SOPInstanceUID"] for s in slices} == {str(ds.SOPInstanceUID)}
    frames = ds.pixel_array  # (2, rows, columns) stored values
    for s in slices:
        res = client.get(f"/api/studies/{study}/series/{series_uid}/pixels/{s['index']}")
        hu = np.frombuffer(res.content, dtype="<i2").reshape(series["rows"], series["columns"])
        group = ds.PerFrameFunctionalGroupsSequence[s["frame"]]
        transform = group.get("PixelValueTransformationSequence") or (
            ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        )
        slope = float(transform[0].RescaleSlope)
        intercept = float(transform[0].RescaleIntercept)
        expected = np.maximum(frames[s["frame"]] * slope + intercept, -1024)
        assert np.array_equal(hu, np.rint(expected).astype(np.int16))
