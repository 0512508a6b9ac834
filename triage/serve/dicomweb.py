"""DICOMweb STOW-RS: ``POST /dicomweb/studies[/{study_uid}]`` (PS3.18 10.5 Store Transaction).

Supported:

* ``Content-Type: multipart/related; type="application/dicom"; boundary=...`` (the ``type``
  parameter may be quoted, unquoted or absent; the boundary may be quoted). Each part is
  ``Content-Type: application/dicom`` (a ``transfer-syntax`` parameter is accepted and
  ignored: files are stored as received) holding one DICOM Part 10 file; a part without a
  Content-Type header is taken as ``application/dicom``. Line breaks are CRLF as RFC 2046
  requires; bare LF around boundaries and headers is tolerated.
* Every instance goes through :meth:`triage.ingest.store.Ingestor.ingest`, the same path as
  the C-STORE SCP: validated, written durably, indexed; rejected input is kept in
  quarantine (``GET /api/quarantine``).
* With ``{study_uid}`` in the path, an instance of another study is not stored: it is kept
  in quarantine and answered with Failure Reason 0xA900. PS3.18 Table I.2-2 defines no code
  for this case; 0xA9xx ("Data Set does not match") is the closest standard range (other
  implementations use private codes, e.g. 0xA901 or 0xC409).
* The response is the Store Instances Response Module (PS3.18 Annex I) as
  ``application/dicom+json``: Referenced SOP Sequence (with Warning Reason for instances
  stored with a warning), Failed SOP Sequence (with Failure Reason, the DICOM status code).
  Retrieve URL (Type 2) is present but empty: there is no WADO-RS retrieve here. Reasons
  in words are in the quarantine listing, never in the response (it carries no free text);
  a ``Warning: 299`` header points there when something failed.
* HTTP status: 200 all stored (a resend of a stored instance counts as stored), 202 some
  stored with failures or warnings, 409 nothing stored, 503 (with ``Retry-After``) nothing
  stored and every failure is "out of resources" (0xA7xx, the disk is full: retry later),
  400 unparseable multipart body, 413 body over ``app.state.max_upload_bytes``, 415 another
  request media type. An unexpected error while storing one part (the database is down)
  fails that part with 0xA700 instead of failing the whole request with a 500.

Not supported: the metadata + bulk data form of STOW-RS (``application/dicom+json`` or
``application/dicom+xml`` parts with ``application/octet-stream`` bulk data); such parts get
a Failed SOP Sequence item (Failure Reason 0xC000) and are kept in quarantine. Content
transfer encodings other than binary / 8bit / 7bit, XML responses and Accept negotiation
are not supported either.

Nothing from inside the data sets (patient data, UIDs) is logged or put in error bodies.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from triage.ingest.store import Ingestor, IngestOutcome, StoreStatus

log = logging.getLogger(__name__)

stow_router = APIRouter(tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
_DICOM = "application/dicom"
_MAX_BOUNDARY = 200  # RFC 2046 allows 70; be lenient with sloppy senders, not unbounded.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_MAX_HEADER_BYTES = 64 * 1024  # a part's header block; larger is not a real header
_IDENTITY_ENCODINGS = {"", "binary", "8bit", "7bit"}
UNSUPPORTED_PART_REASON = "unsupported part media type (only application/dicom parts are stored)"


class MultipartError(ValueError):
    """The request body is not a usable multipart body (answered with 400)."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters (names lower case, values unquoted).

    Lenient on purpose: unquoted values holding ``/`` or ``+`` (``type=application/dicom``)
    are common in STOW-RS requests although RFC 2045 wants them quoted.
    """
    pieces: list[str] = []
    current: list[str] = []
    in_quotes = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif in_quotes and ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            in_quotes = not in_quotes
        elif ch == ";" and not in_quotes:
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    media_type = pieces[0].strip().lower()
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, sep, raw = piece.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name.strip().lower()] = raw
    return media_type, params


@dataclass(frozen=True)
class Part:
    """One body part: its headers (names lower case) and where its content lies."""

    headers: dict[str, str]
    start: int
    end: int

    @property
    def media_type(self) -> str:
        value = self.headers.get("content-type")
        return _DICOM if value is None else parse_media_type(value)[0]

    @property
    def transfer_encoding(self) -> str:
        return self.headers.get("content-transfer-encoding", "").strip().lower()


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            continue
        text = line.decode("latin-1")
        if text[0] in " \t" and last is not None:  # a folded continuation line
            headers[last] += " " + text.strip()
            continue
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise MultipartError("a body part has a malformed header line")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


def _line_end(body: bytes | bytearray, pos: int) -> int | None:
    """The index just after the line break ending a delimiter line at ``pos``, or None when
    the rest of the line is not blank (then it was not a delimiter: the boundary was only
    the start of a longer string). The end of the body counts as a line break."""
    n = len(body)
    while pos < n and body[pos] in (0x20, 0x09):  # transport padding
        pos += 1
    if pos == n:
        return n
    if body[pos] == 0x0A:
        return pos + 1
    if body[pos] == 0x0D and pos + 1 < n and body[pos + 1] == 0x0A:
        return pos + 2
    return None


def _next_delimiter(body: bytes | bytearray, delim: bytes, pos: int) -> tuple[int, int, bool]:
    """The next delimiter line at or after ``pos``: (content end before its line break,
    index after the delimiter line, whether it is the close delimiter)."""
    needle = b"\n" + delim
    while True:
        i = body.find(needle, pos)
        if i < 0:
            raise MultipartError("multipart body is truncated: a part has no closing boundary")
        content_end = i - 1 if i > 0 and body[i - 1] == 0x0D else i
        after = i + len(needle)
        if body[after : after + 2] == b"--" and _line_end(body, after + 2) is not None:
            return content_end, after + 2, True  # the close delimiter; the epilogue follows
        line_end = _line_end(body, after)
        if line_end is not None:
            # A final delimiter without "--" at the very end of the body closes it too.
            return content_end, line_end, line_end == len(body)
        pos = i + 1


def _part_headers(body: bytes | bytearray, pos: int, end: int) -> tuple[dict[str, str], int]:
    """The headers of the part starting at ``pos`` and where its content starts."""
    for blank in (b"\r\n", b"\n"):
        if body[pos : pos + len(blank)] == blank:  # no headers at all
            return {}, pos + len(blank)
    limit = min(end, pos + _MAX_HEADER_BYTES)
    found = [
        (i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := body.find(sep, pos, limit)) >= 0
    ]
    if not found:
        raise MultipartError("a body part has no blank line after its headers")
    head_end, sep_len = min(found)
    return _parse_headers(bytes(body[pos:head_end])), head_end + sep_len


def split_multipart(body: bytes | bytearray, boundary: str) -> list[Part]:
    """Split a multipart body into parts without copying their content (linear time).

    Raises:
        MultipartError: no boundary delimiter, no parts, a truncated last part or a
            malformed part header.
    """
    if not boundary or len(boundary) > _MAX_BOUNDARY:
        raise MultipartError("the multipart boundary parameter is missing or too long")
    try:
        delim = b"--" + boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("the multipart boundary is not ASCII") from None
    # The first delimiter opens the body or follows a line break ending the preamble.
    pos: int | None = None
    if body.startswith(delim):
        after = len(delim)
        if body[after : after + 2] == b"--":
            raise MultipartError("the multipart body holds no parts")
        pos = _line_end(body, after)
    if pos is None:
        try:
            _, pos, closed = _next_delimiter(body, delim, 0)
        except MultipartError:
            raise MultipartError("no boundary delimiter found in the multipart body") from None
        if closed:
            raise MultipartError("the multipart body holds no parts")
    if pos >= len(body):
        raise MultipartError("the multipart body holds no parts")
    parts: list[Part] = []
    while True:
        content_end, next_pos, closed = _next_delimiter(body, delim, pos)
        headers, start = _part_headers(body, pos, content_end)
        parts.append(Part(headers, start, max(start, content_end)))
        if closed:
            return parts
        pos = next_pos


def is_uid(text: str) -> bool:
    """A syntactically valid UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def _uid_or_none(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip("\0 ")
    return text if is_uid(text) else None


def store_parts(
    ingestor: Ingestor,
    body: bytes | bytearray,
    parts: list[Part],
    *,
    source: str,
    study_uid: str | None,
) -> list[IngestOutcome]:
    """Store every part (blocking file I/O: run it in a worker thread)."""
    outcomes: list[IngestOutcome] = []
    for part in parts:
        with memoryview(body) as view:
            data = bytes(view[part.start : part.end])  # one copy, one part at a time
        if part.media_type != _DICOM or part.transfer_encoding not in _IDENTITY_ENCODINGS:
            # Not stored, but kept in quarantine: nothing is silently dropped.
            reason, status = UNSUPPORTED_PART_REASON, StoreStatus.cannot_understand
            now = datetime.now(UTC)
            qid = ingestor.keep(data, source=source, reason=reason, status=status, now=now)
            log.warning("STOW-RS part from %s refused (quarantine #%s): %s", source, qid, reason)
            outcomes.append(IngestOutcome(status, reason, quarantine_id=qid))
            continue
        outcomes.append(ingestor.ingest(data, source=source, expected_study=study_uid))
    return outcomes


def response_dataset(outcomes: list[IngestOutcome]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table I.1-1) for these outcomes."""
    ds = Dataset()
    ds.RetrieveURL = None  # Type 2, empty: no WADO-RS retrieve is offered
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for outcome in outcomes:
        item = Dataset()
        sop_class = _uid_or_none(outcome.SOPClassUID)
        sop_instance = _uid_or_none(outcome.SOPInstanceUID)
        if sop_class is not None:
            item.ReferencedSOPClassUID = sop_class
        if sop_instance is not None:
            item.ReferencedSOPInstanceUID = sop_instance
        if outcome.status.stored:
            item.RetrieveURL = None
            if outcome.status != StoreStatus.success:
                item.WarningReason = int(outcome.status)
            referenced.append(item)
        else:
            item.FailureReason = int(outcome.status)
            failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def http_status(outcomes: list[IngestOutcome]) -> int:
    """200 all stored, 202 partly or with warnings, 409 none (503 none, out of resources)."""
    stored = [o for o in outcomes if o.status.stored]
    if len(stored) == len(outcomes):
        return 200 if all(o.status == StoreStatus.success for o in stored) else 202
    if stored:
        return 202
    if all(0xA700 <= o.status < 0xA800 for o in outcomes):
        return 503
    return 409


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(status_code=400, detail="invalid Content-Length") from None
        if size > limit:
            raise HTTPException(
                status_code=413, detail=f"request body over the {limit}-byte upload limit"
            )
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise HTTPException(
                status_code=413, detail=f"request body over the {limit}-byte upload limit"
            )
        body += chunk
    return body


async def _stow(request: Request, study_uid: str | None) -> Response:
    media_type, params = parse_media_type(request.headers.get("content-type", ""))
    root_type = params.get("type", _DICOM).strip().lower()
    if media_type != "multipart/related" or root_type != _DICOM:
        raise HTTPException(
            status_code=415,
            detail='expected Content-Type: multipart/related; type="application/dicom"',
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise HTTPException(status_code=400, detail="multipart/related without a boundary")
    if study_uid is not None and not is_uid(study_uid):
        raise HTTPException(status_code=400, detail="the StudyInstanceUID in the URL is invalid")
    ingestor: Ingestor = request.app.state.ingestor
    limit: int = request.app.state.max_upload_bytes
    body = await _read_body(request, limit)
    try:
        parts = await run_in_threadpool(split_multipart, body, boundary)
    except MultipartError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    client = request.client.host if request.client is not None else "unknown"
    source = f"stow:{client}"
    outcomes = await run_in_threadpool(
        store_parts, ingestor, body, parts, source=source, study_uid=study_uid
    )
    del body
    status = http_status(outcomes)
    n_failed = sum(1 for o in outcomes if not o.status.stored)
    codes = sorted({f"0x{int(o.status):04X}" for o in outcomes})
    log.info(
        "STOW-RS from %s: %d part(s), %d stored, %d failed, statuses %s -> HTTP %d",
        source,
        len(outcomes),
        len(outcomes) - n_failed,
        n_failed,
        ",".join(codes),
        status,
    )
    headers: dict[str, str] = {}
    if n_failed:
        headers["Warning"] = f'299 triage "{n_failed} instance(s) failed; see GET /api/quarantine"'
    if status == 503:
        headers["Retry-After"] = "60"
    content = json.dumps(response_dataset(outcomes).to_json_dict())
    return Response(content=content, status_code=status, media_type=DICOM_JSON, headers=headers)


@stow_router.post("/dicomweb/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request) -> Response:
    """Store DICOM instances (multipart/related; type="application/dicom")."""
    return await _stow(request, None)


@stow_router.post("/dicomweb/studies/{study_uid}", summary="STOW-RS: store instances of a study")
async def store_study_instances(study_uid: str, request: Request) -> Response:
    """Store DICOM instances that belong to ``study_uid``; others are refused."""
    return await _stow(request, study_uid)
