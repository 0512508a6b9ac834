"""The HTTP API and web page (FastAPI). Routes are thin: they call ``triage.worklist``."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from triage import __version__
from triage.db import Database
from triage.db.tables import FindingRow, StudyRow
from triage.ingest.store import Ingestor
from triage.worklist import queue, service
from triage.worklist.priority import DEFAULT_POLICY, PolicyConfig

STATIC_DIR = Path(__file__).resolve().parent / "static"


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(get_db)]


class ClaimRequest(BaseModel):
    reader: str = Field(description="The radiologist's user name (1-64 letters, digits, ._@-).")
    lease_seconds: float | None = Field(default=None, gt=0, le=24 * 3600)


class NextRequest(ClaimRequest):
    modalities: list[str] = Field(default_factory=list)
    subspecialties: list[str] = Field(default_factory=list)


def create_app(
    db: Database,
    *,
    ingestor: Ingestor | None = None,
    max_upload_bytes: int = 1024**3,
    policy: PolicyConfig = DEFAULT_POLICY,
    lease_seconds: float = 900.0,
) -> FastAPI:
    """Build the app around an open (migrated) database.

    Args:
        db: the database.
        ingestor: when given, DICOMweb STOW-RS (``POST /dicomweb/studies``) stores through it.
        max_upload_bytes: the largest STOW-RS request body accepted.
    """
    app = FastAPI(title="triage", version=__version__)
    app.state.db = db
    app.state.policy = policy
    app.state.lease_seconds = lease_seconds
    if ingestor is not None:
        from triage.serve.dicomweb import stow_router

        app.state.ingestor = ingestor
        app.state.max_upload_bytes = max_upload_bytes
        app.include_router(stow_router)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/api/worklist")
    def get_worklist(
        db: DB,
        request: Request,
        modality: Annotated[list[str] | None, Query()] = None,
        subspecialty: Annotated[list[str] | None, Query()] = None,
        include_completed: bool = False,
    ) -> dict[str, Any]:
        """The reading worklist in reading order (filters: ``?modality=CT&subspecialty=neuro``)."""
        return service.worklist(
            db,
            config=request.app.state.policy,
            modalities=modality or (),
            subspecialties=subspecialty or (),
            include_completed=include_completed,
        )

    @app.post("/api/worklist/next")
    def claim_next(body: NextRequest, db: DB, request: Request) -> Response:
        """Claim the first study in reading order the reader may take (204: none waiting)."""
        try:
            item = queue.claim_next(
                db,
                body.reader,
                modalities=body.modalities,
                subspecialties=body.subspecialties,
                lease=timedelta(seconds=body.lease_seconds or request.app.state.lease_seconds),
                config=request.app.state.policy,
            )
        except queue.ClaimError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        if item is None:
            return Response(status_code=204)
        return JSONResponse(item)

    @app.post("/api/studies/{study_uid}/{action}")
    def claim_action(
        study_uid: str, action: str, body: ClaimRequest, db: DB, request: Request
    ) -> dict[str, Any]:
        """``claim``, ``renew``, ``release`` or ``complete`` a study for a reader."""
        lease = timedelta(seconds=body.lease_seconds or request.app.state.lease_seconds)
        try:
            if action == "claim":
                expires = queue.claim(db, study_uid, body.reader, lease=lease)
            elif action == "renew":
                expires = queue.renew(db, study_uid, body.reader, lease=lease)
            elif action == "release":
                queue.release(db, study_uid, body.reader)
                expires = None
            elif action == "complete":
                queue.complete(db, study_uid, body.reader)
                expires = None
            else:
                raise HTTPException(status_code=404, detail="unknown action")
        except queue.ClaimError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        return {
            "StudyInstanceUID": study_uid,
            "reader": body.reader,
            "action": action,
            "claim_expires_at": expires.isoformat() if expires else None,
        }

    @app.get("/api/quarantine")
    def get_quarantine(db: DB) -> dict[str, Any]:
        from triage.ingest.store import quarantine_listing

        return quarantine_listing(db)

    @app.get("/api/studies/{study_uid}")
    def get_study(study_uid: str, db: DB) -> dict[str, Any]:
        doc = service.study_detail(db, study_uid)
        if doc is None:
            raise HTTPException(status_code=404, detail="unknown StudyInstanceUID")
        return doc

    @app.get("/api/studies/{study_uid}/overlays/{finding}.png")
    def get_overlay(study_uid: str, finding: str, db: DB) -> Response:
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

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app
