"""DICOMweb read side: QIDO-RS search and WADO-RS retrieve (``triage.dicomweb``), for a
DICOMweb viewer such as OHIF (docs/dicomweb.md). Permission ``view_patients``.

Audit: a search is one ``query`` record (which keys were matched, never their values: they
may be patient names); metadata is a ``study_view``; instances leaving as files are an
``export``. Frames and rendered images (a viewer asks for hundreds while scrolling) are
part of the view already recorded by the metadata request, and are not recorded one by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from triage.db import Database
from triage.dicomweb import query as qido
from triage.dicomweb import retrieve as wado
from triage.serve.auth import ViewPatients, audit

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _json(docs: list[dict[str, Any]]) -> Response:
    if not docs:
        return Response(status_code=204)
    return Response(json.dumps(docs, separators=(",", ":")), media_type=DICOM_JSON)


def _search(request: Request, principal: Any, level: str, allowed: frozenset[str]) -> qido.Query:
    try:
        query = qido.parse_query(request.query_params.multi_items(), allowed)
    except qido.QueryError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    audit(
        request,
        "query",
        principal=principal,
        target_kind="study",
        target=request.path_params.get("study_uid"),
        detail={"level": level, "keys": sorted(query.filters)},
    )
    return query


@router.get("/studies")
def search_studies(principal: ViewPatients, request: Request) -> Response:
    """QIDO-RS: search for studies (PatientID, PatientName, AccessionNumber, StudyDate,
    StudyInstanceUID, StudyDescription, ModalitiesInStudy; limit, offset)."""
    query = _search(request, principal, "study", qido.STUDY_KEYS)
    return _json(qido.search_studies(_db(request), query, _base(request)))


@router.get("/series")
def search_all_series(principal: ViewPatients, request: Request) -> Response:
    """QIDO-RS: search for series of any study (series and study keys)."""
    query = _search(request, principal, "series", qido.SERIES_KEYS | qido.STUDY_KEYS)
    return _json(qido.search_series(_db(request), None, query, _base(request)) or [])


@router.get("/studies/{study_uid}/series")
def search_series(study_uid: str, principal: ViewPatients, request: Request) -> Response:
    """QIDO-RS: search for a study's series (the AI's SEG and SR included)."""
    query = _search(request, principal, "series", qido.SERIES_KEYS)
    found = qido.search_series(_db(request), study_uid, query, _base(request))
    if found is None:
        raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
    return _json(found)


@router.get("/studies/{study_uid}/instances")
def search_study_instances(study_uid: str, principal: ViewPatients, request: Request) -> Response:
    """QIDO-RS: search for a study's instances."""
    query = _search(request, principal, "instance", qido.INSTANCE_KEYS)
    found = qido.search_instances(_db(request), study_uid, None, query, _base(request))
    if found is None:
        raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
    return _json(found)


@router.get("/studies/{study_uid}/series/{series_uid}/instances")
def search_series_instances(
    study_uid: str, series_uid: str, principal: ViewPatients, request: Request
) -> Response:
    """QIDO-RS: search for a series' instances."""
    query = _search(request, principal, "instance", qido.INSTANCE_KEYS)
    found = qido.search_instances(_db(request), study_uid, series_uid, query, _base(request))
    if found is None:
        raise HTTPException(status_code=404, detail="unknown study or series")
    return _json(found)


def _paths(
    request: Request, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[Path]:
    paths = qido.instance_paths(_db(request), study_uid, series_uid, sop_uid)
    if not paths:
        raise HTTPException(status_code=404, detail="unknown study, series or instance")
    return paths


def _instances(request: Request, principal: Any, paths: list[Path], study_uid: str) -> Response:
    audit(
        request,
        "export",
        principal=principal,
        target_kind="study",
        target=study_uid,
        detail={"dicomweb": "instances", "count": len(paths)},
    )
    mark = wado.boundary()
    parts = list(wado.instance_parts(paths))
    return StreamingResponse(
        wado.multipart(parts, mark),
        media_type=f'multipart/related; type="application/dicom"; boundary={mark}',
    )


def _metadata(request: Request, principal: Any, paths: list[Path], study_uid: str) -> Response:
    audit(
        request,
        "study_view",
        principal=principal,
        target_kind="study",
        target=study_uid,
        detail={"dicomweb": "metadata", "count": len(paths)},
    )
    return Response(json.dumps(wado.metadata(paths), separators=(",", ":")), media_type=DICOM_JSON)


@router.get("/studies/{study_uid}")
def retrieve_study(study_uid: str, principal: ViewPatients, request: Request) -> Response:
    """WADO-RS: every instance of the study, as stored (multipart/related)."""
    return _instances(request, principal, _paths(request, study_uid), study_uid)


@router.get("/studies/{study_uid}/metadata")
def study_metadata(study_uid: str, principal: ViewPatients, request: Request) -> Response:
    """WADO-RS: the study's instance headers as DICOM JSON."""
    return _metadata(request, principal, _paths(request, study_uid), study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}")
def retrieve_series(
    study_uid: str, series_uid: str, principal: ViewPatients, request: Request
) -> Response:
    """WADO-RS: every instance of the series, as stored."""
    return _instances(request, principal, _paths(request, study_uid, series_uid), study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata")
def series_metadata(
    study_uid: str, series_uid: str, principal: ViewPatients, request: Request
) -> Response:
    """WADO-RS: the series' instance headers as DICOM JSON."""
    return _metadata(request, principal, _paths(request, study_uid, series_uid), study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}")
def retrieve_instance(
    study_uid: str, series_uid: str, sop_uid: str, principal: ViewPatients, request: Request
) -> Response:
    """WADO-RS: one instance, as stored."""
    paths = _paths(request, study_uid, series_uid, sop_uid)
    return _instances(request, principal, paths, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata")
def instance_metadata(
    study_uid: str, series_uid: str, sop_uid: str, principal: ViewPatients, request: Request
) -> Response:
    """WADO-RS: one instance's header as DICOM JSON."""
    paths = _paths(request, study_uid, series_uid, sop_uid)
    return _metadata(request, principal, paths, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}")
def retrieve_frames(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    frame_list: str,
    principal: ViewPatients,
    request: Request,
) -> Response:
    """WADO-RS: frames (1-based, comma-separated), decoded to Explicit VR Little Endian
    bytes, one part each."""
    path = _paths(request, study_uid, series_uid, sop_uid)[0]
    try:
        data = wado.frames(path, wado.frame_numbers(frame_list))
    except wado.RetrieveError as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None
    mark = wado.boundary()
    content = f"application/octet-stream; transfer-syntax={wado.EXPLICIT_LE}"
    return StreamingResponse(
        wado.multipart([(content, d) for d in data], mark),
        media_type=f'multipart/related; type="application/octet-stream"; boundary={mark}',
    )


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/rendered")
def rendered(
    study_uid: str, series_uid: str, sop_uid: str, principal: ViewPatients, request: Request
) -> Response:
    """WADO-RS: the instance's first frame rendered as PNG (its own window)."""
    path = _paths(request, study_uid, series_uid, sop_uid)[0]
    try:
        png = wado.rendered_png(path)
    except wado.RetrieveError as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None
    return Response(png, media_type="image/png")
