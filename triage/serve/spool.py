"""A request body streamed to a file within a size limit and the free-disk reserve.

STOW-RS bodies can be gigabytes and arrive many at once; held in memory, a handful would
take the server (with its DICOM listener and worker) down. :func:`spool_body` writes the
body to a file in the ingest temporary directory as it arrives, so the server's memory does
not grow with the size or the number of uploads. The file is named ``*.part``: one left by a
crash is removed at the next start (``triage.ingest.files.remove_stale_parts``).

:class:`FileBody` reads the file like bytes for the multipart parser, a window at a time,
so the body is never in memory whole; :class:`Spooled` deletes it when done.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import overload

from starlette.concurrency import run_in_threadpool

from triage.ingest.files import free_bytes

_WRITE_BYTES = 1024**2  # chunks are gathered to this size before a write
_CHECK_FREE_EVERY = 16 * 1024**2


class SpoolError(Exception):
    """The body was not spooled; ``str(exc)`` says why (no patient data)."""


class BodyTooLarge(SpoolError):
    """The body is (or declares itself) over the upload limit."""


class InvalidLength(SpoolError):
    """The request's Content-Length header is not a byte count."""


class DiskReserve(SpoolError):
    """Spooling the body would take the disk below the free-space reserve (retry later)."""


class FileBody:
    """A spooled file read like ``bytes`` (length, index, slice, ``find``) with ``pread``:
    never mapped nor read whole, so scanning a gigabyte costs a window of memory."""

    WINDOW = 4 * 1024**2

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    def __len__(self) -> int:
        return self._size

    def _read(self, offset: int, n: int) -> bytes:
        first = os.pread(self._fd, n, offset)  # a regular file gives all of it at once
        if len(first) == n:
            return first
        out = bytearray(first)
        while len(out) < n:
            chunk = os.pread(self._fd, n - len(out), offset + len(out))
            if not chunk:
                raise OSError("the spooled request body is shorter than it was")
            out += chunk
        return bytes(out)

    @overload
    def __getitem__(self, key: int, /) -> int: ...

    @overload
    def __getitem__(self, key: slice, /) -> bytes: ...

    def __getitem__(self, key: int | slice, /) -> int | bytes:
        if isinstance(key, int):
            index = key + self._size if key < 0 else key
            if not 0 <= index < self._size:
                raise IndexError("spooled body index out of range")
            return self._read(index, 1)[0]
        start, stop, step = key.indices(self._size)
        if step != 1:
            raise ValueError("a spooled body is sliced with step 1 only")
        return self._read(start, stop - start) if stop > start else b""

    def find(self, sub: bytes, start: int = 0, end: int | None = None, /) -> int:
        end = self._size if end is None else min(end, self._size)
        pos = max(start, 0)
        while pos + len(sub) <= end:
            window = self._read(pos, min(end, pos + self.WINDOW + len(sub) - 1) - pos)
            found = window.find(sub)
            if found >= 0:
                return pos + found
            pos += self.WINDOW
        return -1


class Spooled:
    """A spooled body: its file and size. ``with spooled.opened() as body`` gives the body
    as a :class:`FileBody`; :meth:`remove` deletes the file."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @contextmanager
    def opened(self) -> Iterator[FileBody]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield FileBody(fd, self.size)
        finally:
            os.close(fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _check_declared(declared: str | None, limit: int) -> None:
    if declared is None:
        return
    text = declared.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise InvalidLength("invalid Content-Length")
    if int(text) > limit:
        raise BodyTooLarge(f"request body over the {limit}-byte upload limit")


def _reserve_problem(directory: Path, incoming: int, min_free_bytes: int) -> str | None:
    free = free_bytes(directory)
    if free is not None and free - incoming < min_free_bytes:
        return (
            f"out of resources: less than {min_free_bytes // 2**20} MiB of disk would be free;"
            " retry later"
        )
    return None


async def spool_body(
    chunks: AsyncIterator[bytes],
    directory: Path,
    *,
    declared_length: str | None,
    limit: int,
    min_free_bytes: int,
) -> Spooled:
    """Write a request body to a new file in ``directory`` as it arrives.

    Args:
        chunks: the body as it arrives (``request.stream()``).
        declared_length: the request's Content-Length header, if any: a body declaring
            more than ``limit`` is refused before a byte is read.
        limit: the most bytes accepted.
        min_free_bytes: free disk space that must remain (``TRIAGE_MIN_FREE_BYTES``),
            checked before and while writing.

    Raises:
        BodyTooLarge, InvalidLength, DiskReserve: nothing is left on disk then (nor when
            the client goes away mid-body).
    """
    _check_declared(declared_length, limit)
    if declared_length is not None:
        problem = _reserve_problem(directory, int(declared_length.strip()), min_free_bytes)
        if problem:
            raise DiskReserve(problem)
    path = directory / f"{uuid.uuid4().hex}.stow.part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = checked = 0
    pending = bytearray()
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"request body over the {limit}-byte upload limit")
                pending += chunk
                if len(pending) >= _WRITE_BYTES:
                    await run_in_threadpool(fh.write, bytes(pending))
                    pending.clear()
                if size - checked >= _CHECK_FREE_EVERY:
                    checked = size
                    problem = await run_in_threadpool(
                        _reserve_problem, directory, 0, min_free_bytes
                    )
                    if problem:
                        raise DiskReserve(problem)
            if pending:
                await run_in_threadpool(fh.write, bytes(pending))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Spooled(path, size)
