"""The viewer's cache: bounded by bytes (least recently used dropped first), made once under
concurrent requests, and never serving a series' old state after an instance arrives."""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.viewer.seed import store_files
from tests.viewer.test_viewer_api import cube_study
from triage.db import Database
from triage.viewer import Viewer
from triage.viewer.cache import ByteLRU


def test_least_recently_used_entries_go_first() -> None:
    cache = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3, 40)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 80, 1)
    cache.put("huge", 4, 101)  # larger than the whole budget: handed back, not kept
    assert cache.get("huge") is None and cache.stats().bytes == 80
    cache.put("a", 5, 10)  # replaced, with its new size
    assert cache.get("a") == 5 and cache.stats().bytes == 50


def test_a_cache_of_zero_bytes_keeps_nothing() -> None:
    cache = ByteLRU(0)
    assert cache.get_or_make("k", lambda: ("v", 1)) == "v"
    assert cache.get("k") is None and cache.stats().entries == 0


def test_concurrent_requests_make_an_entry_once() -> None:
    cache = ByteLRU(1000)
    made = []
    start = threading.Barrier(8)

    def make() -> tuple[str, int]:
        made.append(1)
        time.sleep(0.05)
        return "value", 10

    results: list[str] = []

    def worker() -> None:
        start.wait()
        results.append(cache.get_or_make("key", make))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["value"] * 8 and len(made) == 1


def test_a_tiny_cache_stays_within_its_budget_and_answers_the_same(
    db: Database, tmp_path: Path
) -> None:
    budget = 40_000  # a few compressed 64² slices and the series layout
    cube = cube_study(db, tmp_path, viewer_cache_bytes=budget)
    (series,) = cube.manifest()["series"]
    n = len(series["slices"])
    first = [cube.pixels(i).copy() for i in range(n)]
    labels = [cube.labels(i).copy() for i in range(n)]
    again = [cube.pixels(i) for i in range(n)]
    viewer: Viewer = cube.client.app.state.viewer  # type: ignore[attr-defined]
    stats = viewer.cache.stats()
    assert stats.capacity == budget and 0 < stats.bytes <= budget
    assert stats.evictions > 0
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # The same values as an uncached viewer's.
    plain = Viewer(db, cache_bytes=0)
    for i in (0, n // 2, n - 1):
        body = plain.pixels(cube.study, cube.series, i)
        assert body.rows == 64 and body.pixel_type == "int16"
        values = np.frombuffer(gzip.decompress(body.content), dtype="<i2").reshape(64, 64)
        assert np.array_equal(values, first[i])
        overlay = plain.overlay(cube.study, cube.series, "intracranial_haemorrhage", i)
        assert np.array_equal(
            np.frombuffer(gzip.decompress(overlay.content), np.uint8).reshape(64, 64), labels[i]
        )


def test_an_instance_arriving_later_is_shown(db: Database, tmp_path: Path) -> None:
    cube = cube_study(db, tmp_path)
    (series,) = cube.manifest()["series"]
    top = series["slices"][0]
    assert len(series["slices"]) == 40
    # One more slice above the top one (a late instance of the same series).
    source = next(ds for ds in cube.sources if str(ds.SOPInstanceUID) == top["SOPInstanceUID"])
    extra = pydicom.dcmread(source.filename)
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    extra.ImagePositionPatient = [*top["position"][:2], top["position"][2] + 1.5]
    extra.InstanceNumber = 41
    path = tmp_path / "late.dcm"
    extra.save_as(path, enforce_file_format=True)
    store_files(db, cube.data_dir, [path])
    (series,) = cube.manifest()["series"]
    assert len(series["slices"]) == 41
    assert series["slices"][0]["SOPInstanceUID"] == str(extra.SOPInstanceUID)
    assert series["slices"][0]["InstanceNumber"] == 41
    assert cube.pixels(0).shape == (64, 64)
