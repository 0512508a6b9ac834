"""A study's DICOM results (SEG, TID 1500 SR) over HTTP: the list with each destination's
export state, and the download of one object (audited as an export)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from triage.db import Database
from triage.dicomout.index import find_result, results_document
from triage.serve.auth import ViewPatients, audit

router = APIRouter(tags=["results"])

DICOM_MEDIA_TYPE = "application/dicom"


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


@router.get("/api/studies/{study_uid}/results")
def list_results(study_uid: str, principal: ViewPatients, request: Request) -> dict[str, Any]:
    """The study's DICOM results (Segmentation ``seg``, measurement report ``sr``): UIDs, the
    finding and model, the download address and, per configured destination, the export's
    ``state`` (``pending``, ``sent``, ``failed``), attempts, next attempt, last error and when
    it was sent; ``outcomes`` says, per model and finding, whether results were ``made`` or
    why they ``failed``."""
    doc = results_document(_db(request), study_uid)
    if doc is None:
        raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
    return doc


@router.get(
    "/api/studies/{study_uid}/results/{sop_instance_uid}",
    response_class=FileResponse,
    responses={200: {"content": {DICOM_MEDIA_TYPE: {}}, "description": "A DICOM Part 10 file."}},
)
def download_result(
    study_uid: str, sop_instance_uid: str, principal: ViewPatients, request: Request
) -> FileResponse:
    """One DICOM result of the study as a Part 10 file (``application/dicom``). Recorded in
    the audit trail as an export of the study."""
    found = find_result(_db(request), study_uid=study_uid, sop_instance_uid=sop_instance_uid)
    if found is None:
        raise HTTPException(status_code=404, detail="no such DICOM result of this study")
    if not found.path.is_file():
        raise HTTPException(status_code=404, detail="the result's file is missing")
    audit(
        request,
        "export",
        principal=principal,
        target_kind="study",
        target=study_uid,
        detail={"SOPInstanceUID": found.SOPInstanceUID, "kind": found.kind},
    )
    return FileResponse(
        found.path,
        media_type=DICOM_MEDIA_TYPE,
        filename=f"{found.kind}-{found.SOPInstanceUID}.dcm",
    )
