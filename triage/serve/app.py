"""The HTTP API and web page (FastAPI). Routes are thin: they call ``triage.worklist``."""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import DataError

from triage import __version__
from triage.audit.chain import Outcome
from triage.auth.roles import Permission
from triage.auth.sessions import resolve_session
from triage.db import Database
from triage.db.tables import FindingRow, StudyRow
from triage.domain import FeedbackVerdict
from triage.events import outbox
from triage.events.fhir import task_from_item
from triage.events.publisher import study_item
from triage.events.visibility import visible, without_patient_identifiers
from triage.ingest.store import Ingestor
from triage.serve import (
    admin,
    dicomweb_read,
    docs,
    results_routes,
    security,
    signin,
    viewer_routes,
)
from triage.serve.auth import (
    SESSION_COOKIE,
    AuditInTransaction,
    AuthConfig,
    Claim,
    Review,
    ViewEvents,
    ViewPatients,
    ViewQuarantine,
    audit,
    document_permissions,
    signed_in_now,
)
from triage.serve.health import HealthReport
from triage.worklist import acknowledgements, feedback, queue, service
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_SCRIPTS = frozenset({"login.js", "admin.js", "viewer.js"})
MAX_PAGE = 1000
"""The most worklist items one request may ask for (`GET /api/worklist?limit=`)."""


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(get_db)]


_MIN_LEASE_S = queue.MIN_LEASE.total_seconds()
_MAX_LEASE_S = queue.MAX_LEASE.total_seconds()


class ClaimRequest(BaseModel):
    """The reader is the signed-in account; a ``reader`` in the body is ignored."""

    lease_seconds: float | None = Field(
        default=None,
        description=f"How long the claim lasts without renewal, {_MIN_LEASE_S:g} to"
        f" {_MAX_LEASE_S:g} s (default: the server's TRIAGE_CLAIM_LEASE_SECONDS).",
    )

    @field_validator("lease_seconds")
    @classmethod
    def _lease_in_range(cls, value: float | None) -> float | None:
        # NaN and the infinities parse as JSON numbers in Python; they are refused here.
        if value is not None and not (
            math.isfinite(value) and _MIN_LEASE_S <= value <= _MAX_LEASE_S
        ):
            raise ValueError(
                f"lease_seconds must be a number of seconds from {_MIN_LEASE_S:g} to"
                f" {_MAX_LEASE_S:g}"
            )
        return value


FINDING_CODE = r"^[a-z][a-z0-9_]{0,63}$"
"""A finding's code (``intracranial_haemorrhage``): anything else is refused with 422 before
it reaches the database (PostgreSQL refuses NUL in text, and no code holds one)."""
UID = r"^[0-9][0-9.]{0,63}$"


class AcknowledgeRequest(BaseModel):
    finding: str = Field(
        pattern=FINDING_CODE, description="The flagged finding, e.g. intracranial_haemorrhage."
    )


class FeedbackRequest(BaseModel):
    """A judgement of one AI finding; the reader is the signed-in account."""

    finding: str = Field(pattern=FINDING_CODE, description="The finding's code.")
    verdict: FeedbackVerdict
    comment: str | None = Field(default=None, max_length=feedback.MAX_COMMENT)
    model: str | None = Field(
        default=None, max_length=64, description="Which model's finding, when several reported it."
    )
    SOPInstanceUID: str | None = Field(
        default=None, pattern=UID, description="missed: the image where the reader sees it."
    )
    InstanceNumber: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="missed: the slice number the reader saw."
    )


class NextRequest(ClaimRequest):
    modalities: list[str] = Field(default_factory=list)
    subspecialties: list[str] = Field(default_factory=list)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as text: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for an invalid request, with the rejected input made JSON-safe: a body
    holding ``NaN`` or ``Infinity`` (which Python's JSON parser accepts) would otherwise
    turn the 422 into a 500."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(errors))})


async def database_refused_value(request: Request, exc: Exception) -> JSONResponse:
    """400 for a request value the database cannot store or compare (PostgreSQL refuses
    text holding NUL), wherever a route let one through: the client's mistake, not a 500."""
    return JSONResponse(
        status_code=400,
        content={"detail": "a value in the request cannot be used (control characters?)"},
    )


def viewer_url(template: str | None, study: dict[str, Any]) -> str | None:
    """The study's link into the site's viewer: the template with its identifiers filled in
    (URL-encoded); None without a template, or when it needs an accession number the study
    lacks."""
    if template is None:
        return None
    url = template
    for name in ("StudyInstanceUID", "AccessionNumber"):
        if "{" + name + "}" in url:
            value = study.get(name)
            if not value:
                return None
            url = url.replace("{" + name + "}", quote(str(value), safe=""))
    return url


def create_app(
    db: Database,
    *,
    ingestor: Ingestor | None = None,
    max_upload_bytes: int = 1024**3,
    stow_memory_bytes: int = 512 * 1024**2,
    policy: PolicyConfig = DEFAULT_POLICY,
    lease_seconds: float = 900.0,
    health_check: Callable[[], HealthReport] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    auth: AuthConfig | None = None,
    viewer_url_template: str | None = None,
    viewer_cache_bytes: int = 512 * 1024**2,
) -> FastAPI:
    """Build the app around an open (migrated) database.

    Args:
        db: the database.
        ingestor: when given, DICOMweb STOW-RS (``POST /dicomweb/studies``) stores through it.
        max_upload_bytes: the largest STOW-RS request body accepted (spooled to disk).
        stow_memory_bytes: the most bytes of STOW-RS parts held in memory at once while
            they are checked and stored, over all requests (``triage.serve.budget``).
        health_check: checks every component for ``/api/health`` (``triage.serve.health``);
            None: the route answers ok whenever the app runs.
        allowed_hosts: the ``Host`` names answered (``triage.serve.security``); None: any.
        auth: sessions and directory sign-in (``triage.serve.auth``); None: the defaults,
            local accounts only.
        viewer_url_template: the site's PACS viewer URL with ``{StudyInstanceUID}`` and/or
            ``{AccessionNumber}`` (the study document's ``viewer_url``); None: no link.
        viewer_cache_bytes: memory the image viewer (``/viewer``) keeps of decoded slices
            and overlays (``triage.viewer``).
    """
    app = FastAPI(title="triage", version=__version__, docs_url=None, redoc_url=None)
    security.install(app, hosts=allowed_hosts, page=STATIC_DIR / "index.html")
    docs.install(app)
    app.state.db = db
    app.state.policy = policy
    app.state.lease_seconds = lease_seconds
    app.state.auth = auth or AuthConfig()
    app.include_router(signin.router)
    app.include_router(admin.router)
    app.include_router(results_routes.router)
    app.include_router(dicomweb_read.router)
    app.state.viewer_cache_bytes = viewer_cache_bytes
    app.include_router(viewer_routes.router)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(DataError, database_refused_value)
    if ingestor is not None:
        from triage.serve.budget import ByteBudget
        from triage.serve.dicomweb import stow_router

        app.state.ingestor = ingestor
        app.state.max_upload_bytes = max_upload_bytes
        app.state.stow_budget = ByteBudget(stow_memory_bytes)
        app.include_router(stow_router)

    @app.get("/api/health")
    def health() -> JSONResponse:
        """Each component's state (database, DICOM listener, worker, disk): 200 when all
        are healthy, else 503 with ``failing`` naming those that are not."""
        if health_check is None:
            return JSONResponse({"status": "ok", "version": __version__})
        report = health_check()
        return JSONResponse(report.to_json(__version__), status_code=200 if report.ok else 503)

    @app.get("/api/worklist")
    def get_worklist(
        principal: ViewPatients,
        db: DB,
        request: Request,
        modality: Annotated[list[str] | None, Query()] = None,
        subspecialty: Annotated[list[str] | None, Query()] = None,
        include_completed: bool = False,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Items per page.")] = 100,
        offset: Annotated[int, Query(ge=0, description="Items to skip.")] = 0,
    ) -> dict[str, Any]:
        """One page of the reading worklist in reading order (filters:
        ``?modality=CT&subspecialty=neuro``; pages: ``?limit=100&offset=0``). ``total`` is
        the number of studies the filters admit, ``next_offset`` the next page's offset
        (null after the last page); ``rank`` counts from 1 in the filtered list."""
        return service.worklist(
            db,
            config=request.app.state.policy,
            modalities=modality or (),
            subspecialties=subspecialty or (),
            include_completed=include_completed,
            limit=limit,
            offset=offset,
        )

    @app.post("/api/worklist/next")
    def claim_next(
        principal: Claim, db: DB, request: Request, body: NextRequest | None = None
    ) -> Response:
        """Claim, for the signed-in reader, the first study in reading order they may take
        (204: none waiting). The body is optional."""
        body = body or NextRequest()
        record = AuditInTransaction(request, "claim", principal=principal, detail={"next": True})
        try:
            item = queue.claim_next(
                db,
                principal.username,
                modalities=body.modalities,
                subspecialties=body.subspecialties,
                lease=timedelta(seconds=body.lease_seconds or request.app.state.lease_seconds),
                config=request.app.state.policy,
                record=record,
            )
        except queue.ClaimError as exc:
            audit(
                request,
                "claim",
                principal=principal,
                outcome=Outcome.failure,
                target_kind="study",
                detail={"next": True, "reason": str(exc)},
            )
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        if item is None:
            return Response(status_code=204)
        record.committed()
        return JSONResponse(item)

    @app.post("/api/studies/{study_uid}/acknowledge")
    def acknowledge(
        study_uid: str, body: AcknowledgeRequest, principal: Claim, db: DB, request: Request
    ) -> dict[str, Any]:
        """Acknowledge a critical-finding alert: the signed-in reader has seen that the AI
        flagged ``finding`` on this study. Kept with who and when (the worklist and study
        documents list it under ``acknowledged``; the page raises no banner for it again)
        and recorded in the audit trail; 404 when the study has no such finding."""
        kept = acknowledgements.acknowledge(db, study_uid, body.finding, principal.username)
        if kept is None:
            raise HTTPException(status_code=404, detail="no such finding on this study")
        record = audit(
            request,
            "acknowledge",
            principal=principal,
            target_kind="study",
            target=study_uid,
            detail={"finding": body.finding},
        )
        return {
            "StudyInstanceUID": study_uid,
            "finding": body.finding,
            "acknowledged_by": kept["by"],
            "acknowledged_at": kept["at"],
            "audit_record": record,
        }

    @app.post("/api/studies/{study_uid}/feedback", status_code=201)
    def post_feedback(
        study_uid: str, body: FeedbackRequest, principal: Review, db: DB, request: Request
    ) -> JSONResponse:
        """Judge an AI finding: ``agree``, ``disagree``, or ``missed`` (with the slice). Kept
        with the reader, the time and the model, version and weights that produced the
        finding; audited. 404: unknown study, finding or image."""
        item = feedback.FeedbackInput(
            finding=body.finding,
            verdict=body.verdict,
            comment=body.comment,
            model=body.model,
            SOPInstanceUID=body.SOPInstanceUID,
            InstanceNumber=body.InstanceNumber,
        )
        try:
            record = feedback.record_feedback(db, study_uid, principal.username, item)
        except feedback.FeedbackError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        audit(
            request,
            "feedback",
            principal=principal,
            target_kind="study",
            target=study_uid,
            detail={"finding": body.finding, "verdict": body.verdict.value},
        )
        return JSONResponse(record, status_code=201)

    @app.get("/api/studies/{study_uid}/feedback")
    def get_feedback(study_uid: str, principal: ViewPatients, db: DB) -> dict[str, Any]:
        """Every judgement of the study's findings (oldest first), and each reader's latest."""
        records = feedback.list_feedback(db, study_uid)
        if records is None:
            raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
        return {"records": records, "latest": feedback.latest_by_reader(records)}

    @app.post("/api/studies/{study_uid}/{action}")
    def claim_action(
        study_uid: str,
        action: str,
        principal: Claim,
        db: DB,
        request: Request,
        body: ClaimRequest | None = None,
    ) -> dict[str, Any]:
        """``claim``, ``renew``, ``release`` or ``complete`` a study for the signed-in reader
        (the body, with ``lease_seconds``, is optional)."""
        body = body or ClaimRequest()
        if action not in ("claim", "renew", "release", "complete"):
            raise HTTPException(status_code=404, detail="unknown action")
        lease = timedelta(seconds=body.lease_seconds or request.app.state.lease_seconds)
        reader = principal.username
        record = AuditInTransaction(request, action, principal=principal)
        try:
            if action == "claim":
                expires = queue.claim(db, study_uid, reader, lease=lease, record=record)
            elif action == "renew":
                expires = queue.renew(db, study_uid, reader, lease=lease, record=record)
            elif action == "release":
                queue.release(db, study_uid, reader, record=record)
                expires = None
            else:
                queue.complete(db, study_uid, reader, record=record)
                expires = None
        except queue.ClaimError as exc:
            audit(
                request,
                action,
                principal=principal,
                outcome=Outcome.failure,
                target_kind="study",
                target=study_uid,
                detail={"reason": str(exc)},
            )
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        record.committed()
        return {
            "StudyInstanceUID": study_uid,
            "reader": reader,
            "action": action,
            "claim_expires_at": expires.isoformat() if expires else None,
        }

    @app.get("/api/quarantine")
    def get_quarantine(principal: ViewQuarantine, db: DB) -> dict[str, Any]:
        from triage.ingest.store import quarantine_listing

        return quarantine_listing(db)

    @app.get("/api/studies/{study_uid}")
    def get_study(
        study_uid: str, principal: ViewPatients, db: DB, request: Request
    ) -> dict[str, Any]:
        """One study: its patient and order identifiers, series, AI findings and routing.
        Each view is recorded in the audit trail."""
        doc = service.study_detail(db, study_uid)
        if doc is None:
            raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
        audit(request, "study_view", principal=principal, target_kind="study", target=study_uid)
        doc["viewer_url"] = viewer_url(viewer_url_template, doc)
        return doc

    @app.get("/api/studies/{study_uid}/overlays/{finding}.png")
    def get_overlay(study_uid: str, finding: str, principal: ViewPatients, db: DB) -> Response:
        with db.session() as s:
            mask_path = s.scalar(
                select(FindingRow.mask_path)
                .join(StudyRow, StudyRow.id == FindingRow.study_id)
                .where(StudyRow.StudyInstanceUID == study_uid, FindingRow.finding == finding)
            )
        if not mask_path or not Path(mask_path).is_file():
            raise HTTPException(status_code=404, detail="no overlay for this study and finding")
        from triage.serve.preview import render_key_image

        buf = io.BytesIO()
        render_key_image(Path(mask_path)).save(buf, format="PNG")
        return Response(content=buf.getvalue(), media_type="image/png")

    @app.get("/api/studies/{study_uid}/fhir-task")
    def get_fhir_task(study_uid: str, principal: ViewEvents, db: DB, request: Request) -> Response:
        """The study's reading task as a FHIR R4 ``Task`` (see docs/integration.md); the
        accession number only for accounts that may see patient identifiers."""
        now = datetime.now(UTC)
        item = study_item(db, study_uid, now, request.app.state.policy)
        if item is None:
            raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
        system = getattr(request.app.state, "fhir_accession_system", None)
        task = task_from_item(item, now, accession_system=system)
        if not principal.may(Permission.view_patients):
            task = without_patient_identifiers(outbox.TASK, task)
        return JSONResponse(task, media_type="application/fhir+json")

    @app.get("/api/events")
    async def get_events(
        principal: ViewEvents,
        request: Request,
        after: Annotated[
            int | None,
            Query(ge=0, le=outbox.MAX_EVENT_ID, description="Send events after this id."),
        ] = None,
        kinds: Annotated[
            str | None, Query(description="Comma-separated event kinds (default: all).")
        ] = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-sent events: outbox rows as ``id``/``event``/``data`` messages.

        Starts after the ``Last-Event-ID`` header or ``?after=`` (default: only events from
        now on); ``?kinds=critical_finding,worklist_changed`` keeps only those kinds. An id
        that is not a whole number from 0 to ``outbox.MAX_EVENT_ID`` is refused before the
        stream starts (400 for the header, 422 for ``?after=``). Accession numbers only
        for accounts that may see patient identifiers (``triage.events.visibility``). The
        credential is checked again every few seconds: the stream ends once it no longer
        signs in.
        """
        state = request.app.state
        wanted: frozenset[str] | None = None
        if kinds:
            wanted = frozenset(k.strip() for k in kinds.split(",") if k.strip())
            unknown = sorted(wanted - set(outbox.KINDS))
            if unknown:
                raise HTTPException(
                    status_code=400, detail=f"unknown event kind(s) {unknown}; {outbox.KINDS}"
                )
        start: int | None = after
        if last_event_id is not None and last_event_id.strip():
            start = outbox.parse_event_id(last_event_id)
            if start is None:
                raise HTTPException(
                    status_code=400,
                    detail=f"Last-Event-ID must be an event id (0 to {outbox.MAX_EVENT_ID})",
                )
        db: Database = state.db
        if start is None:
            start = await run_in_threadpool(outbox.latest_id, db)
        cursor = outbox.EventCursor(start, kinds=wanted)
        poll = float(getattr(state, "events_poll_seconds", 0.5))
        recheck = float(getattr(state, "events_recheck_seconds", 5.0))
        keepalive = float(getattr(state, "events_keepalive_seconds", 15.0))
        closing = getattr(state, "events_closing", None)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n: connected\n\n"
            quiet_since = checked_at = time.monotonic()
            patients = principal.may(Permission.view_patients)
            while True:
                if await request.is_disconnected() or (closing is not None and closing()):
                    return
                if time.monotonic() - checked_at >= recheck:
                    # A token revoked, a session ended or an account disabled while the
                    # stream is open ends it; a grant taken away applies from now on.
                    now_principal = await run_in_threadpool(
                        signed_in_now, request, Permission.view_events
                    )
                    if now_principal is None:
                        return
                    patients = now_principal.may(Permission.view_patients)
                    checked_at = time.monotonic()
                events = await run_in_threadpool(cursor.poll, db)
                for event in events:
                    yield visible(event, patient_identifiers=patients).sse()
                if events:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= keepalive:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(poll)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def signed_in_page(request: Request, name: str) -> Response:
        """A page of this server; a browser without a live session goes to sign-in. (The
        pages hold no patient data themselves: they fetch it through the API, which
        checks each call.)"""
        value = request.cookies.get(SESSION_COOKIE)
        config: AuthConfig = request.app.state.auth
        if not value or resolve_session(db, value, idle=config.session_idle) is None:
            return RedirectResponse("/login", status_code=303)
        return FileResponse(STATIC_DIR / name, media_type="text/html")

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        return signed_in_page(request, "index.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request) -> Response:
        """Accounts, tokens and the audit trail (the sections the account may use)."""
        return signed_in_page(request, "admin.html")

    @app.get("/viewer", include_in_schema=False)
    def viewer_page(request: Request) -> Response:
        """The image viewer (``/viewer#study=<StudyInstanceUID>``)."""
        return signed_in_page(request, "viewer.html")

    @app.get("/login", include_in_schema=False)
    def login_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "login.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> FileResponse:
        if name not in STATIC_SCRIPTS:
            raise HTTPException(status_code=404, detail="no such file")
        return FileResponse(STATIC_DIR / name, media_type="text/javascript")

    document_permissions(app)
    return app
