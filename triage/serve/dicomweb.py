"""DICOMweb STOW-RS: ``POST /dicomweb/studies[/{study_uid}]`` (PS3.18 10.5 Store Transaction).

Supported:

* ``Content-Type: multipart/related; type="application/dicom"; boundary=...`` (the ``type``
  parameter may be quoted, unquoted or absent; the boundary may be quoted). Each part is
  ``Content-Type: application/dicom`` (a ``transfer-syntax`` parameter is accepted and
  ignored: files are stored as received) holding one DICOM Part 10 file; a part without a
  Content-Type header is taken as ``application/dicom``. Line breaks are CRLF as RFC 2046
  requires; bare LF around boundaries and headers is tolerated.
* Every instance goes through :meth:`triage.ingest.store.Ingestor.ingest`, the same path as
  the C-STORE SCP: validated, written durably, indexed; rejected input is kept in
  quarantine (``GET /api/quarantine``).
* With ``{study_uid}`` in the path, an instance of another study is not stored: it is kept
  in quarantine and answered with Failure Reason 0xA900. PS3.18 Table I.2-2 defines no code
  for this case; 0xA9xx ("Data Set does not match") is the closest standard range (other
  implementations use private codes, e.g. 0xA901 or 0xC409).
* The response is the Store Instances Response Module (PS3.18 Annex I) as
  ``application/dicom+json``: Referenced SOP Sequence (with Warning Reason for instances
  stored with a warning), Failed SOP Sequence (with Failure Reason, the DICOM status code).
  Retrieve URL (Type 2) is present but empty: there is no WADO-RS retrieve here. Reasons
  in words are in the quarantine listing, never in the response (it carries no free text);
  a ``Warning: 299`` header points there when something failed.
* HTTP status: 200 all stored (a resend of a stored instance counts as stored), 202 some
  stored with failures or warnings, 409 nothing stored, 503 (with ``Retry-After``) nothing
  stored and every failure is "out of resources" (0xA7xx, the disk is full: retry later),
  400 unparseable multipart body, 413 body over ``app.state.max_upload_bytes``, 415 another
  request media type. An unexpected error while storing one part (the database is down)
  fails that part with 0xA700 instead of failing the whole request with a 500.

Not supported: the metadata + bulk data form of STOW-RS (``application/dicom+json`` or
``application/dicom+xml`` parts with ``application/octet-stream`` bulk data); such parts get
a Failed SOP Sequence item (Failure Reason 0xC000) and are kept in quarantine. Content
transfer encodings other than binary / 8bit / 7bit, XML responses and Accept negotiation
are not supported either.

Nothing from inside the data sets (patient data, UIDs) is logged or put in error bodies.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from triage.auth.roles import Permission
from triage.ingest.store import Ingestor, IngestOutcome, StoreStatus
from triage.serve.auth import require
from triage.serve.budget import ByteBudget
from triage.serve.multipart import (
    DICOM,
    Body,
    MultipartError,
    Part,
    parse_media_type,
    split_multipart,
)
from triage.serve.spool import BodyTooLarge, DiskReserve, InvalidLength, spool_body

log = logging.getLogger(__name__)

# Storing needs the ``ingest`` permission (an integration account's token, or an admin).
stow_router = APIRouter(tags=["dicomweb"], dependencies=[Depends(require(Permission.ingest))])

DICOM_JSON = "application/dicom+json"
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_IDENTITY_ENCODINGS = {"", "binary", "8bit", "7bit"}
UNSUPPORTED_PART_REASON = "unsupported part media type (only application/dicom parts are stored)"


def is_uid(text: str) -> bool:
    """A syntactically valid UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def _uid_or_none(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip("\0 ")
    return text if is_uid(text) else None


def store_part(
    ingestor: Ingestor, body: Body, part: Part, *, source: str, study_uid: str | None
) -> IngestOutcome:
    """Store one part (blocking file I/O: run it in a worker thread); never raises."""
    data = bytes(body[part.start : part.end])  # the one copy in memory, one part at a time
    if part.media_type != DICOM or part.transfer_encoding not in _IDENTITY_ENCODINGS:
        # Not stored, but kept in quarantine: nothing is silently dropped.
        return ingestor.refuse(
            data,
            source=source,
            reason=UNSUPPORTED_PART_REASON,
            status=StoreStatus.cannot_understand,
        )
    problem = part.length_problem
    if problem:
        return ingestor.refuse(
            data, source=source, reason=problem, status=StoreStatus.cannot_understand
        )
    return ingestor.ingest(data, source=source, expected_study=study_uid)


def response_dataset(outcomes: list[IngestOutcome]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table I.1-1) for these outcomes."""
    ds = Dataset()
    ds.RetrieveURL = None  # Type 2, empty: no WADO-RS retrieve is offered
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for outcome in outcomes:
        item = Dataset()
        sop_class = _uid_or_none(outcome.SOPClassUID)
        sop_instance = _uid_or_none(outcome.SOPInstanceUID)
        if sop_class is not None:
            item.ReferencedSOPClassUID = sop_class
        if sop_instance is not None:
            item.ReferencedSOPInstanceUID = sop_instance
        if outcome.status.stored:
            item.RetrieveURL = None
            if outcome.status != StoreStatus.success:
                item.WarningReason = int(outcome.status)
            referenced.append(item)
        else:
            item.FailureReason = int(outcome.status)
            failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def http_status(outcomes: list[IngestOutcome]) -> int:
    """200 all stored, 202 partly or with warnings, 409 none (503 none, out of resources)."""
    stored = [o for o in outcomes if o.status.stored]
    if len(stored) == len(outcomes):
        return 200 if all(o.status == StoreStatus.success for o in stored) else 202
    if stored:
        return 202
    if all(0xA700 <= o.status < 0xA800 for o in outcomes):
        return 503
    return 409


async def _stow(request: Request, study_uid: str | None) -> Response:
    media_type, params = parse_media_type(request.headers.get("content-type", ""))
    root_type = params.get("type", DICOM).strip().lower()
    if media_type != "multipart/related" or root_type != DICOM:
        raise HTTPException(
            status_code=415,
            detail='expected Content-Type: multipart/related; type="application/dicom"',
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise HTTPException(status_code=400, detail="multipart/related without a boundary")
    if study_uid is not None and not is_uid(study_uid):
        raise HTTPException(status_code=400, detail="the StudyInstanceUID in the URL is invalid")
    ingestor: Ingestor = request.app.state.ingestor
    budget: ByteBudget = request.app.state.stow_budget
    try:
        spooled = await spool_body(
            request.stream(),
            ingestor.tmp_dir,
            declared_length=request.headers.get("content-length"),
            limit=request.app.state.max_upload_bytes,
            min_free_bytes=ingestor.min_free_bytes,
        )
    except BodyTooLarge as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None
    except InvalidLength as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    except DiskReserve as exc:
        log.error("STOW-RS request refused: %s", exc)
        raise HTTPException(
            status_code=503, detail=str(exc), headers={"Retry-After": "60"}
        ) from None
    client = request.client.host if request.client is not None else "unknown"
    source = f"stow:{client}"
    outcomes: list[IngestOutcome] = []
    try:
        with spooled.opened() as body:
            try:
                parts = await run_in_threadpool(split_multipart, body, boundary)
            except MultipartError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
            for part in parts:
                async with budget.hold(part.end - part.start):
                    outcomes.append(
                        await run_in_threadpool(
                            store_part, ingestor, body, part, source=source, study_uid=study_uid
                        )
                    )
    finally:
        spooled.remove()
    status = http_status(outcomes)
    n_failed = sum(1 for o in outcomes if not o.status.stored)
    codes = sorted({f"0x{int(o.status):04X}" for o in outcomes})
    log.info(
        "STOW-RS from %s: %d part(s), %d stored, %d failed, statuses %s -> HTTP %d",
        source,
        len(outcomes),
        len(outcomes) - n_failed,
        n_failed,
        ",".join(codes),
        status,
    )
    headers: dict[str, str] = {}
    if n_failed:
        headers["Warning"] = f'299 triage "{n_failed} instance(s) failed; see GET /api/quarantine"'
    if status == 503:
        headers["Retry-After"] = "60"
    content = json.dumps(response_dataset(outcomes).to_json_dict())
    return Response(content=content, status_code=status, media_type=DICOM_JSON, headers=headers)


@stow_router.post("/dicomweb/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request) -> Response:
    """Store DICOM instances (multipart/related; type="application/dicom")."""
    return await _stow(request, None)


@stow_router.post("/dicomweb/studies/{study_uid}", summary="STOW-RS: store instances of a study")
async def store_study_instances(study_uid: str, request: Request) -> Response:
    """Store DICOM instances that belong to ``study_uid``; others are refused."""
    return await _stow(request, study_uid)
