"""Splitting a multipart body (RFC 2046) into parts, without copying their content.

The body is anything read like bytes (:class:`Body`: length, index, slice, ``find``):
``bytes`` in tests, or the file the request was spooled to
(:class:`triage.serve.spool.FileBody`), so that a body of a gigabyte is scanned without
being held in memory. Lenient where real senders are sloppy (bare LF, unquoted parameters,
transport padding), strict where leniency would guess (a part with no blank line after its
headers, a body without its closing delimiter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, overload

DICOM = "application/dicom"
_MAX_BOUNDARY = 200  # RFC 2046 allows 70; be lenient with sloppy senders, not unbounded.
_MAX_HEADER_BYTES = 64 * 1024  # a part's header block; larger is not a real header


class Body(Protocol):
    """A multipart body read like ``bytes``: in memory, or the file it was spooled to."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, key: int, /) -> int: ...

    @overload
    def __getitem__(self, key: slice, /) -> bytes: ...

    def find(self, sub: bytes, start: int = 0, end: int | None = None, /) -> int: ...


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
        return DICOM if value is None else parse_media_type(value)[0]

    @property
    def transfer_encoding(self) -> str:
        return self.headers.get("content-transfer-encoding", "").strip().lower()

    @property
    def length_problem(self) -> str | None:
        """Why the part's own ``Content-Length`` header (optional in a part) disagrees with
        its content, or None. A disagreement means the part was cut or padded on the way."""
        value = self.headers.get("content-length")
        if value is None:
            return None
        value = value.strip()
        if not value.isascii() or not value.isdigit() or len(value) > 19:
            return "the part's Content-Length header is not a byte count"
        declared, held = int(value), self.end - self.start
        if declared != held:
            return f"the part declares Content-Length {declared} but holds {held} bytes"
        return None


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


def _line_end(body: Body, pos: int) -> int | None:
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


def _next_delimiter(body: Body, delim: bytes, pos: int) -> tuple[int, int, bool]:
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


def _part_headers(body: Body, pos: int, end: int) -> tuple[dict[str, str], int]:
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


def split_multipart(body: Body, boundary: str) -> list[Part]:
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
    if body[: len(delim)] == delim:
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
