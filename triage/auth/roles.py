"""Roles and what each may do.

Three roles: a **radiologist** reads the worklist (with patient identifiers) and claims,
releases and completes studies; an **admin** does that too, manages accounts and tokens,
reads the quarantine and the audit trail; an **integration** (a service account: a PACS, a
RIS, a dashboard) stores instances over STOW-RS and follows the event stream, and sees no
patient names unless a permission is granted to it explicitly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Role(enum.StrEnum):
    radiologist = "radiologist"
    admin = "admin"
    integration = "integration"


class Permission(enum.StrEnum):
    view_patients = "view_patients"
    """The worklist and study documents with patient names, IDs and accession numbers."""
    claim = "claim"
    """Claim, renew, release and complete studies; acknowledge alerts."""
    review = "review"
    """Judge the AI's findings (agree, disagree, missed) for retraining."""
    ingest = "ingest"
    """Store instances (STOW-RS)."""
    view_events = "view_events"
    """The event stream and FHIR Task documents."""
    view_quarantine = "view_quarantine"
    """Refused input and its reasons."""
    manage_accounts = "manage_accounts"
    """Create, change and disable accounts; issue and revoke their tokens."""
    read_audit = "read_audit"
    """Read and verify the audit trail."""


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.radiologist: frozenset(
        {Permission.view_patients, Permission.claim, Permission.review, Permission.view_events}
    ),
    Role.admin: frozenset(Permission),
    Role.integration: frozenset({Permission.ingest, Permission.view_events}),
}


ROLE_RANK: tuple[Role, ...] = (Role.admin, Role.radiologist, Role.integration)
"""Highest first: a user in groups of several roles gets the highest."""


def highest_role(roles: Iterable[Role]) -> Role | None:
    """The highest of ``roles`` (:data:`ROLE_RANK`), None when there are none."""
    present = set(roles)
    return next((role for role in ROLE_RANK if role in present), None)


def permissions_of(role: Role | str) -> frozenset[Permission]:
    """What an account of this role may do."""
    return ROLE_PERMISSIONS[Role(role)]
