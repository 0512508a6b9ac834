"""Audit records as DICOM PS3.15 A.5 audit messages, sent to an IHE ATNA Audit Record
Repository by syslog (ITI-20).

Two halves:

* :func:`audit_message` is pure: one :class:`~triage.audit.chain.AuditEvent` → the XML of
  one ``AuditMessage`` (PS3.15 A.5.1 schema), built with :mod:`xml.etree.ElementTree`, which
  escapes every value. Which DICOM event each of our actions becomes is the table below.
* :class:`SyslogSender` frames messages as RFC 5424 syslog messages (facility 10
  ``authpriv``, severity 5 ``notice`` on success and 4 ``warning`` otherwise, APP-NAME
  ``triage``, MSGID ``IHE+RFC-3881``, no structured data, a UTF-8 BOM before the XML) and
  sends them over UDP (RFC 5426, one datagram each), TCP or TLS (RFC 5425 octet-counting
  framing, ``<length> <message>``) from one daemon thread behind a bounded queue. Sending
  never raises into the caller and never waits: a full queue or an unreachable destination
  drops the message, counts it and logs one line per outage. The database chain
  (:mod:`triage.audit.chain`) stays the record of truth; syslog is a copy kept off the
  machine.

:func:`install` starts a sender from the settings (``TRIAGE_ATNA_*``); :func:`emit` hands it
an event and does nothing while none is installed. Call :func:`emit` after the transaction
that wrote the record has committed, so that a rolled-back action is not reported.

Our actions and the DICOM messages they become (PS3.15 A.5.3):

============================================  ===============================================
action                                        message
============================================  ===============================================
``login`` / ``logout``                        110114 User Authentication, E, type 110122 Login
                                              / 110123 Logout (A.5.3.12)
``view``, ``study_view``                      110103 DICOM Instances Accessed, R (A.5.3.6)
``claim``, ``renew``, ``release``,            110111 Procedure Record, U (A.5.3.15), with a
``complete``, ``acknowledge``, ``feedback``   local EventTypeCode naming the step
``query``, ``worklist``                       110112 Query, E (A.5.3.10)
``export``                                    110106 Export, R (A.5.3.4)
``account_create``                            110113 Security Alert, E, types 110137 User
                                              security Attributes Changed and 110136 Security
                                              Roles Changed (A.5.3.11)
``account_role``, ``account_grants``          110113 Security Alert, E, type 110136
``account_disable``, ``account_enable``,      110113 Security Alert, E, type 110137
``account_password``, ``token_create``,
``token_revoke``
``audit_verify`` (failure)                    110113 Security Alert, E, outcome 12, a local
                                              type "Audit Trail Integrity Failure"
``audit_verify`` (success), ``audit_list``    110101 Audit Log Used, R (A.5.3.2)
============================================  ===============================================

Why these:

* A study page shows the study's findings and key images made from its instances: that is
  DICOM Instances Accessed (read), whose participant object is the study by its
  StudyInstanceUID (110180), the identifier we hold. Patient Record (110110) is for patient
  records "where specific DICOM SOP Instances are not involved" and its only object is the
  patient by Patient ID.
* Claim, renew, release and complete change the reading state of a requested procedure (the
  study on the worklist), not its instances and not the patient's record: Procedure Record
  (update), whose object is again the study by StudyInstanceUID.
* 110136 and 110137 are EventTypeCodes of Security Alert in DICOM (CID 403), not EventIDs:
  account and token changes are Security Alerts carrying them, with the changed account as
  the alert subject and the required "Alert Description".
* A broken audit chain means the records may have been altered: a Security Alert with
  outcome 12 ("the security system may have been compromised").

Patient data: the StudyInstanceUID only. When an event's ``detail`` carries ``PatientID``
the Patient object that A.5.3.4/6/15 require is added with it (RFC-3881 "Patient Number");
patient names are never written, whatever ``detail`` holds. Without ``PatientID`` the
Patient object is left out, a knowing departure from those tables (repositories can join on
the StudyInstanceUID).

Identifiers (PS3.15 A.5.2.1): a person is its username (``actor``), with its role as an
extra RoleIDCode in the local ``99TRIAGE`` scheme; the triage process is its operating
system process id, AlternativeUserID ``AETITLES=<AE title>``, UserName ``triage``, at the
host name (NetworkAccessPointTypeCode 1); a person's network access point is the client
address (type 2 for an IP address, 1 for a name; the host for ``local`` CLI use).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from triage.audit.chain import AuditEvent, Outcome

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger(__name__)

DCM = "DCM"
RFC_3881 = "RFC-3881"
LOCAL_SCHEME = "99TRIAGE"  # a private coding scheme (PS3.16 8.2: "99" prefix)

APP_NAME = "triage"
MSGID = "IHE+RFC-3881"  # ITI TF-2 3.20.4.1.2
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
BOM = b"\xef\xbb\xbf"
UDP_MAX_BYTES = 65507
_MAX_VALUE_CHARS = 1024


@dataclass(frozen=True)
class Code:
    """A coded value as the audit schema writes it: csd-code, codeSystemName, originalText."""

    code: str
    system: str
    meaning: str


# EventID (PS3.15 A.5.3)
EV_AUDIT_LOG_USED = Code("110101", DCM, "Audit Log Used")
EV_INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
EV_EXPORT = Code("110106", DCM, "Export")
EV_PROCEDURE_RECORD = Code("110111", DCM, "Procedure Record")
EV_QUERY = Code("110112", DCM, "Query")
EV_SECURITY_ALERT = Code("110113", DCM, "Security Alert")
EV_USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")
# EventTypeCode
TYPE_LOGIN = Code("110122", DCM, "Login")
TYPE_LOGOUT = Code("110123", DCM, "Logout")
TYPE_SECURITY_ROLES_CHANGED = Code("110136", DCM, "Security Roles Changed")
TYPE_USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", DCM, "User security Attributes Changed")
TYPE_AUDIT_CHAIN_BROKEN = Code("AUDIT-CHAIN", LOCAL_SCHEME, "Audit Trail Integrity Failure")
TYPE_READING = {
    "claim": Code("CLAIM", LOCAL_SCHEME, "Reading Claimed"),
    "renew": Code("RENEW", LOCAL_SCHEME, "Reading Claim Renewed"),
    "release": Code("RELEASE", LOCAL_SCHEME, "Reading Claim Released"),
    "complete": Code("COMPLETE", LOCAL_SCHEME, "Reading Completed"),
    "acknowledge": Code("ACKNOWLEDGE", LOCAL_SCHEME, "Critical Finding Acknowledged"),
    "feedback": Code("FEEDBACK", LOCAL_SCHEME, "AI Finding Judged"),
}
# RoleIDCode
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")
ROLE_DESTINATION_MEDIA = Code("110154", DCM, "Destination Media")
MEDIA_URI = Code("110037", DCM, "URI")
# ParticipantObjectIDTypeCode
ID_PATIENT_NUMBER = Code("2", RFC_3881, "Patient Number")
ID_USER_IDENTIFIER = Code("11", RFC_3881, "User Identifier")
ID_URI = Code("12", RFC_3881, "URI")
ID_STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
ID_NODE = Code("110182", DCM, "Node ID")

AUDIT_LOG_URI = "urn:x-triage:audit-chain"

OUTCOME_SUCCESS = "0"
OUTCOME_MINOR_FAILURE = "4"
OUTCOME_MAJOR_FAILURE = "12"

LOGIN_ACTIONS = {"login": TYPE_LOGIN, "logout": TYPE_LOGOUT}
VIEW_ACTIONS = frozenset({"view", "study_view"})
READING_ACTIONS = frozenset(TYPE_READING)
QUERY_ACTIONS = frozenset({"query", "worklist"})
SECURITY_ACTIONS: dict[str, tuple[Code, ...]] = {
    "account_create": (TYPE_USER_SECURITY_ATTRIBUTES_CHANGED, TYPE_SECURITY_ROLES_CHANGED),
    "account_role": (TYPE_SECURITY_ROLES_CHANGED,),
    "account_disable": (TYPE_USER_SECURITY_ATTRIBUTES_CHANGED,),
    "account_enable": (TYPE_USER_SECURITY_ATTRIBUTES_CHANGED,),
    "account_password": (TYPE_USER_SECURITY_ATTRIBUTES_CHANGED,),
    "account_grants": (TYPE_SECURITY_ROLES_CHANGED,),
    "token_create": (TYPE_USER_SECURITY_ATTRIBUTES_CHANGED,),
    "token_revoke": (TYPE_USER_SECURITY_ATTRIBUTES_CHANGED,),
}
AUDIT_ACTIONS = frozenset({"audit_verify", "audit_list"})

MAPPED_ACTIONS: frozenset[str] = frozenset(
    {*LOGIN_ACTIONS, *VIEW_ACTIONS, *READING_ACTIONS, *QUERY_ACTIONS, "export"}
    | set(SECURITY_ACTIONS)
    | AUDIT_ACTIONS
)

# detail keys never written to a message (secrets; patient data other than PatientID)
_HIDDEN_DETAIL = re.compile(r"password|secret|patient|name$", re.IGNORECASE)
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class UnmappedActionError(ValueError):
    """The action has no audit message (see :data:`MAPPED_ACTIONS`)."""


# ---------------------------------------------------------------------------------------------
# The message (pure)


def _text(value: object, limit: int = _MAX_VALUE_CHARS) -> str:
    """A value as XML 1.0 can carry it: characters XML forbids replaced, length bounded.
    (ElementTree escapes ``<``, ``&`` and quotes; it does not refuse control characters.)"""
    return _XML_ILLEGAL.sub("\ufffd", str(value))[:limit]


def _iso(at: datetime) -> str:
    """UTC with microseconds and ``Z``; a naive time is taken as UTC (what SQLite returns)."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _access_point(address: str | None, host: str) -> tuple[str, str]:
    """(NetworkAccessPointID, NetworkAccessPointTypeCode): 2 for an IP address, 1 for a name."""
    if not address or address == "local":
        return host, "1"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return address, "1"
    return address, "2"


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": _text(code.code), "codeSystemName": code.system, "originalText": code.meaning},
    )


@dataclass(frozen=True)
class _Participant:
    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None
    access_point: tuple[str, str] | None = None
    media_type: Code | None = None

    def write(self, root: ET.Element) -> None:
        attrs = {"UserID": _text(self.user_id)}
        if self.alternative_user_id:
            attrs["AlternativeUserID"] = _text(self.alternative_user_id)
        if self.user_name:
            attrs["UserName"] = _text(self.user_name)
        attrs["UserIsRequestor"] = "true" if self.requestor else "false"
        if self.access_point is not None:
            attrs["NetworkAccessPointID"] = _text(self.access_point[0])
            attrs["NetworkAccessPointTypeCode"] = self.access_point[1]
        el = ET.SubElement(root, "ActiveParticipant", attrs)
        for role in self.roles:
            _coded(el, "RoleIDCode", role)
        if self.media_type is not None:
            _coded(ET.SubElement(el, "MediaIdentifier"), "MediaType", self.media_type)


@dataclass(frozen=True)
class _Object:
    object_id: str
    id_type: Code
    type_code: str
    role: str | None = None
    name: str | None = None
    query: bytes | None = None
    details: tuple[tuple[str, str], ...] = ()

    def write(self, root: ET.Element) -> None:
        attrs = {
            "ParticipantObjectID": _text(self.object_id),
            "ParticipantObjectTypeCode": self.type_code,
        }
        if self.role is not None:
            attrs["ParticipantObjectTypeCodeRole"] = self.role
        el = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
        _coded(el, "ParticipantObjectIDTypeCode", self.id_type)
        if self.name is not None:
            ET.SubElement(el, "ParticipantObjectName").text = _text(self.name)
        elif self.query is not None:
            ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(self.query).decode()
        for kind, value in self.details:
            ET.SubElement(
                el,
                "ParticipantObjectDetail",
                {"type": kind, "value": base64.b64encode(value.encode("utf-8")).decode()},
            )


def _study(uid: str | None) -> _Object:
    return _Object(uid or "", ID_STUDY_INSTANCE_UID, "2", "3")


def _patient(detail: Mapping[str, Any]) -> list[_Object]:
    patient_id = detail.get("PatientID")
    if not isinstance(patient_id, str) or not patient_id:
        return []
    return [_Object(patient_id, ID_PATIENT_NUMBER, "1", "1")]


def _description(event: AuditEvent) -> str:
    """The free text of a Security Alert: the action, its target and the plain detail values
    (secrets and any patient field left out)."""
    parts = [event.action]
    if event.target_kind or event.target:
        parts.append(f"{event.target_kind or 'target'} {event.target or '-'}")
    for key in sorted(event.detail):
        value = event.detail[key]
        if _HIDDEN_DETAIL.search(key) or not isinstance(value, str | int | float | bool):
            continue
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    if event.outcome != Outcome.success:
        text += " (failed)"
    return _text(text, 2048)


def _failure_reason(event: AuditEvent) -> str | None:
    if event.outcome == Outcome.success:
        return None
    for key in ("reason", "problem", "error"):
        value = event.detail.get(key)
        if isinstance(value, str) and value:
            return _text(value, 512)
    return None


def audit_message(
    event: AuditEvent,
    *,
    at: datetime,
    source_id: str,
    host: str,
    process_id: str | None = None,
    ae_title: str | None = None,
    enterprise_site_id: str | None = None,
) -> bytes:
    """The DICOM PS3.15 A.5 ``AuditMessage`` of one audit record, as UTF-8 XML.

    Args:
        event: the record (``action`` must be one of :data:`MAPPED_ACTIONS`).
        at: when it happened (a naive time is UTC).
        source_id: AuditSourceID (this installation).
        host: this node's name: the process's network access point.
        process_id: the process's UserID (default: this process's id).
        ae_title: the DICOM AE title, as AlternativeUserID ``AETITLES=...``.
        enterprise_site_id: AuditEnterpriseSiteID, when set.

    Raises:
        UnmappedActionError: the action has no audit message.
    """
    action = event.action
    failed = event.outcome != Outcome.success
    outcome = OUTCOME_MINOR_FAILURE if failed else OUTCOME_SUCCESS
    person_roles: tuple[Code, ...] = ()
    if event.actor_role:
        person_roles = (
            Code(_text(event.actor_role, 64), LOCAL_SCHEME, _text(event.actor_role, 64)),
        )
    person_ap = _access_point(event.source_address, host)
    process = _Participant(
        user_id=process_id or str(os.getpid()),
        requestor=False,
        alternative_user_id=f"AETITLES={ae_title}" if ae_title else None,
        user_name=APP_NAME,
        access_point=(host, "1"),
    )

    def person(*roles: Code, requestor: bool = True, user_id: str | None = None) -> _Participant:
        return _Participant(
            user_id=user_id or event.actor or "unknown",
            requestor=requestor,
            roles=roles + person_roles,
            access_point=person_ap,
        )

    node_subject = _Object(
        host, ID_NODE, "2", "13", details=(("Alert Description", _description(event)),)
    )
    type_codes: tuple[Code, ...] = ()
    participants: list[_Participant]
    objects: list[_Object] = []

    if action in LOGIN_ACTIONS:
        event_id, action_code, type_codes = EV_USER_AUTHENTICATION, "E", (LOGIN_ACTIONS[action],)
        attempted = event.actor
        if attempted is None and event.target_kind == "account":
            attempted = event.target
        participants = [person(user_id=attempted), process]
    elif action in VIEW_ACTIONS:
        event_id, action_code = EV_INSTANCES_ACCESSED, "R"
        participants = [person(), process]
        objects = [_study(event.target), *_patient(event.detail)]
    elif action in READING_ACTIONS:
        event_id, action_code, type_codes = EV_PROCEDURE_RECORD, "U", (TYPE_READING[action],)
        participants = [person(), process]
        objects = [_study(event.target), *_patient(event.detail)]
    elif action in QUERY_ACTIONS:
        event_id, action_code = EV_QUERY, "E"
        participants = [
            person(ROLE_SOURCE),
            replace(process, roles=(ROLE_DESTINATION,)),
        ]
        query = event.detail.get("query")
        objects = [
            _Object(
                event.target or "/api/worklist",
                ID_URI,
                "2",
                "24",
                query=_text(query if query is not None else "").encode("utf-8"),
            )
        ]
    elif action == "export":
        event_id, action_code = EV_EXPORT, "R"
        destination = event.detail.get("destination")
        destination = _text(destination) if isinstance(destination, str) and destination else None
        media_ap: tuple[str, str] | None = None
        if destination:
            split = urlsplit(destination)
            if split.scheme and split.password is not None:  # never a password in a URL
                netloc = split.netloc.rpartition("@")[2]
                destination = split._replace(netloc=netloc).geturl()
            media_ap = (destination, "5") if split.scheme else _access_point(destination, host)
        participants = [
            person(ROLE_SOURCE),
            replace(process, roles=(ROLE_SOURCE,)),
            _Participant(
                user_id=destination or person_ap[0],
                requestor=False,
                roles=(ROLE_DESTINATION_MEDIA,),
                access_point=media_ap or person_ap,
                media_type=MEDIA_URI,
            ),
        ]
        objects = [_study(event.target), *_patient(event.detail)]
    elif action in SECURITY_ACTIONS:
        event_id, action_code, type_codes = EV_SECURITY_ALERT, "E", SECURITY_ACTIONS[action]
        participants = [person(), process]
        account = event.target if event.target_kind == "account" else event.detail.get("account")
        if isinstance(account, str) and account:
            objects = [
                _Object(
                    account,
                    ID_USER_IDENTIFIER,
                    "2",
                    "11",
                    details=(("Alert Description", _description(event)),),
                )
            ]
        else:
            objects = [node_subject]
    elif action == "audit_verify" and failed:
        event_id, action_code, type_codes = EV_SECURITY_ALERT, "E", (TYPE_AUDIT_CHAIN_BROKEN,)
        outcome = OUTCOME_MAJOR_FAILURE
        participants = [person(), process]
        objects = [node_subject]
    elif action in AUDIT_ACTIONS:
        event_id, action_code = EV_AUDIT_LOG_USED, "R"
        participants = [person(), process]
        objects = [_Object(AUDIT_LOG_URI, ID_URI, "2", "13", name="Security Audit Log")]
    else:
        raise UnmappedActionError(f"no ATNA audit message for the action {action!r}")

    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action_code,
            "EventDateTime": _iso(at),
            "EventOutcomeIndicator": outcome,
        },
    )
    _coded(ident, "EventID", event_id)
    for code in type_codes:
        _coded(ident, "EventTypeCode", code)
    reason = _failure_reason(event)
    if reason:
        ET.SubElement(ident, "EventOutcomeDescription").text = reason
    for participant in participants:
        participant.write(root)
    source_attrs = {"AuditSourceID": _text(source_id, 256)}
    if enterprise_site_id:
        source_attrs = {"AuditEnterpriseSiteID": _text(enterprise_site_id, 256), **source_attrs}
    source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server
    for obj in objects:
        obj.write(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------------
# Syslog (RFC 5424) framing


def _printable(value: str, limit: int) -> str:
    """A header field as RFC 5424 allows it: PRINTUSASCII, bounded; ``-`` when empty."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def syslog_message(
    xml: bytes, *, at: datetime, host: str, failed: bool, process_id: str | None = None
) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying an audit message (ITI-20): PRI of facility 10
    (authpriv) with severity 5 (notice) or, for a failure, 4 (warning); version 1; the event
    time; HOSTNAME; APP-NAME ``triage``; PROCID; MSGID ``IHE+RFC-3881``; no structured
    data; the BOM and the UTF-8 XML."""
    severity = SEVERITY_WARNING if failed else SEVERITY_NOTICE
    header = " ".join(
        (
            f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
            _iso(at),
            _printable(host, 255),
            APP_NAME,
            _printable(process_id or str(os.getpid()), 128),
            MSGID,
            "-",
        )
    )
    return header.encode("ascii") + b" " + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 octet-counting frame: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


# ---------------------------------------------------------------------------------------------
# The sender

Transport = Literal["udp", "tcp", "tls"]
_DEFAULT_PORTS: dict[str, int | None] = {"udp": 514, "tcp": None, "tls": 6514}


@dataclass(frozen=True)
class Destination:
    transport: Transport
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``udp://host[:514]``, ``tcp://host:port`` or ``tls://host[:6514]``."""
        split = urlsplit(text.strip())
        scheme = split.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(
                f"TRIAGE_ATNA_SYSLOG {text!r}: expected udp://host[:port], tcp://host:port or"
                " tls://host[:port]"
            )
        try:
            port = split.port or _DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise ValueError(f"TRIAGE_ATNA_SYSLOG {text!r}: {exc}") from None
        if not split.hostname or port is None or split.path not in ("", "/"):
            raise ValueError(
                f"TRIAGE_ATNA_SYSLOG {text!r}: needs a host"
                + (" and a port" if scheme == "tcp" else "")
                + " and nothing after them"
            )
        transport: Transport = "udp" if scheme == "udp" else "tcp" if scheme == "tcp" else "tls"
        return cls(transport, split.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


class SyslogSender:
    """Sends audit messages to one syslog destination from a daemon thread.

    :meth:`submit` builds the message on the caller's thread (microseconds) and puts it on a
    bounded queue without waiting; the thread sends one at a time. A message is dropped, and
    counted in :attr:`dropped`, when the queue is full, when sending it fails (it is not
    retried: the database chain keeps it) and, for ``timeout`` seconds after a failure, without
    trying. The first drop after a success is logged in one line, and delivery working again
    in another. A TCP/TLS connection is kept open and opened again when the peer closed it.
    """

    def __init__(
        self,
        destination: str | Destination,
        *,
        source_id: str,
        host: str,
        ae_title: str | None = None,
        enterprise_site_id: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        queue_size: int = 1000,
        timeout: float = 5.0,
    ) -> None:
        self.destination = (
            destination if isinstance(destination, Destination) else Destination.parse(destination)
        )
        if self.destination.transport == "tls" and tls_context is None:
            tls_context = ssl.create_default_context()
        self.source_id = source_id
        self.host = host
        self.ae_title = ae_title
        self.enterprise_site_id = enterprise_site_id
        self.timeout = timeout
        self._tls = tls_context
        self._process_id = str(os.getpid())
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max(1, queue_size))
        self._cond = threading.Condition()
        self._pending = 0
        self._sent = 0
        self._dropped = 0
        self._failing = False
        self._closed = False
        self._unmapped: set[str] = set()
        self._sock: socket.socket | None = None
        self._udp_address: Any = None
        self._retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name="atna-syslog", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------

    @property
    def sent(self) -> int:
        with self._cond:
            return self._sent

    @property
    def dropped(self) -> int:
        with self._cond:
            return self._dropped

    def frame(self, event: AuditEvent, at: datetime) -> bytes:
        """The bytes that go on the wire for one event (an octet-counted frame on TCP/TLS)."""
        xml = audit_message(
            event,
            at=at,
            source_id=self.source_id,
            host=self.host,
            process_id=self._process_id,
            ae_title=self.ae_title,
            enterprise_site_id=self.enterprise_site_id,
        )
        message = syslog_message(
            xml,
            at=at,
            host=self.host,
            failed=event.outcome != Outcome.success,
            process_id=self._process_id,
        )
        return message if self.destination.transport == "udp" else octet_counted(message)

    def submit(self, event: AuditEvent, at: datetime | None = None) -> None:
        """Queue one event's message; never raises, never waits."""
        try:
            if self._closed:
                self._drop("the sender is closed")
                return
            try:
                data = self.frame(event, at or datetime.now(UTC))
            except UnmappedActionError:
                with self._cond:
                    first = event.action not in self._unmapped
                    self._unmapped.add(event.action)
                if first:
                    log.warning(
                        "ATNA syslog: no audit message for the action %r; it is kept only in"
                        " the database audit chain",
                        event.action,
                    )
                return
            if self.destination.transport == "udp" and len(data) > UDP_MAX_BYTES:
                self._drop(f"a message of {len(data)} bytes does not fit in a UDP datagram")
                return
            with self._cond:
                self._pending += 1
            try:
                self._queue.put_nowait(data)
            except queue.Full:
                self._done()
                self._drop(f"the queue of {self._queue.maxsize} messages is full")
        except Exception:  # the caller's action already happened; never fail it
            log.exception("ATNA syslog: could not queue an audit message")

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message was sent or dropped; False if ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for ``timeout`` seconds at most), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        try:
            self._queue.put(None, timeout=max(0.01, timeout))
        except queue.Full:
            pass
        self._thread.join(timeout)

    # -- the thread's side ------------------------------------------------------------------

    def _done(self) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def _drop(self, reason: str) -> None:
        with self._cond:
            self._dropped += 1
            first = not self._failing
            self._failing = True
        if first:
            log.warning(
                "ATNA syslog: audit message to %s dropped (%s); later drops are counted, not"
                " logged, until delivery works again; the database audit chain keeps every record",
                self.destination,
                reason,
            )

    def _delivered(self) -> None:
        with self._cond:
            self._sent += 1
            recovered = self._failing
            self._failing = False
            dropped = self._dropped
        if recovered:
            log.warning(
                "ATNA syslog: delivering to %s again (%d message(s) dropped since start)",
                self.destination,
                dropped,
            )

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                break
            try:
                self._deliver(data)
            except Exception:  # keep the thread alive whatever happens
                log.exception("ATNA syslog: unexpected error")
                self._drop("unexpected error")
            finally:
                self._done()
        self._close_socket()

    def _deliver(self, data: bytes) -> None:
        if time.monotonic() < self._retry_at:
            self._drop("the destination failed moments ago")
            return
        try:
            self._send(data)
        except OSError as exc:  # ssl.SSLError and socket.timeout are OSErrors
            self._close_socket()
            self._retry_at = time.monotonic() + self.timeout
            self._drop(f"{type(exc).__name__}: {exc}")
            return
        self._delivered()

    def _send(self, data: bytes) -> None:
        dest = self.destination
        if dest.transport == "udp":
            if self._sock is None:
                family, kind, proto, _, address = socket.getaddrinfo(
                    dest.host, dest.port, type=socket.SOCK_DGRAM
                )[0]
                self._sock = socket.socket(family, kind, proto)
                self._sock.settimeout(self.timeout)
                self._udp_address = address
            self._sock.sendto(data, self._udp_address)
            return
        if self._sock is not None and self._peer_closed(self._sock):
            self._close_socket()
        if self._sock is None:
            sock = socket.create_connection((dest.host, dest.port), timeout=self.timeout)
            try:
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=dest.host)
            except BaseException:
                sock.close()
                raise
            sock.settimeout(self.timeout)
            self._sock = sock
        self._sock.sendall(data)

    def _peer_closed(self, sock: socket.socket) -> bool:
        """Whether the receiver closed (or reset) the connection, which would lose the next
        message. A syslog receiver sends nothing; TLS 1.3 session tickets are read and kept."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        try:
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            finally:
                sock.settimeout(self.timeout)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        return data == b""

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


# ---------------------------------------------------------------------------------------------
# The process-wide hook

_installed: SyslogSender | None = None
_install_lock = threading.Lock()


def _tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(settings.atna_tls_ca) if settings.atna_tls_ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.atna_tls_cert is not None:
        context.load_cert_chain(
            str(settings.atna_tls_cert),
            str(settings.atna_tls_key) if settings.atna_tls_key else None,
        )
    return context


def install(settings: Settings) -> SyslogSender | None:
    """Start the sender ``TRIAGE_ATNA_SYSLOG`` names (replacing one installed before); None,
    and :func:`emit` a no-op, when it is not set.

    Raises:
        ValueError: the destination is not a udp://, tcp:// or tls:// address.
        OSError: a TLS certificate or key file cannot be read.
    """
    global _installed
    sender = None
    if settings.atna_syslog:
        destination = Destination.parse(settings.atna_syslog)
        host = socket.gethostname() or "localhost"
        sender = SyslogSender(
            destination,
            source_id=settings.atna_source_id or f"{APP_NAME}@{host}",
            host=host,
            ae_title=settings.ae_title,
            enterprise_site_id=settings.atna_enterprise_site_id,
            tls_context=_tls_context(settings) if destination.transport == "tls" else None,
            queue_size=settings.atna_queue_size,
            timeout=settings.atna_timeout_seconds,
        )
    with _install_lock:
        previous, _installed = _installed, sender
    if previous is not None:
        previous.close(timeout=1.0)
    return sender


def installed() -> SyslogSender | None:
    return _installed


def emit(event: AuditEvent, at: datetime | None = None) -> None:
    """Send one audit record to the installed sender, if any. Never raises, never waits;
    safe from any thread."""
    sender = _installed
    if sender is not None:
        sender.submit(event, at)


def close(timeout: float = 5.0) -> None:
    """Flush and stop the installed sender (at shutdown; in tests)."""
    global _installed
    with _install_lock:
        sender, _installed = _installed, None
    if sender is not None:
        sender.close(timeout)
