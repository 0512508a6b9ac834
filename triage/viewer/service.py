"""The viewer's service: the manifest, one slice's pixels, one slice's overlay; what the
routes (``triage.serve.viewer_routes``) call.

Everything read from disk goes through one bounded cache (:class:`~triage.viewer.cache.
ByteLRU`): series layouts (keyed by the series' instance state, so a late or replaced
instance lays the series out again), overlays laid on the source images (keyed by the
overlay file's size and modification time too, so a new analysis is picked up), and
slices as served (compressed). Failures that depend only on the files (a series that cannot
be laid out, an overlay without geometry, a cut-short frame) are kept too, so that a broken
series is not read again on every request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom

from triage.db import Database
from triage.preprocess.ct_headers import read_headers
from triage.preprocess.errors import PreprocessError
from triage.results import load_overlay
from triage.viewer.cache import ByteLRU
from triage.viewer.manifest import SeriesEntry, build_manifest
from triage.viewer.overlays import MappedOverlay, OverlayUnavailable, map_overlay, overlay_series
from triage.viewer.pixels import decode_pixels, gzip_body
from triage.viewer.series import (
    FindingRecord,
    SeriesLayout,
    SliceRef,
    StudyIndex,
    build_layout,
    instance_files,
    load_study,
)

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "NotFound",
    "SliceBody",
    "Unavailable",
    "Viewer",
    "ViewerError",
]

DEFAULT_CACHE_BYTES: Final[int] = 512 * 1024**2
STUDY_TTL_S: Final[float] = 2.0
"""Slice and overlay requests reuse a study's index rows read this recently (the viewer
document always reads them afresh): a browser asks for hundreds of slices in a few seconds."""
_FAILURE_BYTES: Final[int] = 512
_HEADER_BYTES: Final[int] = 32 * 1024  # about what one CT header holds in memory (measured 28 KB)
_STUDIES_KEPT: Final[int] = 256


class ViewerError(Exception):
    """A request the viewer cannot answer; ``status`` is the HTTP status, the message says
    why (identifiers and counts, no patient data)."""

    status = 500


class NotFound(ViewerError):
    status = 404


class Unavailable(ViewerError):
    """The study, series or slice exists but cannot be shown (unreadable or damaged files)."""

    status = 422


@dataclass(frozen=True)
class _Failure:
    reason: str


@dataclass(frozen=True)
class SliceBody:
    """A slice as sent: gzip-compressed little-endian values, row-major."""

    content: bytes
    rows: int
    columns: int
    pixel_type: str


class Viewer:
    """The viewer's reads of one database's studies, with their cache.

    Args:
        db: the database (index rows, findings).
        cache_bytes: the cache's budget (``TRIAGE_VIEWER_CACHE_BYTES``).
    """

    def __init__(self, db: Database, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.db = db
        self.cache = ByteLRU(cache_bytes)
        self._studies: dict[str, tuple[float, StudyIndex]] = {}
        self._studies_lock = threading.Lock()

    # --- lookups ---------------------------------------------------------------------------

    def _study(self, study_uid: str, *, fresh: bool = False) -> StudyIndex:
        """The study's index rows: read now with ``fresh``, else possibly read within the
        last ``STUDY_TTL_S`` seconds."""
        now = time.monotonic()
        if not fresh:
            with self._studies_lock:
                kept = self._studies.get(study_uid)
            if kept is not None and now - kept[0] < STUDY_TTL_S:
                return kept[1]
        study = load_study(self.db, study_uid)
        if study is None:
            raise NotFound("unknown StudyInstanceUID")
        with self._studies_lock:
            if len(self._studies) >= _STUDIES_KEPT:
                self._studies = {k: v for k, v in self._studies.items() if now - v[0] < STUDY_TTL_S}
                if len(self._studies) >= _STUDIES_KEPT:
                    self._studies.clear()
            self._studies[study_uid] = (now, study)
        return study

    def _layout(self, study: StudyIndex, series_uid: str) -> tuple[SeriesLayout, tuple[Any, ...]]:
        """The series laid out, and the key its state is cached under."""
        record = study.series.get(series_uid)
        if record is None:
            raise NotFound("no such series in this study")
        preferred = () if record.Modality == "CT" else study.preferred_images(series_uid)
        key = ("layout", series_uid, record.version, preferred)

        def make() -> tuple[SeriesLayout | _Failure, int]:
            files = instance_files(self.db, series_uid)
            headers: list[pydicom.Dataset] | None = None
            try:
                if record.Modality == "CT" and files:
                    headers = read_headers([path for _, path in files])
                layout = build_layout(record, files, preferred, headers=headers)
            except PreprocessError as exc:
                return _Failure(str(exc)), _FAILURE_BYTES
            if headers is not None:  # for laying its overlays on it, next
                self.cache.put(("headers", key), headers, _HEADER_BYTES * len(headers))
            return layout, layout.nbytes

        found = self.cache.get_or_make(key, make)
        if isinstance(found, _Failure):
            raise Unavailable(f"the series cannot be shown: {found.reason}")
        return found, key

    @staticmethod
    def _slice(layout: SeriesLayout, index: int) -> SliceRef:
        if not 0 <= index < len(layout.slices):
            raise NotFound(f"no slice {index} in this series ({len(layout.slices)} slices)")
        return layout.slices[index]

    @staticmethod
    def _finding_series(finding: FindingRecord) -> str | None:
        """The series a finding's overlay lies on: the finding's, else the one its file names
        (rows written before findings named their series)."""
        if finding.SeriesInstanceUID:
            return finding.SeriesInstanceUID
        if not finding.mask_path:
            return None
        try:
            return overlay_series(Path(finding.mask_path)) or None
        except Exception:  # a missing or unreadable file: reported when it is mapped
            return None

    def _mapped(
        self,
        study: StudyIndex,
        finding: FindingRecord,
        layout: SeriesLayout,
        layout_key: tuple[Any, ...],
    ) -> tuple[MappedOverlay, tuple[Any, ...]]:
        """The finding's overlay laid on the series' displayed slices, and its cache key.

        Raises:
            Unavailable: its file is missing or unreadable, or it cannot be placed.
        """
        assert finding.mask_path is not None
        path = Path(finding.mask_path)
        try:
            stat = path.stat()
        except OSError:
            raise Unavailable("the overlay file is missing") from None
        key = (
            "overlay",
            study.StudyInstanceUID,
            finding.finding,
            finding.model_name,
            str(path),
            stat.st_mtime_ns,
            stat.st_size,
            layout_key,
        )

        def make() -> tuple[MappedOverlay | _Failure, int]:
            try:
                overlay = load_overlay(path)
            except Exception as exc:
                return _Failure(
                    f"the overlay file cannot be read ({type(exc).__name__})"
                ), _FAILURE_BYTES
            headers = self.cache.get(("headers", layout_key))
            try:
                mapped = map_overlay(overlay, layout, headers)
            except OverlayUnavailable as exc:
                return _Failure(str(exc)), _FAILURE_BYTES
            return mapped, mapped.nbytes

        found = self.cache.get_or_make(key, make)
        if isinstance(found, _Failure):
            raise Unavailable(found.reason)
        return found, key

    # --- the three reads -------------------------------------------------------------------

    def manifest(self, study_uid: str) -> dict[str, Any]:
        """The viewer document of a study (:func:`triage.viewer.manifest.build_manifest`).

        Raises:
            NotFound: unknown study.
        """
        study = self._study(study_uid, fresh=True)
        with_overlay = [f for f in study.findings if f.mask_path]
        series_of = {id(f): self._finding_series(f) for f in with_overlay}
        legacy = [u for u in series_of.values() if u and u in study.series]
        uids = list(dict.fromkeys([*study.analysed, *legacy]))
        layouts: dict[str, tuple[SeriesLayout, tuple[Any, ...]]] = {}
        series_unavailable: list[tuple[str, str]] = []
        for uid in uids:
            try:
                layouts[uid] = self._layout(study, uid)
            except ViewerError as exc:
                series_unavailable.append((uid, str(exc)))
        on_series: dict[str, list[tuple[FindingRecord, MappedOverlay]]] = {u: [] for u in layouts}
        overlays_unavailable: list[tuple[str, str]] = []
        for f in with_overlay:
            on = series_of[id(f)]
            if on is None or on not in study.series:
                reason = "the overlay names no series of this study"
                overlays_unavailable.append((f.finding, reason))
                continue
            if on not in layouts:
                overlays_unavailable.append((f.finding, "its series cannot be shown"))
                continue
            layout, key = layouts[on]
            try:
                on_series[on].append((f, self._mapped(study, f, layout, key)[0]))
            except ViewerError as exc:
                overlays_unavailable.append((f.finding, str(exc)))
        return build_manifest(
            study,
            [SeriesEntry(layouts[u][0], on_series[u]) for u in layouts],
            series_unavailable=series_unavailable,
            overlays_unavailable=overlays_unavailable,
        )

    def pixels(self, study_uid: str, series_uid: str, index: int) -> SliceBody:
        """One displayed slice's values (:mod:`triage.viewer.pixels`), compressed.

        Raises:
            NotFound: unknown study, series or index.
            Unavailable: the series or the slice cannot be read or decoded.
        """
        study = self._study(study_uid)
        layout, layout_key = self._layout(study, series_uid)
        ref = self._slice(layout, index)

        def make() -> tuple[SliceBody | _Failure, int]:
            try:
                values = decode_pixels(layout, ref)
            except PreprocessError as exc:
                return _Failure(str(exc)), _FAILURE_BYTES
            body = SliceBody(gzip_body(values), layout.rows, layout.columns, layout.pixel_type)
            return body, len(body.content) + 256

        found = self.cache.get_or_make(("pixels", layout_key, index), make)
        if isinstance(found, _Failure):
            raise Unavailable(f"slice {index} cannot be shown: {found.reason}")
        return found

    def overlay(self, study_uid: str, series_uid: str, finding: str, index: int) -> SliceBody:
        """A finding's overlay on one displayed slice, uint8, compressed (zeros where it marks
        nothing).

        Raises:
            NotFound: unknown study, series, finding overlay on that series, or index; an
                overlay that cannot be shown (the manifest says why).
        """
        study = self._study(study_uid)
        candidates = [
            f
            for f in study.findings
            if f.finding == finding and f.mask_path and self._finding_series(f) == series_uid
        ]
        if not candidates:
            raise NotFound("no overlay of this finding on this series")
        layout, layout_key = self._layout(study, series_uid)
        self._slice(layout, index)
        try:
            mapped, key = self._mapped(study, candidates[0], layout, layout_key)
        except Unavailable as exc:
            raise NotFound(f"the overlay cannot be shown: {exc}") from None

        def compress() -> tuple[bytes, int]:
            body = gzip_body(mapped.slice(index))
            return body, len(body) + 256

        # Nothing on this slice: the same zeros for every such slice of this size.
        content: bytes = self.cache.get_or_make(
            ("overlay-body", key, index) if index in mapped.slices else ("zeros", mapped.shape),
            compress,
        )
        return SliceBody(content, layout.rows, layout.columns, "uint8")
