"""From received bytes to a pydicom data set, or the reason there is none.

:func:`parse` is the one place where input is decoded. Every failure to read the input is
the input's fault and comes back as a reason (refused with 0xC000, kept in quarantine),
never as an exception: the byte structure is walked first (:mod:`triage.ingest.structure`:
lengths, VRs, nesting, Deflate inflated within a budget), then pydicom reads it, then the
attributes that ingest reads (``READ_AT_INGEST``) are decoded once, here, so that a value
that cannot be decoded is named here rather than failing a check or the index later.
Pixel data is read as bytes and never decoded.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from triage.ingest.structure import NOT_DICOM, Layout, Limits, StructureError, check_structure

# The attributes ingest reads (validation, the index, the order priority); nothing else in
# the data set is decoded at ingest.
READ_AT_INGEST = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "PhotometricInterpretation",
    "PixelData",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDescription",
    "StudyDate",
    "SeriesDescription",
    "BodyPartExamined",
    "CurrentPatientLocation",
    "InstitutionalDepartmentName",
    "RequestingService",
    "RequestedProcedurePriority",
    "StudyPriorityID",
    "RequestAttributesSequence",
)
READ_AT_INGEST_META = ("TransferSyntaxUID", "MediaStorageSOPClassUID")
READ_AT_INGEST_ITEMS = {"RequestAttributesSequence": ("RequestedProcedurePriority",)}


@dataclass(frozen=True)
class Parsed:
    """A parsed instance: the data set (attributes in ``READ_AT_INGEST`` decoded, pixel
    data as bytes) and a note when file meta had to be added (a bare data set)."""

    ds: Dataset
    coerced: str | None = None


class _PydicomNotes(logging.Handler):
    """Collects pydicom's reading warnings for the current thread while it parses a file.

    pydicom reads a truncated file without raising and only warns; these notes are the
    evidence. They are never written out: pydicom's messages can quote attribute values
    (patient data), so its logger does not propagate to the application's log.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        notes: list[str] | None = getattr(self.local, "notes", None)
        if notes is not None:
            notes.append(record.getMessage())

    @contextmanager
    def collect(self) -> Iterator[list[str]]:
        notes: list[str] = []
        self.local.notes = notes
        try:
            yield notes
        finally:
            self.local.notes = None


_NOTES = _PydicomNotes()
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.addHandler(_NOTES)
_pydicom_log.propagate = False


def _read(data: bytes, layout: Layout) -> Dataset:
    """pydicom's reading of input whose structure was checked."""
    if layout.inflated is None:
        return pydicom.dcmread(io.BytesIO(data), force=not layout.part10)
    # Deflate: the data set inflated within the budget, not pydicom's unbounded inflate.
    file_meta = FileMetaDataset(
        read_dataset(
            io.BytesIO(data[layout.meta_start : layout.meta_end]),
            is_implicit_VR=False,
            is_little_endian=True,
        )
    )
    dataset = read_dataset(
        io.BytesIO(layout.inflated),
        is_implicit_VR=layout.implicit_vr,
        is_little_endian=layout.little_endian,
    )
    ds = FileDataset(
        io.BytesIO(),
        dataset,
        preamble=data[:128] if layout.part10 else None,
        file_meta=file_meta,
        is_implicit_VR=layout.implicit_vr,
        is_little_endian=layout.little_endian,
    )
    ds.set_original_encoding(layout.implicit_vr, layout.little_endian, dataset._character_set)
    return ds


def _holds_nul(value: object) -> bool:
    """A NUL inside a text value (pydicom drops NULs that pad the end): no text VR allows
    one, and PostgreSQL cannot keep one in a text column of the index."""
    if isinstance(value, MultiValue):
        return any(_holds_nul(v) for v in value)
    return isinstance(value, str | PersonName) and "\x00" in str(value)


def _undecodable(ds: Dataset) -> str | None:
    """Decode the attributes ingest reads; the first that cannot be decoded, or None."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    for where, keywords in ((meta, READ_AT_INGEST_META), (ds, READ_AT_INGEST)):
        for keyword in keywords:
            try:
                value = where.get(keyword)
                values = [value]
                for item_keyword in READ_AT_INGEST_ITEMS.get(keyword, ()):
                    values += [item.get(item_keyword) for item in value or []]
            except MemoryError:
                raise
            except Exception as exc:
                return (
                    f"unreadable DICOM: {keyword} cannot be decoded (a value or length its VR"
                    f" does not allow: {type(exc).__name__})"
                )
            if any(_holds_nul(v) for v in values):
                return f"unreadable DICOM: {keyword} holds a NUL character inside a text value"
    return None


def parse(data: bytes, limits: Limits) -> Parsed | str:
    """The parsed instance, or the reason the input cannot be read (no patient data).

    Args:
        data: a Part 10 file as received, or a bare data set.
        limits: ceilings on sizes and nesting (see :class:`~triage.ingest.structure.Limits`).
    """
    try:
        layout = check_structure(data, limits)
    except StructureError as exc:
        return str(exc)
    walked_ts = layout.transfer_syntax
    try:
        with _NOTES.collect() as notes:
            ds = _read(data, layout)
            del layout  # the inflated copy, if any, is no longer needed
            problem = _undecodable(ds)
    except MemoryError:
        raise
    except Exception as exc:  # whatever pydicom raises on this input is the input's fault
        return f"unreadable DICOM: {type(exc).__name__}"
    if any("End of file reached" in n or "truncat" in n.lower() for n in notes):
        return "truncated DICOM: the file ends before its data set is complete"
    if problem:
        return problem
    has_meta = data[128:132] == b"DICM"
    if has_meta and len(ds) == 0:
        return "unreadable DICOM: no data set after the file meta (truncated or malformed)"
    if has_meta:
        ts = ds.file_meta.get("TransferSyntaxUID")
        if not ts:
            return "unreadable DICOM: file meta has no TransferSyntaxUID"
        if str(ts) != walked_ts:  # e.g. under a VR that keeps what UI's padding rule drops
            return (
                "unreadable DICOM: the file meta's TransferSyntaxUID does not read as the"
                " transfer syntax it names (a wrong VR or padding)"
            )
        return Parsed(ds)
    if len(ds) == 0 or "SOPInstanceUID" not in ds:
        return NOT_DICOM
    return Parsed(ds, "no Part 10 file meta: a file meta header was added")


def as_part10(ds: Dataset) -> bytes:
    """A bare data set written as a Part 10 file (file meta added, encoding kept)."""
    ds.ensure_file_meta()
    ts = (
        pydicom.uid.ImplicitVRLittleEndian
        if ds.is_implicit_VR
        else (
            pydicom.uid.ExplicitVRBigEndian
            if not ds.is_little_endian
            else pydicom.uid.ExplicitVRLittleEndian
        )
    )
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
