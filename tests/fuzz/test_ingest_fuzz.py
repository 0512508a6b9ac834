"""Bounded fuzzing of the one ingest path (``Ingestor.ingest``) with hypothesis.

Valid instances are generated (CT, CR, DX, MR, secondary capture, a text SR; implicit,
explicit little and big endian, Deflate and encapsulated transfer syntaxes; sequences,
private sequences, multi-frame, bare data sets without file meta), serialised by pydicom,
then their bytes are mutated: bits flipped, bytes set to NUL, 0xFF, backslash or ESC (also
inside text values), truncated, bytes inserted, deleted or duplicated, length fields
overwritten with huge values, VR bytes changed; for Deflate files also inside the inflated
data set (re-compressed), where the walker has to find the fault.

Properties, on a real database and file store (SQLite, and PostgreSQL too when
``TRIAGE_TEST_POSTGRES_URL`` is set): ``ingest`` never raises and never answers 0xA700 (the
disk and the database are fine) nor "could not be checked (internal error ...)" (a check
that crashed); what it answers is either stored (and indexed) or refused with a status a
sender does not retry and kept in quarantine; no temporary file is left behind. Unmutated
instances are stored. The runs are derandomised and bounded, so CI sees the same examples
every time; ``--hypothesis-show-statistics`` lists the outcomes reached.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.filewriter
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from tests.ingest.malformed import split
from tests.ingest.test_store import ct_bytes
from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow
from triage.ingest.store import Ingestor, IngestOutcome, StoreStatus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values

MiB = 1024**2
# Small ceilings: a mutated length field is refused from the header, never allocated.
LIMITS = {"max_pixel_bytes": 4 * MiB, "max_element_bytes": 1 * MiB, "max_inflated_bytes": 4 * MiB}
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one store and database for all examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
UID_ROOT = "1.2.826.0.1.3680043.10.999"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)
ENCAPSULATED = (RLELossless, JPEGBaseline8Bit, JPEG2000Lossless)
# (SOP class, Modality, photometric interpretations allowed)
KINDS = {
    "CT": (CTImageStorage, "CT", ("MONOCHROME2",)),
    "CR": (ComputedRadiographyImageStorage, "CR", ("MONOCHROME1", "MONOCHROME2")),
    "DX": (DigitalXRayImageStorageForPresentation, "DX", ("MONOCHROME1", "MONOCHROME2")),
    "MR": (MRImageStorage, "MR", ("MONOCHROME2",)),
    "SC": (SecondaryCaptureImageStorage, "OT", ("MONOCHROME2", "RGB")),
    "SR": (BASIC_TEXT_SR, "SR", ()),
}
VRS = [
    vr.encode()
    for vr in "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM "
    "UC UI UL UN UR US UT UV".split()
]
_VR_RE = re.compile(b"(?=(" + b"|".join(VRS) + b"))")
_TEXT_VRS = {b"AE", b"AS", b"CS", b"DA", b"DS", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST", b"TM"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
HUGE = [0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFF0, 0x80000000, 0x7FFFFFFF, 0x10000001, 0xFFFF, 0xFFFE]


@dataclass(frozen=True)
class Instance:
    """A generated file: its bytes, and for Deflate the (prefix, inflated data set) pair
    it was made of (mutations may go inside the compressed stream)."""

    data: bytes
    sop_uid: str
    deflated: tuple[bytes, bytes] | None = None


# --- valid instances ---------------------------------------------------------------------

texts = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), max_size=24
)
unicode_texts = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "Zs")), min_size=1, max_size=16
)


def uid(*numbers: int) -> str:
    return ".".join([UID_ROOT, *map(str, numbers)])


@st.composite
def datasets(draw: st.DrawFn, sop_suffix: int | None = None) -> tuple[Dataset, str]:
    """(data set, transfer syntax) of a small valid instance; its SOPInstanceUID ends in
    ``sop_suffix`` when given (unique UIDs), else in a drawn number."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    sop_class, modality, photometrics = KINDS[kind]
    ds = Dataset()
    if draw(st.booleans()):
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = draw(unicode_texts)
        ds.StudyDescription = draw(unicode_texts)
    else:
        ds.PatientName = draw(texts)
    ds.PatientID = draw(st.from_regex(r"[A-Z0-9]{0,12}", fullmatch=True))
    ds.AccessionNumber = draw(st.from_regex(r"[A-Z0-9]{0,16}", fullmatch=True))
    ds.StudyDate = draw(st.sampled_from(["", "20260101", "19991231"]))
    ds.SOPClassUID = sop_class
    # Small numbers repeat (duplicates, later instances of a study); large ones make new
    # studies and series, whose indexed text is written.
    suffix = sop_suffix if sop_suffix is not None else draw(st.integers(1, 10**9))
    ds.SOPInstanceUID = uid(suffix)
    ds.StudyInstanceUID = uid(1, draw(st.integers(0, 10**9)))
    ds.SeriesInstanceUID = uid(2, draw(st.integers(0, 10**9)))
    ds.Modality = modality
    if draw(st.booleans()):
        ds.BodyPartExamined = draw(st.sampled_from(["HEAD", "CHEST", "BRAIN", "ABDOMEN", ""]))
    if draw(st.booleans()):
        item = Dataset()
        item.RequestedProcedurePriority = draw(st.sampled_from(["STAT", "HIGH", "ROUTINE", ""]))
        item.RequestedProcedureID = draw(texts.map(lambda t: t[:16]))
        ds.RequestAttributesSequence = [item]
    if draw(st.booleans()):
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = uid(draw(st.integers(1, 10**9)))
        ds.ReferencedImageSequence = [ref] * draw(st.integers(1, 3))
    depth = draw(st.integers(0, 4))
    if depth:
        block = ds.private_block(0x0009, "TRIAGE FUZZ", create=True)
        inner = Dataset()
        inner.add_new(0x00091002, "LO", "LEAF")
        for _ in range(depth - 1):
            outer = Dataset()
            outer.add_new(0x00090010, "LO", "TRIAGE FUZZ")
            outer.add_new(0x00091001, "SQ", [inner])
            inner = outer
        block.add_new(0x01, "SQ", [inner])
        block.add_new(0x03, "OB", draw(st.binary(max_size=32)))

    if kind == "SR":
        ds.ValueType = "CONTAINER"
        content = Dataset()
        content.ValueType = "TEXT"
        content.TextValue = draw(texts)
        ds.ContentSequence = [content]
        ts = draw(st.sampled_from((*NATIVE, DeflatedExplicitVRLittleEndian)))
        return ds, ts

    photometric = draw(st.sampled_from(photometrics))
    samples = 3 if photometric == "RGB" else 1
    bits = 8 if samples == 3 else draw(st.sampled_from([8, 16]))
    rows, columns = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    frames = draw(st.integers(1, 3)) if kind == "SC" else 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if kind == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.ImagePositionPatient = [0, 0, draw(st.integers(-100, 100))]
    ts = draw(st.sampled_from((*NATIVE, DeflatedExplicitVRLittleEndian, *ENCAPSULATED)))
    pattern = draw(st.binary(min_size=1, max_size=8))
    frame_bytes = rows * columns * samples * bits // 8
    if ts in ENCAPSULATED:
        # Never decoded at ingest: any bytes do as the fragments' content.
        fragments = [(pattern * (1 + i))[:16] for i in range(frames)]
        ds.PixelData = encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = (pattern * (frame_bytes * frames))[: frame_bytes * frames]
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds, ts


def serialise(ds: Dataset, ts: str, *, part10: bool = True) -> bytes:
    """The Part 10 file of ``ds`` in ``ts`` (or a bare implicit VR data set)."""
    if not part10:
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, True
        pydicom.filewriter.write_dataset(out, ds)
        return out.getvalue()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@st.composite
def instances(draw: st.DrawFn, sop_suffix: int | None = None) -> Instance:
    ds, ts = draw(datasets(sop_suffix))
    part10 = ts in ENCAPSULATED or draw(st.integers(0, 9)) > 0  # else a bare data set
    data = serialise(ds, ts, part10=part10)
    deflated = None
    if part10 and ts == DeflatedExplicitVRLittleEndian:
        prefix, stream = split(data)
        deflated = (prefix, zlib.decompress(stream, -zlib.MAX_WBITS))
    return Instance(data, str(ds.SOPInstanceUID), deflated)


# --- mutations -----------------------------------------------------------------------------

positions = st.integers(0, 1 << 20)
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("byte"), positions, st.sampled_from(b"\x00\xff\x7f\x80 \\\x1b")),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), positions, st.integers(1, 64)),
    st.tuples(st.just("duplicate"), positions, st.integers(1, 256), positions),
    st.tuples(st.just("length"), positions, st.sampled_from(HUGE) | st.integers(0, 2**32 - 1)),
    st.tuples(st.just("length4"), positions, st.sampled_from(HUGE)),
    st.tuples(st.just("vr"), positions, st.sampled_from([*VRS, b"ZZ", b"\x00\x00", b"  "])),
    st.tuples(st.just("text"), positions, positions, st.sampled_from(b"\x00\xff\\\x1b\x7f\n")),
)


def mutate(data: bytes, ops: list[tuple[object, ...]]) -> bytes:
    """``data`` with each operation applied in turn. A position under 256 is an offset
    from the start (preamble, ``DICM``, file meta); a larger one lands past the preamble,
    modulo the length, so most mutations hit elements rather than the inert preamble."""
    buf = bytearray(data)
    for op in ops:
        kind, at = op[0], int(op[1])  # type: ignore[call-overload]
        n = len(buf)
        pos = at % (n + 1) if at < 256 or n <= 128 else 128 + (at - 256) % (n - 127)
        vr_at = [m.start() for m in _VR_RE.finditer(buf)]
        if kind == "flip" and n:
            buf[pos % n] ^= 1 << int(op[2])  # type: ignore[call-overload]
        elif kind == "byte" and n:  # NUL, 0xFF, DEL, 0x80, space, backslash, ESC
            buf[pos % n] = int(op[2])  # type: ignore[call-overload]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = op[2]  # type: ignore[index]
        elif kind == "delete":
            del buf[pos : pos + int(op[2])]  # type: ignore[call-overload]
        elif kind == "duplicate":
            chunk = bytes(buf[pos : pos + int(op[2])])  # type: ignore[call-overload]
            dest = int(op[3]) % (n + 1)  # type: ignore[call-overload]
            buf[dest:dest] = chunk
        elif kind == "length" and vr_at:
            # The length field after a VR: 16 bits, or 32 bits after 2 reserved bytes.
            v = vr_at[at % len(vr_at)]
            value = int(op[2])  # type: ignore[call-overload]
            if bytes(buf[v : v + 2]) in _LONG_VRS:
                buf[v + 4 : v + 8] = struct.pack("<I", value)
            else:
                buf[v + 2 : v + 4] = struct.pack("<H", value & 0xFFFF)
        elif kind == "length4" and n >= 4:
            # An implicit VR length (or any 32-bit field): 4 bytes at an even offset.
            p = (pos & ~1) % (n - 3)
            buf[p : p + 4] = struct.pack("<I", int(op[2]))  # type: ignore[call-overload]
        elif kind == "text":
            # One byte inside the value of an explicit VR text element.
            texts_at = [v for v in vr_at if bytes(buf[v : v + 2]) in _TEXT_VRS and v + 4 <= n]
            if texts_at:
                v = texts_at[at % len(texts_at)]
                (length,) = struct.unpack_from("<H", buf, v + 2)
                if length and v + 4 + length <= n:
                    buf[v + 4 + int(op[2]) % length] = int(op[3])  # type: ignore[call-overload]
        elif kind == "vr" and vr_at:
            v = vr_at[at % len(vr_at)]
            buf[v : v + 2] = op[2]  # type: ignore[index]
    return bytes(buf)


def deflate(body: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(body) + c.flush()


# --- the properties ------------------------------------------------------------------------


def fuzz_ingestor(db: Database, root: Path) -> Ingestor:
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    return Ingestor(
        db, root / "dicom", root / "incoming", root / "quarantine", min_free_bytes=0, **LIMITS
    )


def check_outcome(ingestor: Ingestor, data: bytes, outcome: IngestOutcome) -> None:
    """Stored and indexed, or refused for good and kept; nothing left in the temp folder."""
    assert outcome.status != StoreStatus.out_of_resources, outcome.reason
    assert "internal error" not in outcome.reason, outcome.reason  # a check that crashed
    assert not any(ingestor.tmp_dir.iterdir()), "a temporary file was left behind"
    db = ingestor.db
    if outcome.status.stored:
        assert outcome.SOPInstanceUID, outcome
        with db.session() as s:
            row = s.scalar(
                select(InstanceRow).where(InstanceRow.SOPInstanceUID == outcome.SOPInstanceUID)
            )
            assert row is not None, f"stored ({outcome.reason}) but not indexed"
            path, digest = Path(row.path), row.sha256
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        if not outcome.duplicate and outcome.status != StoreStatus.coercion_of_elements:
            assert digest == hashlib.sha256(data).hexdigest()  # stored as received
        if outcome.duplicate and outcome.quarantine_id is not None:  # keep_first's copy
            with db.session() as s:
                assert s.get(QuarantineRow, outcome.quarantine_id) is not None
        return
    assert outcome.status in (
        StoreStatus.cannot_understand,
        StoreStatus.dataset_does_not_match_sop_class,
    ), outcome
    assert outcome.quarantine_id is not None, outcome
    with db.session() as s:
        kept = s.get(QuarantineRow, outcome.quarantine_id)
        assert kept is not None, "refused but no quarantine record"
        assert kept.status_code == int(outcome.status)
        assert kept.sha256 == hashlib.sha256(data).hexdigest()
        assert Path(kept.path).read_bytes() == data


_unique = itertools.count(10_000)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_generated_instances_are_stored(db: Database, tmp_path: Path, data: st.DataObject) -> None:
    ingestor = fuzz_ingestor(db, tmp_path)
    instance = data.draw(instances(sop_suffix=next(_unique)))
    outcome = ingestor.ingest(instance.data, source="fuzz")
    assert outcome.status in (StoreStatus.success, StoreStatus.coercion_of_elements), outcome
    assert not outcome.duplicate
    assert outcome.SOPInstanceUID == instance.sop_uid
    check_outcome(ingestor, instance.data, outcome)


@settings(FUZZ, max_examples=1000)
@given(
    instance=instances(),
    ops=st.lists(mutations, min_size=1, max_size=4),
    inside=st.booleans(),
)
def test_mutated_instances_are_stored_or_refused_and_kept(
    db: Database, tmp_path: Path, instance: Instance, ops: list[tuple[object, ...]], inside: bool
) -> None:
    ingestor = fuzz_ingestor(db, tmp_path)
    if instance.deflated is not None and inside:
        prefix, body = instance.deflated
        data = prefix + deflate(mutate(body, ops))
    else:
        data = mutate(instance.data, ops)
    outcome = ingestor.ingest(data, source="fuzz")
    event(f"{outcome.status.name}: {outcome.reason[:40]}")  # --hypothesis-show-statistics
    check_outcome(ingestor, data, outcome)


# --- what the fuzzing found, kept as plain regression tests ------------------------------


def _ts_under_vr(vr: bytes) -> bytes:
    """CT_small with its TransferSyntaxUID element's VR bytes changed (a "vr" mutation)."""
    data = bytearray(ct_bytes())
    at = data.index(b"\x02\x00\x10\x00UI")
    data[at + 4 : at + 6] = vr
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # pydicom reads the value as numbers: a check's UID(...).is_encapsulated raised
        # ValueError ("could not be checked (internal error ValueError)").
        (
            _ts_under_vr(b"US"),
            "TransferSyntaxUID does not read as the transfer syntax it names",
        ),
        # AE keeps the NUL that pads a UI value: the same ValueError.
        (_ts_under_vr(b"AE"), "TransferSyntaxUID holds a NUL character"),
        # Stored on SQLite, but 0xA700 (retry, never kept) on PostgreSQL, whose text
        # columns cannot hold a NUL.
        (ct_bytes(PatientID="AB\x00CD"), "PatientID holds a NUL character"),
    ],
    ids=["ts-under-vr-US", "ts-under-vr-AE", "nul-inside-PatientID"],
)
def test_found_by_fuzzing(db: Database, tmp_path: Path, data: bytes, reason: str) -> None:
    ingestor = fuzz_ingestor(db, tmp_path)
    outcome = ingestor.ingest(data, source="fuzz")
    assert outcome.status == StoreStatus.cannot_understand, outcome
    assert reason in outcome.reason
    check_outcome(ingestor, data, outcome)
