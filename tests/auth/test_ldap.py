"""Sign-in through the directory, against a real OpenLDAP server (Debian's slapd).

The directory (tests/auth/slapd.py) is started once for the module; a test that changes it
adds entries of its own, with unique names, and deletes them after, so that no test
depends on another.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from tests.auth.slapd import (
    ADMINS,
    ALICE_PASSWORD,
    EVE_PASSWORD,
    GROUPS,
    INJECTOR_DN,
    INJECTOR_PASSWORD,
    INJECTOR_UID,
    PAT_PASSWORD,
    PEOPLE,
    RADIOLOGISTS,
    REPORTING,
    ROOT_USER_PASSWORD,
    SERVICE_DN,
    SERVICE_PASSWORD,
    Slapd,
    TlsFiles,
    free_port,
    running_slapd,
    slapd_problem,
)
from triage.auth.accounts import (
    AccountSource,
    create_account,
    get_account,
    set_disabled,
)
from triage.auth.ldap import (
    DirectoryOutcome,
    LdapConfigError,
    LdapSettings,
    _find_user,
    _open,
    authenticate,
    normal_dn,
    role_of,
    sign_in_with_directory,
    user_filter,
)
from triage.auth.roles import Role
from triage.config import Settings
from triage.db import Database
from triage.db.tables import AccountRow

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
ROLES = {RADIOLOGISTS: Role.radiologist, REPORTING: Role.radiologist, ADMINS: Role.admin}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    problem = slapd_problem()
    if problem:
        pytest.skip(f"no OpenLDAP server to test against: {problem}")
    yield from running_slapd(tmp_path_factory.mktemp("slapd"))


@pytest.fixture(scope="module")
def slapd_tls(
    tmp_path_factory: pytest.TempPathFactory, tls_files: dict[str, Path]
) -> Iterator[Slapd]:
    problem = slapd_problem()
    if problem:
        pytest.skip(f"no OpenLDAP server to test against: {problem}")
    tls = TlsFiles(tls_files["ca.pem"], tls_files["server.pem"], tls_files["server.key"])
    yield from running_slapd(tmp_path_factory.mktemp("slapd-tls"), tls=tls)


def settings_for(server: Slapd | str, **changes: Any) -> LdapSettings:
    values: dict[str, Any] = {
        "url": server.url if isinstance(server, Slapd) else server,
        "user_base": PEOPLE,
        "bind_dn": SERVICE_DN,
        "bind_password": SERVICE_PASSWORD,
        "group_base": GROUPS,
        "group_roles": ROLES,
        "timeout_seconds": 5,
    }
    values.update(changes)
    return LdapSettings(**values)


def closed_port_url() -> str:
    return f"ldap://127.0.0.1:{free_port()}"


# --- the directory's answers ------------------------------------------------------------


def test_the_right_password_signs_in_with_the_groups_role_and_name(slapd: Slapd) -> None:
    settings = settings_for(slapd)
    alice = authenticate(settings, "alice", ALICE_PASSWORD)
    assert alice.outcome == DirectoryOutcome.ok and alice.ok
    assert (alice.username, alice.role, alice.display_name) == (
        "alice",
        Role.radiologist,
        "Alice Liddell",
    )
    assert alice.groups == (RADIOLOGISTS,)  # from memberOf (groupOfNames, memberof overlay)
    # groupOfUniqueNames: found by the group search under TRIAGE_LDAP_GROUP_BASE.
    root = authenticate(settings, "root", ROOT_USER_PASSWORD)
    assert (root.outcome, root.role, root.display_name) == ("ok", Role.admin, "Root Admin")
    # A DN full of filter metacharacters, escaped in the group search's filter.
    pat = authenticate(settings, "pat", PAT_PASSWORD)
    assert (pat.outcome, pat.role, pat.groups) == ("ok", Role.radiologist, (REPORTING,))
    assert pat.dn is not None and "(Radiology)" in pat.dn
    # Directory usernames compare case-insensitively; the local name is lower-cased.
    upper = authenticate(settings, "ALICE", ALICE_PASSWORD)
    assert (upper.outcome, upper.username, upper.role) == ("ok", "alice", Role.radiologist)


def test_wrong_password_and_unknown_user_are_bad_credentials(slapd: Slapd) -> None:
    settings = settings_for(slapd)
    wrong = authenticate(settings, "alice", ALICE_PASSWORD + "x")
    assert wrong.outcome == DirectoryOutcome.bad_credentials and wrong.role is None
    assert authenticate(settings, "root", ALICE_PASSWORD).outcome == "bad_credentials"
    unknown = authenticate(settings, "mallory", ALICE_PASSWORD)
    assert unknown.outcome == DirectoryOutcome.bad_credentials and unknown.dn is None
    assert authenticate(settings, "alice\n", ALICE_PASSWORD).outcome == "bad_credentials"
    assert authenticate(settings, "", ALICE_PASSWORD).outcome == "bad_credentials"


def test_an_empty_password_is_refused_before_anything_is_sent(slapd: Slapd) -> None:
    assert authenticate(settings_for(slapd), "alice", "").outcome == "bad_credentials"
    # Nothing is sent: with the directory unreachable the answer is still bad_credentials,
    # not directory_unavailable (a bind with an empty password is an unauthenticated bind,
    # which directories may answer "success").
    down = settings_for(closed_port_url())
    assert authenticate(down, "alice", "").outcome == DirectoryOutcome.bad_credentials
    assert authenticate(down, "alice", "x" * 5000).outcome == DirectoryOutcome.bad_credentials
    assert authenticate(down, "alice", "x").outcome == DirectoryOutcome.directory_unavailable


def test_a_user_in_no_mapped_group_gets_no_role(slapd: Slapd) -> None:
    settings = settings_for(slapd)
    eve = authenticate(settings, "eve", EVE_PASSWORD)
    assert (eve.outcome, eve.role, eve.display_name) == ("no_role", None, "Eve Nogroup")
    # Without TRIAGE_LDAP_GROUP_BASE only memberOf counts: root's group lists him as a
    # uniqueMember (no memberOf), alice's gives her memberOf.
    memberof_only = settings_for(slapd, group_base=None)
    assert authenticate(memberof_only, "root", ROOT_USER_PASSWORD).outcome == "no_role"
    assert authenticate(memberof_only, "alice", ALICE_PASSWORD).role == Role.radiologist
    # A wrong password is still bad_credentials for a user without a role.
    assert authenticate(settings, "eve", "not eve's").outcome == "bad_credentials"


@pytest.mark.parametrize(
    "username",
    ["*", "alice)(uid=*", INJECTOR_UID, "alice*", "al*", "*)(|(uid=*", "alice\\", "alice\x00"],
)
def test_filter_injection_signs_in_nobody(slapd: Slapd, username: str) -> None:
    settings = settings_for(slapd)
    for password in (ALICE_PASSWORD, ROOT_USER_PASSWORD, INJECTOR_PASSWORD):
        result = authenticate(settings, username, password)
        assert result.outcome == DirectoryOutcome.bad_credentials
        assert result.role is None and result.dn is None


def test_the_username_is_escaped_in_the_search_filter(slapd: Slapd) -> None:
    """Escaping, beneath the username check: a value with metacharacters matches only an
    entry holding exactly that value."""
    settings = settings_for(slapd)
    assert user_filter(settings, "alice)(uid=*") == (
        "(&(objectClass=person)(uid=alice\\29\\28uid=\\2a))"
    )
    conn = _open(settings, SERVICE_DN, SERVICE_PASSWORD)
    try:
        assert conn.bind()
        injector = _find_user(conn, settings, INJECTOR_UID)
        assert injector is not None and injector.dn == INJECTOR_DN
        for value in ("*", "al*", "*)(|(uid=*", "alice)(|(uid=*)", "\\2a", "alice\x00"):
            assert _find_user(conn, settings, value) is None, value
        alice = _find_user(conn, settings, "alice")
        assert alice is not None and alice.dn == f"uid=alice,{PEOPLE}"
    finally:
        conn.unbind()


def test_a_filter_finding_several_users_signs_in_nobody(slapd: Slapd) -> None:
    # A site's filter mistake: {username} ignored, every person matches.
    loose = settings_for(slapd, user_filter="(|(objectClass=person)(uid={username}))")
    assert authenticate(loose, "alice", ALICE_PASSWORD).outcome == "bad_credentials"


def test_an_unavailable_directory_is_an_outcome_not_an_exception(slapd: Slapd) -> None:
    closed = authenticate(settings_for(closed_port_url()), "alice", ALICE_PASSWORD)
    assert closed.outcome == DirectoryOutcome.directory_unavailable
    # A directory that accepts connections and never answers: the timeout bounds the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nobody ever reads
        url = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        hung = authenticate(settings_for(url, timeout_seconds=1), "alice", ALICE_PASSWORD)
    assert hung.outcome == DirectoryOutcome.directory_unavailable
    # The service account refused, or a user base that does not exist: a site's settings
    # are wrong, not the user's password.
    bad_service = settings_for(slapd, bind_password="not the service password")
    assert authenticate(bad_service, "alice", ALICE_PASSWORD).outcome == "directory_unavailable"
    no_base = settings_for(slapd, user_base="ou=nowhere,dc=example,dc=org")
    assert authenticate(no_base, "alice", ALICE_PASSWORD).outcome == "directory_unavailable"
    # Anonymous sessions may not read this directory (slapd answers noSuchObject).
    anonymous = settings_for(slapd, bind_dn=None, bind_password=None)
    assert authenticate(anonymous, "alice", ALICE_PASSWORD).outcome == "directory_unavailable"


def test_log_lines_hold_no_password(slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="triage.auth.ldap")
    secret = "Zebra-Password-0451"
    outcomes = {
        authenticate(settings_for(slapd), "alice", secret).outcome,
        authenticate(settings_for(slapd), "eve", EVE_PASSWORD).outcome,
        authenticate(settings_for(slapd), "nobody", secret).outcome,
        authenticate(settings_for(closed_port_url()), "alice", secret).outcome,
        authenticate(
            settings_for(slapd, bind_password="service " + secret), "alice", secret
        ).outcome,
    }
    assert outcomes == {"bad_credentials", "no_role", "directory_unavailable"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5 and all("\n" not in m for m in messages)
    for secret_text in (secret, EVE_PASSWORD, SERVICE_PASSWORD):
        assert secret_text not in caplog.text


# --- TLS ---------------------------------------------------------------------------------


def test_starttls_and_ldaps_check_the_certificate(slapd_tls: Slapd, tls_files: dict) -> None:
    ca = tls_files["ca.pem"]
    starttls = settings_for(slapd_tls, starttls=True, ca_file=ca)
    assert authenticate(starttls, "alice", ALICE_PASSWORD).role == Role.radiologist
    ldaps = settings_for(slapd_tls.ldaps_url, ca_file=ca)
    assert authenticate(ldaps, "alice", ALICE_PASSWORD).role == Role.radiologist
    # The system's CAs do not know the test CA: refused, nothing sent in clear.
    untrusted = settings_for(slapd_tls, starttls=True)
    assert authenticate(untrusted, "alice", ALICE_PASSWORD).outcome == "directory_unavailable"
    assert authenticate(settings_for(slapd_tls.ldaps_url), "alice", ALICE_PASSWORD).outcome == (
        "directory_unavailable"
    )
    if slapd_tls.has_other_host:
        # A certificate for another name (it holds 127.0.0.1 and localhost, not 127.0.0.2).
        other = settings_for(slapd_tls.ldaps_other_url, ca_file=ca)
        assert authenticate(other, "alice", ALICE_PASSWORD).outcome == "directory_unavailable"


# --- the local account --------------------------------------------------------------------


def test_sign_in_creates_the_directory_account(db: Database, slapd: Slapd) -> None:
    first = sign_in_with_directory(db, settings_for(slapd), "alice", ALICE_PASSWORD, now=T0)
    assert first.ok and first.account is not None
    account = first.account
    assert (account.username, account.role, account.source) == (
        "alice",
        Role.radiologist,
        AccountSource.ldap,
    )
    assert account.display_name == "Alice Liddell" and account.last_login_at == T0
    assert not account.has_password
    with db.session() as s:
        row = s.scalars(select(AccountRow).where(AccountRow.username == "alice")).one()
        assert row.password_hash is None and row.source == "ldap"
    again = sign_in_with_directory(db, settings_for(slapd), "Alice", ALICE_PASSWORD)
    assert again.ok and again.account is not None and again.account.id == account.id
    # Refusals change nothing and create nothing.
    wrong = sign_in_with_directory(db, settings_for(slapd), "alice", "wrong")
    assert wrong.outcome == "bad_credentials" and wrong.account is None
    assert sign_in_with_directory(db, settings_for(slapd), "eve", EVE_PASSWORD).outcome == (
        "no_role"
    )
    assert get_account(db, "eve") is None


def test_the_role_follows_group_membership(db: Database, slapd: Slapd) -> None:
    uid = slapd.unique_name("carol")
    password = "carol's directory password"
    dn = slapd.add_user(uid, password, "Carol Change")
    readers = slapd.add_group(slapd.unique_name("readers"), [dn])  # memberOf
    admins = slapd.add_group(slapd.unique_name("admins"), [], unique=True)  # group search
    settings = settings_for(slapd, group_roles={readers: "radiologist", admins: "admin"})

    def sign_in() -> tuple[str, Role | None]:
        result = sign_in_with_directory(db, settings, uid, password)
        return result.outcome, result.account.role if result.account else None

    try:
        assert sign_in() == ("ok", Role.radiologist)
        slapd.set_membership(admins, dn, True)
        assert sign_in() == ("ok", Role.admin)  # the highest of the two
        slapd.set_membership(admins, dn, False)
        # Demoted, although the only admin: the directory decides.
        assert sign_in() == ("ok", Role.radiologist)
        slapd.replace(dn, "displayName", ["Carol Renamed"])
        assert sign_in_with_directory(db, settings, uid, password).account.display_name == (  # type: ignore[union-attr]
            "Carol Renamed"
        )
        slapd.set_membership(readers, dn, False)
        assert sign_in() == ("no_role", None)
    finally:
        slapd.delete(dn, readers, admins)
    assert [a.role for a in [get_account(db, uid)] if a] == [Role.radiologist]


def test_a_local_account_of_the_same_name_is_not_taken_over(db: Database, slapd: Slapd) -> None:
    local_password = "the local alice's password"
    create_account(db, "alice", Role.admin, password=local_password)
    create_account(db, "Root", Role.radiologist, password=local_password)
    for username, password in (("alice", ALICE_PASSWORD), ("root", ROOT_USER_PASSWORD)):
        result = sign_in_with_directory(db, settings_for(slapd), username, password)
        assert result.outcome == DirectoryOutcome.local_account and result.account is None
        assert result.directory.ok  # the directory said yes; the name is taken here
    alice = get_account(db, "alice")
    assert alice is not None
    assert (alice.source, alice.role, alice.has_password) == ("local", Role.admin, True)
    assert get_account(db, "root") is None  # no second account beside "Root"


def test_a_disabled_directory_account_stays_disabled(db: Database, slapd: Slapd) -> None:
    assert sign_in_with_directory(db, settings_for(slapd), "alice", ALICE_PASSWORD).ok
    create_account(db, "keeper", Role.admin, password="a local admin password")
    set_disabled(db, "alice", True)
    refused = sign_in_with_directory(db, settings_for(slapd), "alice", ALICE_PASSWORD)
    assert refused.outcome == DirectoryOutcome.disabled
    assert refused.account is not None and refused.account.disabled
    # Without the password the answer says nothing about the account.
    wrong = sign_in_with_directory(db, settings_for(slapd), "alice", "wrong")
    assert wrong.outcome == DirectoryOutcome.bad_credentials


def test_sign_in_reads_the_settings_object(
    db: Database, slapd: Slapd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIAGE_LDAP_URL", slapd.url)
    monkeypatch.setenv("TRIAGE_LDAP_BIND_DN", SERVICE_DN)
    monkeypatch.setenv("TRIAGE_LDAP_BIND_PASSWORD", SERVICE_PASSWORD)
    monkeypatch.setenv("TRIAGE_LDAP_USER_BASE", PEOPLE)
    monkeypatch.setenv("TRIAGE_LDAP_GROUP_BASE", GROUPS)
    monkeypatch.setenv("TRIAGE_LDAP_GROUP_ROLES", f'{{"{ADMINS}": "admin"}}')
    monkeypatch.setenv("TRIAGE_LDAP_TIMEOUT_SECONDS", "2")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    ldap = LdapSettings.from_settings(settings)
    assert ldap is not None and ldap.timeout_seconds == 2 and ldap.port == slapd.port
    assert ldap.roles_by_dn == {normal_dn(ADMINS): Role.admin}
    assert "service account secret" not in repr(ldap)
    result = sign_in_with_directory(db, settings, "root", ROOT_USER_PASSWORD)
    assert result.ok and result.account is not None and result.account.role == Role.admin


# --- settings ------------------------------------------------------------------------------


def test_settings_that_cannot_work_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("URL", "BIND_DN", "BIND_PASSWORD", "USER_BASE", "GROUP_BASE", "GROUP_ROLES"):
        monkeypatch.delenv(f"TRIAGE_LDAP_{name}", raising=False)
    unset = Settings(_env_file=None)  # type: ignore[call-arg]
    assert LdapSettings.from_settings(unset) is None
    with pytest.raises(LdapConfigError, match="not configured"):
        sign_in_with_directory(None, unset, "alice", "x")  # type: ignore[arg-type]
    url = "ldap://dc.hospital.local:389"
    ok: dict[str, Any] = {"url": url, "user_base": PEOPLE, "group_roles": ROLES}
    assert LdapSettings(**ok).port == 389
    assert LdapSettings(**{**ok, "url": "ldaps://dc.hospital.local"}).port == 636
    bad: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://dc.hospital.local"}, "TRIAGE_LDAP_URL"),
        ({"url": "ldap://dc.hospital.local:99999"}, "bad port"),
        ({"url": "ldap://dc.hospital.local/dc=x?uid"}, "only the scheme"),
        ({"url": "ldaps://dc.hospital.local", "starttls": True}, "STARTTLS"),
        ({"user_base": " "}, "USER_BASE"),
        ({"user_filter": "(uid=alice)"}, "{username}"),
        ({"user_filter": "uid={username}"}, "parenthesised"),
        ({"bind_dn": SERVICE_DN}, "BIND_PASSWORD"),
        ({"bind_password": "x"}, "without TRIAGE_LDAP_BIND_DN"),
        ({"ca_file": tmp_path / "absent.pem"}, "CA_FILE"),
        ({"timeout_seconds": 0}, "TIMEOUT"),
        ({"timeout_seconds": 0.5}, "whole number"),
        ({"group_roles": {}}, "nobody could sign in"),
        ({"group_roles": {"not a dn": "admin"}}, "not a group DN"),
        ({"group_roles": {ADMINS: "superuser"}}, "not a group DN and a role"),
    ]
    for change, message in bad:
        with pytest.raises(LdapConfigError, match=message.replace("{", "\\{")):
            LdapSettings(**{**ok, **change})
    monkeypatch.setenv("TRIAGE_LDAP_GROUP_ROLES", f'{{"{ADMINS}": "superuser"}}')
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_roles_map_by_dn_whatever_its_spelling() -> None:
    settings = LdapSettings(url="ldaps://dc.example.org", user_base=PEOPLE, group_roles=ROLES)
    shouty = "CN=Radiologists, OU=Groups, DC=Example, DC=Org"
    assert role_of(settings, [shouty]) == (Role.radiologist, (shouty,))
    assert role_of(settings, [RADIOLOGISTS, ADMINS, "cn=other,dc=example,dc=org"]) == (
        Role.admin,
        (RADIOLOGISTS, ADMINS),
    )
    assert role_of(settings, [RADIOLOGISTS, shouty]) == (Role.radiologist, (RADIOLOGISTS,))
    assert role_of(settings, ["cn=other,dc=example,dc=org"]) == (None, ())
    assert role_of(settings, []) == (None, ())
