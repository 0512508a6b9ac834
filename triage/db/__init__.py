"""Persistence: tables, sessions and migrations."""

from __future__ import annotations

from triage.db.session import Database

__all__ = ["Database"]
