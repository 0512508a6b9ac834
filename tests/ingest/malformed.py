"""Malformed DICOM built in the tests (never committed as files): broken Deflate streams,
deep sequences, unknown VRs, lengths that do not fit, invalid UIDs, Deflate bombs.

Each family is a function returning the bytes of a Part 10 file made from pydicom's
CT_small.dcm with one fault; :func:`families` lists them with the phrase their refusal
reason must contain.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from io import BytesIO

import pydicom
import pydicom.filewriter
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from tests.conftest import pydicom_file

DEFLATED = str(DeflatedExplicitVRLittleEndian)
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
MiB = 1024**2


def ct(**changes: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def part10(ds: pydicom.Dataset, transfer_syntax: str | None = None) -> bytes:
    if transfer_syntax:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + DICM + file meta, data set) of a Part 10 file with a group length."""
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]
    end = 132 + 12 + group_length
    return data[:end], data[end:]


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element (``length`` overrides the value's length)."""
    n = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def item(content: bytes) -> bytes:
    """A sequence item of undefined length with its delimiter."""
    return (
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + content
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    )


def sequence(group: int, elem: int, *items: bytes) -> bytes:
    """An undefined-length sequence of undefined-length items."""
    return (
        struct.pack("<HH2sHI", group, elem, b"SQ", 0, 0xFFFFFFFF)
        + b"".join(item(i) for i in items)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )


def nested(depth: int) -> bytes:
    """A private sequence holding a sequence ... ``depth`` deep (with its creator)."""
    inner = element(0x0009, 0x1002, b"LO", b"LEAF")
    for _ in range(depth):
        inner = sequence(0x0009, 0x1001, inner)
    return element(0x0009, 0x0010, b"LO", b"ACME") + inner


def with_elements(front: bytes = b"", back: bytes = b"", ts: str | None = None) -> bytes:
    """CT_small with raw elements put before and after its data set's own."""
    meta, dataset = split(part10(ct(), ts))
    return meta + front + dataset + back


def deflate_corrupt() -> bytes:
    meta, stream = split(part10(ct(), DEFLATED))
    return meta + stream[:40] + bytes(b ^ 0x5A for b in stream[40:200]) + stream[200:]


def deflate_truncated() -> bytes:
    meta, stream = split(part10(ct(), DEFLATED))
    return meta + stream[: len(stream) // 2]


def transfer_syntax_not_a_transfer_syntax() -> bytes:
    data = part10(ct(), str(ExplicitVRLittleEndian))
    # same length: CT Image Storage's root, a SOP class, not a transfer syntax
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.5.1.4\x00", 1)


def pixel_length_beyond_the_file() -> bytes:
    meta, dataset = split(part10(ct()))
    at = dataset.index(struct.pack("<HH2sH", 0x7FE0, 0x0010, b"OW", 0))
    return meta + dataset[: at + 8] + struct.pack("<I", 0x7FFFFFFF) + dataset[at + 12 :]


def families() -> dict[str, tuple[bytes, str]]:
    """name -> (file, a phrase its refusal reason contains)."""
    return {
        "deflate-corrupt": (deflate_corrupt(), "Deflate stream of the data set is corrupt"),
        "deflate-truncated": (deflate_truncated(), "Deflate stream of the data set is truncated"),
        "sequences-200-deep": (with_elements(front=nested(200)), "nested more than 32 deep"),
        "unknown-vr": (
            with_elements(back=element(0x0099, 0x0010, b"ZZ", b"ABCD")),
            "(0099,0010) has an unknown VR",
        ),
        "unknown-vr-in-sequence": (
            with_elements(
                front=element(0x0009, 0x0010, b"LO", b"ACME")
                + sequence(0x0009, 0x1001, element(0x0008, 0x0001, b"QQ", b"AB"))
            ),
            "(0008,0001) has an unknown VR",
        ),
        "transfer-syntax-not-a-transfer-syntax": (
            transfer_syntax_not_a_transfer_syntax(),
            "TransferSyntaxUID is not a transfer syntax",
        ),
        "length-does-not-fit-vr": (
            rows_length_3(),
            "Rows (0028,0010) has 3 bytes, which does not fit its VR US",
        ),
        "private-length-does-not-fit-vr": (
            with_elements(
                back=element(0x0099, 0x0010, b"LO", b"ACME")
                + element(0x0099, 0x1001, b"FD", b"\x00" * 12)
            ),
            "(0099,1001) has 12 bytes, which does not fit its VR FD",
        ),
        "pixel-length-beyond-the-file": (
            pixel_length_beyond_the_file(),
            "truncated PixelData (7FE0,0010) or a wrong length: 2147483647 bytes declared",
        ),
        "uid-leading-zero": (
            part10(ct(SOPInstanceUID="1.02.3")),
            "SOPInstanceUID has a component with a leading zero",
        ),
        "uid-empty-component": (
            part10(ct(SeriesInstanceUID="1.2..3")),
            "SeriesInstanceUID has an empty component",
        ),
        "undecodable-number-of-frames": (
            with_elements(back=element(0x0028, 0x0008, b"IS", b"1e999 ")),  # IS overflows
            "NumberOfFrames cannot be decoded",
        ),
    }


def rows_length_3() -> bytes:
    meta, dataset = split(part10(ct()))
    rows = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2)
    at = dataset.index(rows)
    return (
        meta
        + dataset[:at]
        + struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 3)
        + (dataset[at + 8 : at + 10] + b"\x00" + dataset[at + 10 :])
    )


# --- Deflate bombs ---------------------------------------------------------------------


def _zeros_block(compressor: zlib._Compress, size: int) -> bytes:
    return compressor.compress(bytes(size)) + compressor.flush(zlib.Z_FULL_FLUSH)


def deflate_pieces(pieces: Iterable[bytes | int]) -> bytes:
    """A raw Deflate stream of ``pieces``: bytes as they are, an int for that many zero
    bytes. Zero runs are compressed once per MiB: after a full flush the compressor starts
    afresh, so every MiB of zeros compresses to the same block, which is repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = _zeros_block(c, MiB)
    assert _zeros_block(c, MiB) == block  # the repeat is exact
    out: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            out.append(c.compress(piece) + c.flush(zlib.Z_FULL_FLUSH))
            continue
        whole, rest = divmod(piece, MiB)
        out.append(block * whole)
        if rest:
            out.append(_zeros_block(c, rest))
    out.append(c.flush())
    return b"".join(out)


def _deflated_file(ds: pydicom.Dataset, tail: Iterable[bytes | int]) -> bytes:
    """A Deflated Explicit VR Little Endian file: ``ds`` then the raw ``tail`` pieces."""
    ds.file_meta.TransferSyntaxUID = DEFLATED
    meta = DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, ds)
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + deflate_pieces([body.getvalue(), *tail])


def pixel_bomb(pixel_bytes: int) -> bytes:
    """A CT whose header announces ``pixel_bytes`` of pixel data (under the pixel ceiling,
    Rows x Columns consistent) and whose Deflate stream inflates to that many zeros."""
    ds = ct()
    del ds.PixelData
    columns = 16384
    ds.Rows, ds.Columns = pixel_bytes // (2 * columns), columns
    size = ds.Rows * ds.Columns * 2
    return _deflated_file(ds, [struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size), size])


def private_bomb(value_bytes: int) -> bytes:
    """A CT with one private OB element of ``value_bytes`` zeros (Deflate)."""
    ds = ct()
    del ds.PixelData
    head = element(0x0009, 0x0010, b"LO", b"BOMB") + struct.pack(
        "<HH2sHI", 0x0009, 0x1010, b"OB", 0, value_bytes
    )
    return _deflated_file(ds, [head, value_bytes])


def many_elements_bomb(count: int, each: int) -> bytes:
    """A CT with ``count`` private OB elements of ``each`` zero bytes (Deflate): every one
    under the element ceiling, together far over the inflate budget."""
    ds = ct()
    del ds.PixelData
    pieces: list[bytes | int] = [element(0x0009, 0x0010, b"LO", b"BOMB")]
    for i in range(count):
        pieces += [struct.pack("<HH2sHI", 0x0009, 0x1000 + i, b"OB", 0, each), each]
    return _deflated_file(ds, pieces)
