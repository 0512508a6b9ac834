"""The interactive API documentation (Swagger UI at ``/docs``) from local files.

FastAPI's default ``/docs`` page loads Swagger UI's script and style sheet from a CDN, so on
a hospital network without internet access it stays blank. Here the files come from the
``fastapi-offline`` package (a dependency) and are served under ``/docs/assets/``; the schema
stays at ``/openapi.json``. ReDoc (``/redoc``) is not served.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from triage.serve.security import html_csp

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def assets_dir() -> Path:
    """The folder holding Swagger UI's ``swagger-ui-bundle.js`` and ``swagger-ui.css``."""
    return Path(str(files("fastapi_offline") / "static"))


def docs_html(app: FastAPI) -> HTMLResponse:
    """The Swagger UI page, with a CSP that allows exactly its inline start-up script."""
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} API",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        # No call to the public validator service (swagger.io) from the page.
        swagger_ui_parameters={"validatorUrl": None},
    )
    html = bytes(page.body).decode()
    return HTMLResponse(html, headers={"Content-Security-Policy": html_csp(html)})


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets from local files (build the app with
    ``docs_url=None, redoc_url=None``)."""

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return docs_html(app)

    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
