"""The viewer on the real head CT (CQ500-CT-0: 238 JPEG Lossless slices, gantry tilted):
stored through ingest, its document and a slice's pixels. Timing is in
``bench/viewer_render.py``, not here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.viewer.seed import record_finding, store_files
from tests.viewer.test_viewer_api import client_for
from triage.db import Database

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_the_real_head_ct_in_the_viewer(db: Database, tmp_path: Path, cq500_dir: Path) -> None:
    paths = sorted(cq500_dir.glob("*.dcm"))
    store_files(db, tmp_path / "data", paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    record_finding(db, tmp_path / "data" / "results", study, series_uid, "intracranial_haemorrhage")
    client = client_for(db)
    res = client.get(f"/api/studies/{study}/viewer")
    assert res.status_code == 200, res.text
    (series,) = res.json()["series"]
    assert (series["rows"], series["columns"], series["kind"]) == (512, 512, "volume")
    slices = series["slices"]
    assert len(slices) == 238
    z = [s["position"][2] for s in slices]
    assert z == sorted(z, reverse=True)  # superior first on the tilted series
    assert series["window"] == {"center": 30, "width": 300}  # the files' own
    # The middle slice: the HU the analysis decodes, on the same sorted slice.
    k = len(slices) // 2
    res = client.get(f"/api/studies/{study}/series/{series_uid}/pixels/{k}")
    assert res.status_code == 200 and res.headers["x-pixel-type"] == "int16"
    hu = np.frombuffer(res.content, dtype="<i2").reshape(512, 512)
    # The file of that slice, decoded by pydicom (the viewer's JPEG Lossless goes through GDCM):
    # lossless, so the same HU; below -1024 HU reads as -1024, as in the analysis.
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    ds = pydicom.dcmread(by_uid[slices[k]["SOPInstanceUID"]])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(hu, np.maximum(expected, -1024).astype(np.int16))
    assert 20 < np.median(hu[(hu > 0) & (hu < 100)]) < 60  # brain
