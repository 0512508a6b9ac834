"""The file store: content-addressed paths and durable writes (temporary file, fsync,
rename, fsync of the directory). No DICOM and no database here."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (for unprivileged users), or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def hashed_name(uid: str) -> str:
    """Storage names derive from a hash of the UID, never from raw attribute text."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:24]


def instance_path(
    store_dir: Path, study_uid: str, series_uid: str, sop_uid: str, digest: str
) -> Path:
    """Where an instance is kept: hashes of its UIDs and the start of its content hash, so
    two different copies of one SOPInstanceUID never overwrite each other's file."""
    return (
        store_dir
        / hashed_name(study_uid)
        / hashed_name(series_uid)
        / f"{hashed_name(sop_uid)}-{digest[:16]}.dcm"
    )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: Path) -> None:
    """Create ``directory`` and missing parents; fsync the parent of each one created, so
    that a new study or series folder survives power loss like the file put in it."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # another thread made it (and fsyncs its parent)
        fsync_dir(d.parent)


def write_durably(data: bytes, dest: Path, tmp_dir: Path) -> None:
    """Write to a temporary file, fsync it, rename it into place and fsync the directory."""
    make_dirs_durably(dest.parent)
    tmp_name = tmp_dir / f"{uuid.uuid4().hex}.part"
    try:
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def remove_stale_parts(tmp_dir: Path, *, older_than_seconds: float = 60.0) -> int:
    """Delete temporary files left by a crash in the middle of a write (run at start).

    Only files older than ``older_than_seconds`` go, so a ``triage import`` writing into the
    same data directory at that moment keeps its own.
    """
    cutoff = time.time() - older_than_seconds
    # A STOW-RS body spooled by another server sharing the data directory is read for as
    # long as its parts take to store: only an hour-old one is left by a crash.
    spool_cutoff = time.time() - max(older_than_seconds, 3600.0)
    removed = 0
    for part in tmp_dir.glob("*.part"):
        try:
            limit = spool_cutoff if part.name.endswith(".stow.part") else cutoff
            if part.stat().st_mtime < limit:
                part.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
