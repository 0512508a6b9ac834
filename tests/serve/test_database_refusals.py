"""A request value the database cannot use (NUL in text, which PostgreSQL refuses) is the
client's mistake: 400 or a plain not-found, never a 500, on either backend."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.signin import auth_headers
from triage.db import Database
from triage.serve.app import create_app


def test_a_nul_in_a_path_value_is_not_a_server_error(db: Database) -> None:
    client = TestClient(create_app(db), headers=auth_headers(db))
    for url in (
        "/api/studies/1.2%003",
        "/api/studies/1.2%003/feedback",
        "/api/studies/1.2%003/viewer",
    ):
        res = client.get(url)
        assert res.status_code in (400, 404), (url, res.status_code, res.text)
