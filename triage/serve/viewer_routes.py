"""The image viewer's API: a study's viewer document, one slice's pixel values and a
finding's overlay on one slice (``triage.viewer`` does the work; these routes are thin).

Pixel and overlay bodies are raw little-endian arrays, row-major, sent gzip-compressed
(``Content-Encoding: gzip``, level 1) with their size and type in ``X-Rows``, ``X-Columns``
and ``X-Pixel-Type``; the browser keeps no copy to reuse unasked (``Cache-Control: private,
no-cache``): a re-analysis replaces an overlay, and a resent instance may replace a slice,
under the same URL (the page holds what it fetched in memory while it is open). The
routes are plain functions, so FastAPI runs the file reads and decoding in its threadpool.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from triage.serve.auth import ViewPatients, audit
from triage.viewer import DEFAULT_CACHE_BYTES, SliceBody, Viewer, ViewerError

router = APIRouter(tags=["viewer"])

OCTET_STREAM: Final[str] = "application/octet-stream"
CACHE_CONTROL: Final[str] = "private, no-cache"
_BINARY: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "content": {OCTET_STREAM: {}},
        "description": "rows x columns values, little-endian, row-major, gzip-compressed"
        " (Content-Encoding: gzip); X-Rows, X-Columns and X-Pixel-Type say the shape and type.",
    },
    404: {"description": "unknown study, series, finding overlay or slice index"},
}
_making = threading.Lock()


def viewer_of(request: Request) -> Viewer:
    """The app's viewer service (made on first use, with ``app.state.viewer_cache_bytes``)."""
    state = request.app.state
    viewer: Viewer | None = getattr(state, "viewer", None)
    if viewer is None:
        with _making:
            viewer = getattr(state, "viewer", None)
            if viewer is None:
                cache_bytes = getattr(state, "viewer_cache_bytes", DEFAULT_CACHE_BYTES)
                viewer = Viewer(state.db, cache_bytes)
                state.viewer = viewer
    return viewer


def _binary(body: SliceBody) -> Response:
    return Response(
        content=body.content,
        media_type=OCTET_STREAM,
        headers={
            "Content-Encoding": "gzip",
            "X-Rows": str(body.rows),
            "X-Columns": str(body.columns),
            "X-Pixel-Type": body.pixel_type,
            "Cache-Control": CACHE_CONTROL,
        },
    )


@router.get("/api/studies/{study_uid}/viewer")
def get_viewer_document(
    study_uid: str, principal: ViewPatients, request: Request
) -> dict[str, Any]:
    """The study for the image viewer: its identifiers and findings, each analysed series
    (slices in display order, superior first for axial CT; the file's window and the head-CT
    presets) with the overlays on it (classes with colours, pixel counts and best slices),
    and what cannot be shown with the reason (``series_unavailable``,
    ``overlays_unavailable``). Each view is recorded in the audit trail."""
    try:
        doc = viewer_of(request).manifest(study_uid)
    except ViewerError as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None
    audit(
        request,
        "study_view",
        principal=principal,
        target_kind="study",
        target=study_uid,
        detail={"viewer": True},
    )
    return doc


@router.get(
    "/api/studies/{study_uid}/series/{series_uid}/pixels/{index}",
    response_class=Response,
    responses=_BINARY,
)
def get_slice_pixels(
    study_uid: str, series_uid: str, index: int, principal: ViewPatients, request: Request
) -> Response:
    """One displayed slice's values (``index`` in the viewer document's order): CT as int16
    Hounsfield units, radiographs as uint16 stored values. 422 when its file cannot be
    decoded (the reason says why)."""
    try:
        return _binary(viewer_of(request).pixels(study_uid, series_uid, index))
    except ViewerError as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None


@router.get(
    "/api/studies/{study_uid}/series/{series_uid}/overlays/{finding}/{index}",
    response_class=Response,
    responses=_BINARY,
)
def get_slice_overlay(
    study_uid: str,
    series_uid: str,
    finding: str,
    index: int,
    principal: ViewPatients,
    request: Request,
) -> Response:
    """A finding's overlay on one displayed slice, uint8: the class value of a segmentation
    (0: none), or the saliency 0..255 of a heatmap; all zeros where it marks nothing."""
    try:
        return _binary(viewer_of(request).overlay(study_uid, series_uid, finding, index))
    except ViewerError as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None
