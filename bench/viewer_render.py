"""Image viewer: server time per slice (pixels + overlay), cold and warm, through the real
routes, against the PNG key image of the same overlay measured in the same run.

A temporary data folder and SQLite database; the series are stored through ingest (as a
PACS would send them) and what an analysis records is added: a finding with its overlay
file. Then, in this process, the app (``create_app``) is called through Starlette's
``TestClient`` (ASGI in process, the routes' threadpool included, no sockets), with a
radiologist's bearer token; bodies are read raw (still gzip-compressed, as a browser
receives them), so the client's decompression is not timed.

* Real head CT (``../shared/data/cq500-ct0``, 238 JPEG Lossless 512² slices, tilted
  gantry): a label overlay on the model's grid (the real series through
  ``prepare_head_ct``; a 14 ml sphere of class IPH and a 3 ml one of IVH in the brain, made
  here because the network is not run), laid back on the source slices by the viewer.
  The viewer document (``/viewer``) first, cold (headers read, the overlay laid on the
  slices) and warm; then every slice in display order, pixels then overlay, on a fresh
  viewer (**cold**: decoded from the file, the OS file cache warm) and again (**warm**:
  from the viewer's cache).
* Real radiograph (``../shared/data/xray/siim-cr-chest.dcm``, 1024², JPEG baseline, and,
  when pydicom-data is installed, ``RG1_UNCR.dcm``, 1955 × 1841, 15-bit): a saliency heatmap
  on a 512² map of the centre crop (as the chest model makes it). A radiograph is one
  image, so cold is measured ``--repeats`` times, each on a fresh viewer.
* Peer: ``GET /api/studies/{uid}/overlays/{finding}.png``, the key-image preview of the same
  overlay (``triage.serve.preview.render_key_image``), median of ``--repeats`` calls. Floor:
  ``GET /api/auth/me`` (what any signed-in request costs through this client: the bearer
  token checked and its last use written, ASGI, ``TestClient``).

Browser-side rendering is not measured here (see the front-end's script).

Usage:
    python bench/viewer_render.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from cpuload import busy_cpu_seconds, own_cpu_seconds
from fastapi.testclient import TestClient
from sqlalchemy import select

from triage.auth.accounts import create_account
from triage.auth.roles import Role
from triage.auth.tokens import create_token
from triage.db import Database
from triage.db.tables import FindingRow, StudyRow
from triage.ingest.store import ingest_instance
from triage.models.device import cpu_info
from triage.results import Overlay, overlay_path, save_overlay
from triage.serve.app import create_app

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
CT_DIR = SHARED / "cq500-ct0"
XRAYS = [SHARED / "xray" / "siim-cr-chest.dcm"]


def pydicom_data_file(name: str) -> Path | None:
    """A file shipped with pydicom or pydicom-data, found on disk (never downloaded)."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    for root in roots:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    return None


# --- the data folder --------------------------------------------------------------------------


def store(db: Database, data_dir: Path, paths: list[Path], study_uid: str | None = None) -> None:
    (data_dir / "incoming").mkdir(parents=True, exist_ok=True)
    for path in paths:
        data = path.read_bytes()
        if study_uid is not None:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study_uid
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        outcome = ingest_instance(
            data,
            db=db,
            store_dir=data_dir / "dicom",
            tmp_dir=data_dir / "incoming",
            quarantine_dir=data_dir / "quarantine",
            source="bench",
        )
        assert outcome.ok, outcome.reason


def record(
    db: Database,
    results_dir: Path,
    study_uid: str,
    series_uid: str,
    finding: str,
    overlay: Overlay,
    model: tuple[str, str],
    details: dict[str, Any] | None = None,
) -> None:
    """What the worker records: the finding row, its overlay file, the routing entry."""
    path = overlay_path(results_dir, study_uid, finding)
    save_overlay(path, overlay)
    with db.session() as s:
        study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == study_uid))
        assert study is not None
        study.routing = {
            "models": [{"model": model[0], "run": True, "SeriesInstanceUID": series_uid}]
        }
        study.ai_status = "ok"
        s.add(
            FindingRow(
                study_id=study.id,
                finding=finding,
                flag=1,
                score=0.9,
                model_name=model[0],
                model_version=model[1],
                SeriesInstanceUID=series_uid,
                payload={"finding": finding, "flag": True, "score": 0.9,
                         "details": {"SeriesInstanceUID": series_uid, **(details or {})}},
                mask_path=str(path),
                created_at=datetime.now(UTC),
            )
        )  # fmt: skip


def ct_overlay(paths: list[Path]) -> Overlay:
    """A label overlay on the real series' model grid: two spheres in the brain."""
    from triage.preprocess.ct import prepare_head_ct

    prepared = prepare_head_ct(paths)
    labels = np.zeros(prepared.hu.shape, dtype=np.uint8)
    zz, yy, xx = np.indices(labels.shape)
    centre = np.array(labels.shape) // 2
    for value, radius, offset in ((1, 15.0, (10, -20, 25)), (4, 9.0, (0, 10, -5))):
        c = centre + np.array(offset)
        inside = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius**2
        labels[inside & prepared.head_mask] = value
    return Overlay(
        kind="labels",
        data=labels,
        background=np.clip(prepared.hu, -1024, 3071).astype(np.int16),
        classes=("IPH", "EAH", "oedema", "IVH"),
        origin=prepared.crop_start,
        SeriesInstanceUID=prepared.SeriesInstanceUID,
        grid_origin=prepared.hu_origin,
        grid_spacing=tuple(float(v) for v in prepared.resampled.GetSpacing()),
        grid_direction=tuple(float(v) for v in prepared.resampled.GetDirection()),
    )


def heatmap_overlay(ds: pydicom.Dataset) -> Overlay:
    """A saliency map as the chest model makes one: 512² (at most) over the centre crop."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    crop = min(rows, cols)
    side = min(crop, 512)
    yy, xx = np.indices((side, side)) / side
    heat = np.exp(-((yy - 0.35) ** 2 + (xx - 0.6) ** 2) / 0.02)
    return Overlay(
        kind="heatmap",
        data=heat.astype(np.float16),
        background=np.zeros((side, side), np.uint8),
        classes=("pneumothorax",),
        origin=(rows // 2 - crop // 2, cols // 2 - crop // 2),
        SeriesInstanceUID=str(ds.SeriesInstanceUID),
        scale=(crop / side, crop / side),
        SOPInstanceUID=str(ds.SOPInstanceUID),
    )


# --- timing -----------------------------------------------------------------------------------


def fetch(client: TestClient, url: str) -> tuple[float, int]:
    """(seconds, bytes on the wire) of one GET, the body read raw (not decompressed)."""
    t0 = time.perf_counter()
    with client.stream("GET", url) as res:
        body = b"".join(res.iter_raw())
        assert res.status_code == 200, (url, res.status_code, body[:200])
    return time.perf_counter() - t0, len(body)


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(p95, 2),
        "max_ms": round(ms[-1], 2),
    }


def fresh_client(db: Database, token: str) -> TestClient:
    """A new app: a new viewer with an empty cache."""
    return TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})


def bench_series(
    db: Database,
    token: str,
    study: str,
    series: str,
    finding: str,
    repeats: int,
    *,
    cold_rounds: int,
) -> dict[str, Any]:
    """Document, per-slice cold and warm, and the PNG peer for one study."""
    doc_cold, pix_cold, ovl_cold, pair_cold, wire = [], [], [], [], []
    doc_warm, pix_warm, ovl_warm, pair_warm = [], [], [], []
    n_slices = 0
    for _ in range(cold_rounds):
        client = fresh_client(db, token)
        t, _ = fetch(client, f"/api/studies/{study}/viewer")
        doc_cold.append(t)
        doc = client.get(f"/api/studies/{study}/viewer").json()
        n_slices = len(doc["series"][0]["slices"])
        for _ in range(repeats):
            doc_warm.append(fetch(client, f"/api/studies/{study}/viewer")[0])
        for rnd, (pix, ovl, pair) in enumerate(
            ((pix_cold, ovl_cold, pair_cold), (pix_warm, ovl_warm, pair_warm))
        ):
            for i in range(n_slices):
                tp, size = fetch(client, f"/api/studies/{study}/series/{series}/pixels/{i}")
                to, _ = fetch(
                    client, f"/api/studies/{study}/series/{series}/overlays/{finding}/{i}"
                )
                pix.append(tp)
                ovl.append(to)
                pair.append(tp + to)
                if rnd == 0:
                    wire.append(size)
        client.close()
    client = fresh_client(db, token)
    fetch(client, f"/api/studies/{study}/overlays/{finding}.png")  # untimed warm-up
    png = [fetch(client, f"/api/studies/{study}/overlays/{finding}.png")[0] for _ in range(repeats)]
    # The floor: any signed-in request through the same client (auth, ASGI, TestClient).
    floor = [fetch(client, "/api/auth/me")[0] for _ in range(repeats)]
    return {
        "slices": n_slices,
        "document_cold": summary(doc_cold),
        "document_warm": summary(doc_warm),
        "slice_cold_pixels_plus_overlay": summary(pair_cold),
        "slice_cold_pixels": summary(pix_cold),
        "slice_cold_overlay": summary(ovl_cold),
        "slice_warm_pixels_plus_overlay": summary(pair_warm),
        "slice_warm_pixels": summary(pix_warm),
        "slice_warm_overlay": summary(ovl_warm),
        "pixels_wire_bytes_median": int(statistics.median(wire)),
        "peer_png_key_image": summary(png),
        "floor_signed_in_request": summary(floor),
        "ratio_cold_slice_to_png": round(statistics.median(pair_cold) / statistics.median(png), 3),
        "ratio_warm_slice_to_png": round(statistics.median(pair_warm) / statistics.median(png), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {**cpu_info(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "command": "python bench/viewer_render.py " + f"--repeats {args.repeats}",
        "load_before": os.getloadavg(),
    }
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="viewer-bench-") as tmp:
        data_dir = Path(tmp)
        db = Database(f"sqlite:///{data_dir / 'triage.db'}")
        db.migrate()
        create_account(db, "bench-reader", Role.radiologist)
        token, _ = create_token(db, "bench-reader", "bench")
        runs: list[tuple[str, Callable[[], tuple[str, str, str, str, int]]]] = []

        def head_ct() -> tuple[str, str, str, str, int]:
            paths = sorted(CT_DIR.glob("*.dcm"))
            t0 = time.perf_counter()
            store(db, data_dir, paths)
            results["ct_ingest_s"] = round(time.perf_counter() - t0, 2)
            first = pydicom.dcmread(paths[0], stop_before_pixels=True)
            study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
            overlay = ct_overlay(paths)
            record(db, data_dir / "results", study, series, "intracranial_haemorrhage",
                   overlay, ("blast-ct-v1", "1.0.0"))  # fmt: skip
            return (
                "cq500-ct0 (238 × 512², JPEG Lossless)",
                study,
                series,
                ("intracranial_haemorrhage"),
                1,
            )

        if CT_DIR.is_dir():
            runs.append(("ct", head_ct))
        xrays = [p for p in XRAYS if p.is_file()]
        rg1 = pydicom_data_file("RG1_UNCR.dcm")
        if rg1 is not None:
            xrays.append(rg1)
        for k, path in enumerate(xrays):

            def radiograph(path: Path = path, k: int = k) -> tuple[str, str, str, str, int]:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                study = f"1.2.826.0.1.3680043.10.543.9{k}"
                store(db, data_dir, [path], study_uid=study)
                record(db, data_dir / "results", study, str(ds.SeriesInstanceUID),
                       "pneumothorax", heatmap_overlay(ds), ("xrv-densenet121-res224-all", "1"),
                       {"SOPInstanceUID": str(ds.SOPInstanceUID)})  # fmt: skip
                label = (
                    f"{path.name} ({ds.Rows} × {ds.Columns}, {ds.file_meta.TransferSyntaxUID.name})"
                )
                return label, study, str(ds.SeriesInstanceUID), "pneumothorax", args.repeats

            runs.append((f"xray{k}", radiograph))
        results["series"] = {}
        for key, make in runs:
            label, study, series, finding, cold_rounds = make()
            out = bench_series(
                db, token, study, series, finding, args.repeats, cold_rounds=cold_rounds
            )
            results["series"][key] = {"label": label, **out}
            print(json.dumps({key: results["series"][key]}, indent=1))  # noqa: T201
        db.dispose()
    busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    if busy0 is not None and busy1 is not None:
        results["others_busy_cpus"] = round(
            max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0), 2
        )
    results["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in results.items() if k != "series"}, indent=1))  # noqa: T201
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
