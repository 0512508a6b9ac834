"""ATNA audit messages (DICOM PS3.15 A.5) and their delivery by syslog (RFC 5424/5425/5426).

Real sockets on loopback: a UDP receiver, a TCP receiver, a TLS receiver with mutual
authentication, a port that refuses connections and a listener that never answers. Every
wait is a socket timeout or the sender's own flush, never a sleep.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from triage.audit import atna
from triage.audit.atna import (
    Destination,
    SyslogSender,
    UnmappedActionError,
    audit_message,
    install,
)
from triage.audit.chain import AuditEvent, Outcome
from triage.config import Settings

AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
AT_TEXT = "2025-03-04T05:06:07.890123Z"
UID = "1.2.826.0.1.3680043.8.498.1234567890"
WAIT = 10.0  # seconds any one socket operation may take before the test fails

FRAME = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+)"
    rb" (?P<msgid>\S+) (?P<sd>-) (?P<bom>\xef\xbb\xbf)(?P<xml><\?xml.*)\Z",
    re.DOTALL,
)

PATIENT = {"PatientID": "PID-77", "PatientName": "DOE^JANE", "patient_name": "Jane Doe"}


def _message(event: AuditEvent) -> ET.Element:
    data = audit_message(event, at=AT, source_id="triage@node1", host="node1", ae_title="TRIAGE")
    assert b"DOE" not in data and b"Jane" not in data
    return ET.fromstring(data)


def _code(el: ET.Element | None) -> tuple[str | None, str | None, str | None]:
    assert el is not None
    return el.get("csd-code"), el.get("codeSystemName"), el.get("originalText")


def _check_structure(root: ET.Element) -> None:
    """The sequence of the PS3.15 A.5.1 schema and its mandatory attributes."""
    tags = "".join(
        {
            "EventIdentification": "E",
            "ActiveParticipant": "A",
            "AuditSourceIdentification": "S",
            "ParticipantObjectIdentification": "P",
        }[child.tag]
        for child in root
    )
    assert root.tag == "AuditMessage"
    assert re.fullmatch("EA+SP*", tags), tags
    ident = root.find("EventIdentification")
    assert ident is not None
    assert re.fullmatch(
        "I(T)*D?",
        "".join(
            {"EventID": "I", "EventTypeCode": "T", "EventOutcomeDescription": "D"}[c.tag]
            for c in ident
        ),
    )
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert ident.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert ident.get("EventDateTime") == AT_TEXT
    for code in root.iter():
        if code.get("csd-code") is not None and code.tag != "AuditSourceTypeCode":
            assert code.get("codeSystemName") and code.get("originalText"), code.tag
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
        assert [c.tag for c in participant] == sorted(
            (c.tag for c in participant), key=["RoleIDCode", "MediaIdentifier"].index
        )
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "triage@node1"
    assert _code(source.find("AuditSourceTypeCode"))[0] == "4"
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID") is not None
        assert obj[0].tag == "ParticipantObjectIDTypeCode"
    assert len(root.findall("ActiveParticipant[@UserIsRequestor='true']")) == 1


def _requestor(root: ET.Element) -> ET.Element:
    found = root.find("ActiveParticipant[@UserIsRequestor='true']")
    assert found is not None
    return found


def _study_objects(root: ET.Element) -> list[ET.Element]:
    return [
        obj
        for obj in root.findall("ParticipantObjectIdentification")
        if _code(obj.find("ParticipantObjectIDTypeCode"))[0] == "110180"
    ]


# (action, EventID, EventActionCode, EventTypeCodes, target_kind)
CASES = [
    ("login", "110114", "E", ["110122"], None),
    ("logout", "110114", "E", ["110123"], None),
    ("view", "110103", "R", [], "study"),
    ("study_view", "110103", "R", [], "study"),
    ("claim", "110111", "U", ["CLAIM"], "study"),
    ("renew", "110111", "U", ["RENEW"], "study"),
    ("release", "110111", "U", ["RELEASE"], "study"),
    ("complete", "110111", "U", ["COMPLETE"], "study"),
    ("export", "110106", "R", [], "study"),
    ("worklist", "110112", "E", [], None),
    ("account_create", "110113", "E", ["110137", "110136"], "account"),
    ("account_role", "110113", "E", ["110136"], "account"),
    ("account_disable", "110113", "E", ["110137"], "account"),
    ("account_enable", "110113", "E", ["110137"], "account"),
    ("account_password", "110113", "E", ["110137"], "account"),
    ("token_create", "110113", "E", ["110137"], "token"),
    ("token_revoke", "110113", "E", ["110137"], "token"),
    ("audit_verify", "110101", "R", [], "audit"),
    ("audit_list", "110101", "R", [], "audit"),
]


@pytest.mark.parametrize(("action", "event_id", "action_code", "types", "kind"), CASES)
def test_each_action_has_its_dicom_message(
    action: str, event_id: str, action_code: str, types: list[str], kind: str | None
) -> None:
    target = {"study": UID, "account": "bob", "token": "7", "audit": None, None: None}[kind]
    detail: dict[str, object] = {**PATIENT, "password": "hunter2-secret"}
    if kind == "token":
        detail["account"] = "bob"
    event = AuditEvent(
        action=action,
        actor="alice",
        actor_role="admin",
        target_kind=kind,
        target=target,
        source_address="192.0.2.10",
        detail=detail,
    )
    root = _message(event)
    _check_structure(root)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert _code(ident.find("EventID"))[:2] == (event_id, "DCM")
    assert ident.get("EventActionCode") == action_code
    assert ident.get("EventOutcomeIndicator") == "0"
    assert [_code(t)[0] for t in ident.findall("EventTypeCode")] == types
    person = _requestor(root)
    assert person.get("UserID") == "alice"
    assert person.get("NetworkAccessPointID") == "192.0.2.10"
    assert person.get("NetworkAccessPointTypeCode") == "2"
    process = root.find("ActiveParticipant[@UserName='triage']")
    assert process is not None and process.get("UserIsRequestor") == "false"
    assert process.get("AlternativeUserID") == "AETITLES=TRIAGE"
    text = ET.tostring(root, encoding="unicode")
    assert "hunter2" not in text

    studies = _study_objects(root)
    if kind == "study":
        assert len(studies) == 1
        study = studies[0]
        assert study.get("ParticipantObjectID") == UID
        assert study.get("ParticipantObjectTypeCode") == "2"
        assert study.get("ParticipantObjectTypeCodeRole") == "3"
        assert _code(study.find("ParticipantObjectIDTypeCode")) == (
            "110180",
            "DCM",
            "Study Instance UID",
        )
        (patient,) = root.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']")
        assert patient.get("ParticipantObjectID") == "PID-77"
        assert patient.get("ParticipantObjectTypeCodeRole") == "1"
        assert _code(patient.find("ParticipantObjectIDTypeCode"))[:2] == ("2", "RFC-3881")
        assert patient.find("ParticipantObjectName") is None
    else:
        assert studies == []
    if event_id == "110113":
        (subject,) = root.findall("ParticipantObjectIdentification")
        assert subject.get("ParticipantObjectID") == "bob"
        assert _code(subject.find("ParticipantObjectIDTypeCode"))[:2] == ("11", "RFC-3881")
        detail_el = subject.find("ParticipantObjectDetail[@type='Alert Description']")
        assert detail_el is not None
    if event_id == "110114":
        assert root.find("ParticipantObjectIdentification") is None


def test_a_failed_login_is_a_minor_failure_of_the_attempted_user() -> None:
    root = _message(
        AuditEvent(
            action="login",
            outcome=Outcome.failure,
            target_kind="account",
            target="mallory",
            source_address="198.51.100.7",
            detail={"reason": "wrong password"},
        )
    )
    _check_structure(root)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventOutcomeIndicator") == "4"
    assert ident.findtext("EventOutcomeDescription") == "wrong password"
    assert _requestor(root).get("UserID") == "mallory"


def test_a_broken_audit_chain_is_a_major_security_alert() -> None:
    root = _message(
        AuditEvent(
            action="audit_verify",
            outcome=Outcome.failure,
            actor="cli:root",
            source_address="local",
            detail={"problem": "record 3 was altered after it was written", "first_bad_id": 3},
        )
    )
    _check_structure(root)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert _code(ident.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert ident.get("EventOutcomeIndicator") == "12"
    (subject,) = root.findall("ParticipantObjectIdentification")
    assert _code(subject.find("ParticipantObjectIDTypeCode"))[0] == "110182"
    assert subject.get("ParticipantObjectID") == "node1"
    person = _requestor(root)
    assert (person.get("NetworkAccessPointID"), person.get("NetworkAccessPointTypeCode")) == (
        "node1",
        "1",
    )


def test_values_are_escaped_by_the_xml_library() -> None:
    actor = "eve<script>&\"'\x01\x1b"
    root = _message(AuditEvent(action="view", actor=actor, target=f'{UID}"/><x a="'))
    assert _requestor(root).get("UserID") == "eve<script>&\"'\ufffd\ufffd"
    assert _study_objects(root)[0].get("ParticipantObjectID") == f'{UID}"/><x a="'


def test_no_patient_object_without_a_patient_id() -> None:
    root = _message(AuditEvent(action="claim", actor="alice", target=UID))
    assert root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']") is None
    assert len(_study_objects(root)) == 1


def test_an_unknown_action_has_no_message() -> None:
    with pytest.raises(UnmappedActionError):
        audit_message(AuditEvent(action="sneeze"), at=AT, source_id="s", host="h")
    assert "sneeze" not in atna.MAPPED_ACTIONS and "claim" in atna.MAPPED_ACTIONS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp://arr.example", Destination("udp", "arr.example", 514)),
        ("tcp://10.1.2.3:6514", Destination("tcp", "10.1.2.3", 6514)),
        ("tls://arr.example", Destination("tls", "arr.example", 6514)),
        ("TLS://[::1]:7000", Destination("tls", "::1", 7000)),
    ],
)
def test_destinations(text: str, expected: Destination) -> None:
    assert Destination.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["arr.example:514", "http://arr:80", "tcp://arr", "udp://:514", "udp://a:99999", "udp://a/x"],
)
def test_bad_destinations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="TRIAGE_ATNA_SYSLOG"):
        Destination.parse(text)


# ---------------------------------------------------------------------------------------------
# On the wire


def _parse_frame(message: bytes) -> tuple[int, ET.Element, re.Match[bytes]]:
    match = FRAME.match(message)
    assert match, message[:200]
    assert match["app"] == b"triage" and match["msgid"] == b"IHE+RFC-3881"
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", match["ts"])
    assert match["xml"].decode("utf-8")
    return int(match["pri"]), ET.fromstring(match["xml"]), match


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "the sender closed the connection"
        data += chunk
    return data


def _read_octet_counted(conn: socket.socket) -> bytes:
    """One RFC 5425 frame: digits, a space, that many octets."""
    length = b""
    while not length.endswith(b" "):
        length += _read_exact(conn, 1)
        assert len(length) <= 10 and re.fullmatch(rb"[1-9]\d* ?", length), length
    return _read_exact(conn, int(length))


def _event_id(root: ET.Element) -> str | None:
    return _code(root.find("EventIdentification/EventID"))[0]


@pytest.fixture
def sender_factory() -> Iterator[list[SyslogSender]]:
    made: list[SyslogSender] = []
    yield made
    for sender in made:
        sender.close(timeout=2.0)


def _sender(made: list[SyslogSender], destination: str, **kwargs: object) -> SyslogSender:
    sender = SyslogSender(destination, source_id="triage@node1", host="node1", **kwargs)  # type: ignore[arg-type]
    made.append(sender)
    return sender


def test_udp_datagrams_are_rfc5424_audit_messages(sender_factory: list[SyslogSender]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(WAIT)
        sender = _sender(sender_factory, f"udp://127.0.0.1:{receiver.getsockname()[1]}")
        sender.submit(AuditEvent(action="login", actor="alice", source_address="127.0.0.1"), AT)
        sender.submit(AuditEvent(action="login", outcome=Outcome.failure, target="bob"), AT)
        got = [receiver.recvfrom(65535)[0] for _ in range(2)]
    assert sender.flush(WAIT) and sender.sent == 2 and sender.dropped == 0
    parsed = sorted((_parse_frame(d) for d in got), key=lambda p: -p[0])
    (ok_pri, ok, ok_match), (bad_pri, bad, _) = parsed
    assert ok_pri == 10 * 8 + 5 and bad_pri == 10 * 8 + 4
    assert ok_match["host"] == b"node1" and ok_match["ts"] == AT_TEXT.encode()
    assert _event_id(ok) == _event_id(bad) == "110114"
    assert _requestor(ok).get("UserID") == "alice"
    assert bad.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]


def test_tcp_frames_are_octet_counted_and_survive_a_closed_connection(
    sender_factory: list[SyslogSender],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)
        sender = _sender(sender_factory, f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        actions = ["view", "claim", "complete"]
        for action in actions:
            sender.submit(AuditEvent(action=action, actor="alice", target=UID))
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            roots = [_parse_frame(_read_octet_counted(conn))[1] for _ in actions]
        # the receiver closed that connection: the next message goes on a new one
        assert sender.flush(WAIT)
        sender.submit(AuditEvent(action="release", actor="alice", target=UID))
        conn2, _ = listener.accept()
        with conn2:
            conn2.settimeout(WAIT)
            roots.append(_parse_frame(_read_octet_counted(conn2))[1])
    assert [_event_id(r) for r in roots] == ["110103", "110111", "110111", "110111"]
    for root in roots:
        assert _study_objects(root)[0].get("ParticipantObjectID") == UID
    assert sender.flush(WAIT) and sender.sent == 4 and sender.dropped == 0


def test_tls_with_client_certificates_through_install_and_emit(
    tls_files: dict[str, Path],
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls_files["ca.pem"])
    server_ctx.load_cert_chain(tls_files["server.pem"], tls_files["server.key"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)
        settings = Settings(
            atna_syslog=f"tls://127.0.0.1:{listener.getsockname()[1]}",
            atna_tls_ca=tls_files["ca.pem"],
            atna_tls_cert=tls_files["client.pem"],
            atna_tls_key=tls_files["client.key"],
            atna_source_id="triage-test",
        )
        sender = install(settings)
        try:
            assert sender is not None and atna.installed() is sender
            atna.emit(
                AuditEvent(
                    action="account_role",
                    actor="cli:root",
                    target_kind="account",
                    target="bob",
                    detail={"role": "admin"},
                ),
                AT.replace(tzinfo=None),  # SQLite's naive UTC
            )
            raw, _ = listener.accept()
            raw.settimeout(WAIT)
            with server_ctx.wrap_socket(raw, server_side=True) as conn:
                peer = conn.getpeercert()
                assert peer is not None and peer["subject"] == ((("commonName", "client"),),)
                pri, root, match = _parse_frame(_read_octet_counted(conn))
            assert sender.flush(WAIT) and sender.sent == 1
        finally:
            atna.close()
    assert atna.installed() is None
    assert pri == 85 and match["ts"] == AT_TEXT.encode()
    assert _event_id(root) == "110113"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "triage-test"  # type: ignore[union-attr]


def test_nothing_is_sent_until_installed() -> None:
    assert install(Settings(atna_syslog=None)) is None
    atna.emit(AuditEvent(action="login", actor="alice"))  # a no-op, no error
    with pytest.raises(ValueError, match="TRIAGE_ATNA_SYSLOG"):
        install(Settings(atna_syslog="syslog.example:514"))
    assert atna.installed() is None


def test_a_refusing_destination_drops_counts_and_logs_once(
    sender_factory: list[SyslogSender], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as placeholder:  # a port nobody listens on: connections are refused
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="triage.audit.atna")
    sender = _sender(sender_factory, f"tcp://127.0.0.1:{port}", timeout=2.0)
    for i in range(20):
        sender.submit(AuditEvent(action="view", actor="alice", target=f"{UID}.{i}"))
    assert sender.flush(WAIT)
    assert sender.dropped == 20 and sender.sent == 0
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and f"tcp://127.0.0.1:{port}" in drops[0].getMessage()


def test_a_hung_destination_never_holds_the_caller(sender_factory: list[SyslogSender]) -> None:
    """A listener that never accepts: the TLS handshake hangs (for 30 s), the queue (2) fills,
    and every further submit returns at once with a drop counted."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        sender = _sender(
            sender_factory,
            f"tls://127.0.0.1:{listener.getsockname()[1]}",
            queue_size=2,
            timeout=30.0,
        )
        for _ in range(10):
            sender.submit(AuditEvent(action="login", actor="alice"))
        assert sender.dropped >= 7  # counted by submit itself: nothing waited
        assert not sender.flush(0.05)  # the thread is still stuck in the handshake
    finally:
        listener.close()  # resets the pending connection: the handshake fails at once
    assert sender.flush(WAIT)
    assert sender.sent == 0 and sender.dropped == 10


def test_an_unmapped_action_is_skipped_with_one_warning(
    sender_factory: list[SyslogSender], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="triage.audit.atna")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(WAIT)
        sender = _sender(sender_factory, f"udp://127.0.0.1:{receiver.getsockname()[1]}")
        sender.submit(AuditEvent(action="sneeze", actor="alice"))
        sender.submit(AuditEvent(action="sneeze", actor="alice"))
        sender.submit(AuditEvent(action="logout", actor="alice"))
        _, root, _ = _parse_frame(receiver.recvfrom(65535)[0])
    assert _event_id(root) == "110114"
    assert sender.flush(WAIT) and sender.sent == 1 and sender.dropped == 0
    assert len([r for r in caplog.records if "sneeze" in r.getMessage()]) == 1


def test_a_cli_account_change_reaches_the_syslog_repository(tmp_path: Path) -> None:
    """The wiring: ``triage accounts add`` appends to the chain, and the committed record is
    sent to TRIAGE_ATNA_SYSLOG as a Security Alert naming the new account."""
    from tests.conftest import run_cli

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(30)
        port = receiver.getsockname()[1]
        made = run_cli(
            ["accounts", "add", "ris", "--role", "integration", "--no-password"],
            tmp_path / "data",
            TRIAGE_ATNA_SYSLOG=f"udp://127.0.0.1:{port}",
        )
        assert made.returncode == 0, made.stderr
        datagram = receiver.recvfrom(65535)[0]
    _, root, _ = _parse_frame(datagram)
    assert _event_id(root) == "110113"
    assert b"ris" in datagram
