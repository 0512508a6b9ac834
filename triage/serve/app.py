"""The HTTP API and web page (FastAPI). Routes are thin: they call ``triage.worklist``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import select

from triage import __version__
from triage.db import Database
from triage.db.tables import FindingRow, StudyRow
from triage.ingest.store import Ingestor
from triage.worklist import service

STATIC_DIR = Path(__file__).resolve().parent / "static"


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(get_db)]


def create_app(
    db: Database, *, ingestor: Ingestor | None = None, max_upload_bytes: int = 1024**3
) -> FastAPI:
    """Build the app around an open (migrated) database.

    Args:
        db: the database.
        ingestor: when given, DICOMweb STOW-RS (``POST /dicomweb/studies``) stores through it.
        max_upload_bytes: the largest STOW-RS request body accepted.
    """
    app = FastAPI(title="triage", version=__version__)
    app.state.db = db
    if ingestor is not None:
        from triage.serve.dicomweb import stow_router

        app.state.ingestor = ingestor
        app.state.max_upload_bytes = max_upload_bytes
        app.include_router(stow_router)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/api/worklist")
    def get_worklist(db: DB) -> dict[str, Any]:
        return service.worklist(db)

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
