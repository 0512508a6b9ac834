"""The byte-level shape of received DICOM, checked before pydicom reads it.

pydicom trusts what a file says about itself: it inflates a Deflate stream whole, follows
sequences as deep as they go (until Python's recursion limit), reads a declared length of
2 GiB from a file of 176 KB without complaint, and keeps an element of unknown VR or of a
length that its VR cannot have until something reads it. :func:`check_structure` walks
the encoded elements first (tags, VRs and lengths, never values) and refuses, with a
reason naming the element by its tag (never a value, so no patient data):

* a Deflate stream that is corrupt, truncated, or inflates past a budget (it is inflated
  in steps, so a bomb is refused after at most ``max_inflated_bytes`` of output, usually
  as soon as an element header announces more than the budget);
* a file meta TransferSyntaxUID that is not a transfer syntax pydicom can read;
* an element that declares more bytes than remain (in the file, or in its item);
* an element value over ``max_element_bytes`` (pixel data: over ``max_pixel_bytes``);
* an unknown VR; a numeric VR whose length is not a multiple of its value size;
* sequences nested deeper than ``max_depth``; malformed items and delimiters.

The encoding rules follow pydicom's reader (PS3.5 7, plus pydicom's tolerance of implicit
VR elements and sequences inside explicit VR data sets), so a data set that passes reads in
pydicom the way it was walked here.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import pydicom.uid
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double
SOP_UID_TAGS = frozenset({0x00080016, 0x00080018})

MAX_SEQUENCE_DEPTH = 32
"""Deepest nesting of sequences accepted (real objects, SR included, stay far below)."""

_KNOWN_VRS = frozenset(str(vr).encode("ascii") for vr in VR if " " not in str(vr))
_LONG_VRS = frozenset(str(vr).encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_VALUE_SIZE = {"AT": 4, "FL": 4, "FD": 8, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
_INFLATE_STEP = 4 * 1024**2
_INPUT_STEP = 256 * 1024


class StructureError(Exception):
    """The input is not well-formed DICOM; ``str(exc)`` is the reason (no patient data)."""


@dataclass(frozen=True)
class Limits:
    """Ceilings applied while walking a data set (see ``triage.config.Settings``)."""

    max_pixel_bytes: int = 4 * 1024**3
    max_element_bytes: int = 256 * 1024**2
    max_inflated_bytes: int = 256 * 1024**2
    max_depth: int = MAX_SEQUENCE_DEPTH


@dataclass(frozen=True)
class Layout:
    """Where the parts of a checked input lie.

    Attributes:
        part10: the input has the 128-byte preamble and ``DICM``.
        meta_start, meta_end: the file meta group (0002,eeee) (empty when absent).
        transfer_syntax: the file meta's TransferSyntaxUID, or None without one.
        implicit_vr, little_endian: the data set's encoding (as read).
        inflated: for a Deflate transfer syntax, the inflated data set (else None).
    """

    part10: bool
    meta_start: int
    meta_end: int
    transfer_syntax: str | None
    implicit_vr: bool
    little_endian: bool
    inflated: bytes | None = None


def _tag(tag: int) -> str:
    """An element named by its keyword (where the dictionary has one) and its tag."""
    number = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag) if not (tag >> 16) & 1 else ""
    return f"{keyword} {number}" if keyword else number


def _vr_looks_explicit(two: bytes) -> bool:
    """pydicom's test for an explicit VR at the start of a data set or item."""
    return len(two) == 2 and 0x40 < two[0] < 0x5B and 0x40 < two[1] < 0x5B


@lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str:
    """The VR of an implicit VR element: the dictionary's; private and unknown ones UN."""
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0:
        return "UL"  # group length
    if group & 1:
        return "LO" if 0x0010 <= element <= 0x00FF else "UN"
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


class _Source:
    """The bytes of a data set: all there (a plain file) or inflated on demand (Deflate)."""

    budget: int | None = None  # the most bytes the source may produce (Deflate)

    def __init__(self, data: bytes | bytearray) -> None:
        self.buf: bytes | bytearray = data

    def fill(self, end: int) -> bool:
        """Make the bytes up to ``end`` available; False when the data ends before."""
        return end <= len(self.buf)


class _Inflater(_Source):
    """A raw Deflate stream (PS3.5 A.5) inflated step by step, never past ``budget`` bytes."""

    def __init__(self, compressed: memoryview, budget: int) -> None:
        self.out = bytearray()
        super().__init__(self.out)
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._in = compressed
        self._pos = 0
        self.limit = budget
        self.budget = budget

    def _too_large(self) -> StructureError:
        return StructureError(
            f"Deflate data set too large: it inflates to more than {self.limit} bytes"
            " (TRIAGE_MAX_INFLATED_BYTES)"
        )

    def fill(self, end: int) -> bool:
        while len(self.out) < end:
            if self._z.eof:
                return False
            if end > self.limit:
                raise self._too_large()
            chunk: bytes | memoryview = self._z.unconsumed_tail
            if not chunk:
                if self._pos >= len(self._in):
                    raise StructureError(
                        "unreadable DICOM: the Deflate stream of the data set is truncated"
                    )
                chunk = self._in[self._pos : self._pos + _INPUT_STEP]
                self._pos += len(chunk)
            room = self.limit + 1 - len(self.out)
            try:
                self.out += self._z.decompress(chunk, min(_INFLATE_STEP, room))
            except zlib.error:
                raise StructureError(
                    "unreadable DICOM: the Deflate stream of the data set is corrupt"
                ) from None
            if len(self.out) > self.limit:
                raise self._too_large()
        return True


class _Walker:
    """Walks elements, items and fragments, checking every length against what remains."""

    def __init__(self, source: _Source, limits: Limits, little_endian: bool) -> None:
        self.src = source
        self.limits = limits
        self.endian = "<" if little_endian else ">"
        self.saw_sop_uid = False
        self.transfer_syntax: bytes | None = None

    def _unpack(self, fmt: str, pos: int) -> tuple[int, ...]:
        return struct.unpack_from(self.endian + fmt, self.src.buf, pos)

    def _need(self, end: int, what: str) -> None:
        if not self.src.fill(end):
            raise StructureError(f"truncated DICOM: the file ends inside {what}")

    def _ceiling(self, tag: int, length: int) -> None:
        """No value over the ceilings: pixel data ``max_pixel_bytes``, others
        ``max_element_bytes`` (checked from the header, before the value is read)."""
        if tag in PIXEL_DATA_TAGS:
            ceiling, setting, prefix = self.limits.max_pixel_bytes, "PIXEL", "image"
        else:
            ceiling, setting, prefix = self.limits.max_element_bytes, "ELEMENT", "element"
        if length > ceiling:
            raise StructureError(
                f"{prefix} too large: {_tag(tag)} declares {length} bytes, over the"
                f" {ceiling}-byte ceiling (TRIAGE_MAX_{setting}_BYTES)"
            )

    def _fits(self, tag: int, start: int, length: int, end: int | None) -> None:
        """The value of ``length`` bytes at ``start`` must fit its item and the file."""
        if end is not None and start + length > end:
            raise StructureError(
                f"truncated {_tag(tag)} or a wrong length: {length} bytes declared,"
                f" {end - start} remain in its sequence item"
            )
        budget = self.src.budget
        if budget is not None and start + length > budget:
            raise StructureError(
                f"Deflate data set too large: {_tag(tag)} declares {length} bytes, past the"
                f" {budget}-byte ceiling on the inflated data set (TRIAGE_MAX_INFLATED_BYTES)"
            )
        if not self.src.fill(start + length):
            remain = max(0, len(self.src.buf) - start)
            raise StructureError(
                f"truncated {_tag(tag)} or a wrong length: {length} bytes declared,"
                f" {remain} remain in the file"
            )

    def elements(
        self,
        pos: int,
        end: int | None,
        *,
        implicit: bool,
        depth: int,
        in_item: bool,
        only_group: int | None = None,
    ) -> int:
        """Walk the elements of one data set from ``pos``; returns the position after it.

        ``end`` is the end of a defined-length item (None: up to an item delimiter when
        ``in_item``, else to the end of the data). ``only_group`` stops before the first
        element of another group (file meta, command set).
        """
        while True:
            if end is not None and pos >= end:
                return pos
            if not self.src.fill(pos + 8):
                if in_item and end is None:
                    raise StructureError("truncated DICOM: the file ends inside a sequence item")
                if end is None:
                    return pos  # as pydicom: fewer than 8 bytes left end the data set
                self._need(pos + 8, "an element header")
            group, element = self._unpack("HH", pos)
            tag = group << 16 | element
            if only_group is not None and group != only_group:
                return pos
            if tag == ITEM_DELIMITER:
                if not in_item:
                    raise StructureError(
                        "malformed DICOM: an item delimitation item outside a sequence"
                    )
                return pos + 8
            if group == 0xFFFE:
                raise StructureError(f"malformed DICOM: item tag {_tag(tag)} in a data set")
            pos = self._element(pos, tag, end, implicit=implicit, depth=depth)

    def _element(self, pos: int, tag: int, end: int | None, *, implicit: bool, depth: int) -> int:
        raw_vr = bytes(self.src.buf[pos + 4 : pos + 6])
        explicit = not implicit and raw_vr in _KNOWN_VRS
        if not implicit and not explicit and b"AA" <= raw_vr <= b"ZZ":
            raise StructureError(f"unreadable DICOM: {_tag(tag)} has an unknown VR")
        if explicit:
            vr = raw_vr.decode("ascii")
            if raw_vr in _LONG_VRS:
                self._need(pos + 12, "an element header")
                (length,) = self._unpack("L", pos + 8)
                start = pos + 12
            else:
                (length,) = self._unpack("H", pos + 6)
                start = pos + 8
        else:  # implicit VR (the data set's, or pydicom's switch on a non-letter VR)
            vr = _implicit_vr(tag)
            (length,) = self._unpack("L", pos + 4)
            start = pos + 8
        if tag in SOP_UID_TAGS:
            self.saw_sop_uid = True
        if length == UNDEFINED_LENGTH:
            if vr == "SQ" or (vr == "UN" and (explicit or self._items_follow(start))):
                return self.sequence(start, None, tag, implicit=implicit, depth=depth + 1)
            if vr in ("OB", "OW", "OB or OW", "UN"):
                return self._fragments(start, tag, end)
            raise StructureError(
                f"malformed DICOM: {_tag(tag)} has an undefined length, which its VR {vr}"
                " cannot have"
            )
        self._ceiling(tag, length)
        self._fits(tag, start, length, end)
        size = _VALUE_SIZE.get(vr)
        if size and length % size:
            raise StructureError(
                f"unreadable DICOM: {_tag(tag)} has {length} bytes, which does not fit its"
                f" VR {vr} ({size}-byte values)"
            )
        if tag == 0x00020010:
            self.transfer_syntax = bytes(self.src.buf[start : start + length])
        if vr == "SQ":
            self.sequence(start, start + length, tag, implicit=implicit, depth=depth + 1)
        return start + length

    def _items_follow(self, pos: int) -> bool:
        if not self.src.fill(pos + 4):
            return False
        group, element = self._unpack("HH", pos)
        return (group << 16 | element) == ITEM

    def sequence(self, pos: int, end: int | None, tag: int, *, implicit: bool, depth: int) -> int:
        """Walk the items of a sequence; returns the position after it."""
        if depth > self.limits.max_depth:
            raise StructureError(
                f"unreadable DICOM: sequences nested more than {self.limits.max_depth} deep"
            )
        while True:
            if end is not None and pos >= end:
                return pos
            self._need(pos + 8, f"sequence {_tag(tag)}")
            group, element, length = self._unpack("HHL", pos)
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITER:
                return pos + 8 if end is None else end
            if item_tag != ITEM:
                raise StructureError(
                    f"malformed DICOM: sequence {_tag(tag)} holds {_tag(item_tag)} where an"
                    " item should be"
                )
            start = pos + 8
            # pydicom reads an item as implicit VR when its first element looks so.
            item_implicit = implicit or (
                self.src.fill(start + 6)
                and not _vr_looks_explicit(bytes(self.src.buf[start + 4 : start + 6]))
            )
            if length == UNDEFINED_LENGTH:
                pos = self.elements(start, None, implicit=item_implicit, depth=depth, in_item=True)
                continue
            if end is not None and start + length > end:
                raise StructureError(
                    f"truncated DICOM or a wrong length: an item of {_tag(tag)} declares"
                    f" {length} bytes, {end - start} remain in the sequence"
                )
            self._need(start + length, f"an item of sequence {_tag(tag)}")
            self.elements(start, start + length, implicit=item_implicit, depth=depth, in_item=True)
            pos = start + length

    def _fragments(self, pos: int, tag: int, end: int | None) -> int:
        """Encapsulated data (PS3.5 A.4): items of defined length up to a delimiter."""
        total = 0
        while True:
            self._need(pos + 8, f"the encapsulated value of {_tag(tag)}")
            group, element, length = self._unpack("HHL", pos)
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITER:
                return pos + 8
            if item_tag != ITEM or length == UNDEFINED_LENGTH:
                raise StructureError(
                    f"malformed encapsulated {_tag(tag)}: unexpected item tag or length"
                )
            total += length
            self._ceiling(tag, total)  # the ceiling applies to all fragments together
            self._fits(tag, pos + 8, length, end)
            pos += 8 + length


def _transfer_syntax(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\x00 ")


def _encoding_of(ts: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax UID pydicom can read."""
    uid = pydicom.uid.UID(ts)
    if uid in pydicom.uid.PrivateTransferSyntaxes:
        uid = pydicom.uid.PrivateTransferSyntaxes[pydicom.uid.PrivateTransferSyntaxes.index(uid)]
    elif not uid.is_valid or uid.is_private or not uid.is_transfer_syntax:
        raise StructureError(
            "unreadable DICOM: the file meta's TransferSyntaxUID is not a transfer syntax"
        )
    return uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated


def _guess_encoding(data: bytes, pos: int) -> tuple[bool, bool]:
    """pydicom's guess for a data set without a transfer syntax: explicit VR when the first
    element's VR bytes are a VR; big endian when its group only makes sense so."""
    if len(data) < pos + 6:
        return True, True
    group = struct.unpack_from("<H", data, pos)[0]
    if bytes(data[pos + 4 : pos + 6]) in _KNOWN_VRS:
        return False, group < 1024
    return True, True


NOT_DICOM = "not DICOM: no Part 10 header ('DICM' at byte 128) and no readable data set"


def check_structure(data: bytes, limits: Limits) -> Layout:
    """Walk the whole input as pydicom will read it.

    Returns:
        Where the file meta and the data set lie, their encoding, and for a Deflate transfer
        syntax the inflated data set (within ``limits.max_inflated_bytes``).

    Raises:
        StructureError: with the reason the input is refused. Input without the Part 10
            header that breaks before any SOP UID is "not DICOM".
    """
    part10 = data[128:132] == b"DICM"
    walkers: list[_Walker] = []
    try:
        return _walk_input(data, limits, part10=part10, walkers=walkers)
    except StructureError as exc:
        if not part10 and not any(w.saw_sop_uid for w in walkers):
            raise StructureError(NOT_DICOM) from exc
        raise


def _walk_input(data: bytes, limits: Limits, *, part10: bool, walkers: list[_Walker]) -> Layout:
    pos = 132 if part10 else 0
    plain = _Source(data)
    meta = _Walker(plain, limits, little_endian=True)
    meta_start = pos
    # File meta: explicit VR little endian, group 0002 only (PS3.10 7.1).
    if len(data) >= pos + 2 and struct.unpack_from("<H", data, pos)[0] == 2:
        pos = meta.elements(pos, None, implicit=False, depth=0, in_item=False, only_group=2)
    meta_end = pos
    ts = _transfer_syntax(meta.transfer_syntax) if meta.transfer_syntax is not None else None
    if part10 and ts is None:
        raise StructureError("unreadable DICOM: file meta has no TransferSyntaxUID")
    # A command set (group 0000, implicit VR little endian) may precede the data set.
    if len(data) >= pos + 2 and struct.unpack_from("<H", data, pos)[0] == 0:
        pos = meta.elements(pos, None, implicit=True, depth=0, in_item=False, only_group=0)
    if ts:
        implicit, little, deflated = _encoding_of(ts)
    else:
        (implicit, little), deflated = _guess_encoding(data, pos), False
    source: _Source = plain
    if deflated:
        source = _Inflater(memoryview(data)[pos:], limits.max_inflated_bytes)
        start = 0
    else:
        start = pos
    walker = _Walker(source, limits, little_endian=little)
    walkers.append(walker)
    if source.fill(start + 6):
        # pydicom reads the data set as it finds it (and warns when that is not the TS's).
        implicit = not _vr_looks_explicit(bytes(source.buf[start + 4 : start + 6]))
    walker.elements(start, None, implicit=implicit, depth=0, in_item=False)
    inflated: bytes | None = None
    if isinstance(source, _Inflater):
        inflated = bytes(source.out)  # the walk ended where the stream did
        source.out.clear()
    return Layout(part10, meta_start, meta_end, ts, implicit, little, inflated)
