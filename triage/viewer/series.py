"""What the viewer shows of a study: the study's index rows, and each analysed series laid out
for display (its slices in display order, the size, spacing and the file's own window).

A CT series is a stack (``volume``): its slices (single-frame objects, or the frames of an
Enhanced CT object) are read from the headers (:func:`triage.preprocess.ct_headers.
read_headers`), checked alike and sorted along the slice normal
(:func:`triage.preprocess.ct_geometry.sort_along_normal`, never by InstanceNumber or file
order), superior first for an axial series. A radiograph series (CR, DX) is shown as the
one ``image`` the model read (the image its findings name), else its first image by
InstanceNumber.

Windows are in the units of the pixels the viewer sends: HU for CT (the rescale applied),
stored values for radiographs (a window in rescaled units is brought back through the
file's RescaleSlope/Intercept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select

from triage.db import Database
from triage.db.tables import AcknowledgementRow, FindingRow, InstanceRow, SeriesRow, StudyRow
from triage.preprocess.ct_geometry import sort_along_normal
from triage.preprocess.ct_headers import image_slices, read_headers
from triage.preprocess.errors import PreprocessError
from triage.worklist import acknowledgements

__all__ = [
    "CT_DEFAULT_WINDOW",
    "FindingRecord",
    "SeriesLayout",
    "SeriesRecord",
    "SliceRef",
    "StudyIndex",
    "build_layout",
    "instance_files",
    "load_study",
]

SeriesKind = Literal["volume", "image"]

CT_DEFAULT_WINDOW: Final[tuple[float, float]] = (40.0, 80.0)
"""(center, width) in HU when a CT file states no window: the brain window."""

_MONOCHROME: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})


@dataclass(frozen=True)
class FindingRecord:
    """One AI finding of the study, as its index row holds it."""

    finding: str
    model_name: str
    model_version: str
    SeriesInstanceUID: str | None
    mask_path: str | None
    SOPInstanceUID: str | None  # the image a radiograph model read (``details``)
    payload: dict[str, Any]


@dataclass(frozen=True)
class SeriesRecord:
    """One series of the study and the state of its instances (``version`` changes when an
    instance arrives or is replaced, so cached layouts of the old state are not used)."""

    SeriesInstanceUID: str
    Modality: str
    SeriesDescription: str | None
    version: tuple[Any, ...]


@dataclass(frozen=True)
class StudyIndex:
    """A study's index rows as the viewer needs them."""

    id: int
    StudyInstanceUID: str
    StudyDescription: str | None
    PatientName: str | None
    PatientID: str | None
    AccessionNumber: str | None
    read_state: str
    claimed_by: str | None
    routing: dict[str, Any] | None
    findings: tuple[FindingRecord, ...]
    series: dict[str, SeriesRecord]
    acknowledged: tuple[dict[str, Any], ...] = ()

    @property
    def analysed(self) -> list[str]:
        """The series some model read: the routing's chosen series, then the findings' (in
        that order, each once, only series of this study)."""
        uids: list[str] = []
        for route in (self.routing or {}).get("models") or []:
            if isinstance(route, dict) and route.get("run") and route.get("SeriesInstanceUID"):
                uids.append(str(route["SeriesInstanceUID"]))
        uids.extend(f.SeriesInstanceUID for f in self.findings if f.SeriesInstanceUID)
        return [u for u in dict.fromkeys(uids) if u in self.series]

    def preferred_images(self, series_uid: str) -> tuple[str, ...]:
        """The images the findings of a series name (a radiograph model's image)."""
        return tuple(
            dict.fromkeys(
                f.SOPInstanceUID
                for f in self.findings
                if f.SOPInstanceUID and f.SeriesInstanceUID == series_uid
            )
        )


def load_study(db: Database, study_uid: str) -> StudyIndex | None:
    """The study's row, its series (with their instances' state) and findings; None when
    the study is unknown."""
    with db.session() as s:
        study = s.scalar(select(StudyRow).where(StudyRow.StudyInstanceUID == study_uid))
        if study is None:
            return None
        rows = s.execute(
            select(
                SeriesRow.SeriesInstanceUID,
                SeriesRow.Modality,
                SeriesRow.SeriesDescription,
                func.count(InstanceRow.id),
                func.max(InstanceRow.id),
                func.max(InstanceRow.received_at),
            )
            .outerjoin(InstanceRow, InstanceRow.series_id == SeriesRow.id)
            .where(SeriesRow.study_id == study.id)
            .group_by(SeriesRow.id)
            .order_by(SeriesRow.id)
        ).all()
        findings = s.scalars(
            select(FindingRow).where(FindingRow.study_id == study.id).order_by(FindingRow.id)
        ).all()
        acks = s.scalars(
            select(AcknowledgementRow)
            .where(AcknowledgementRow.study_id == study.id)
            .order_by(AcknowledgementRow.id)
        ).all()
        return StudyIndex(
            acknowledged=tuple(acknowledgements.acknowledged(acks)),
            id=study.id,
            StudyInstanceUID=study.StudyInstanceUID,
            StudyDescription=study.StudyDescription,
            PatientName=study.PatientName,
            PatientID=study.PatientID,
            AccessionNumber=study.AccessionNumber,
            read_state=study.read_state,
            claimed_by=study.claimed_by,
            routing=study.routing,
            findings=tuple(_finding(f) for f in findings),
            series={
                uid: SeriesRecord(
                    SeriesInstanceUID=uid,
                    Modality=str(modality or "").strip().upper(),
                    SeriesDescription=description,
                    version=(int(n), last_id, str(last_received)),
                )
                for uid, modality, description, n, last_id, last_received in rows
            },
        )


def _finding(row: FindingRow) -> FindingRecord:
    payload = dict(row.payload or {})
    details = payload.get("details")
    sop = details.get("SOPInstanceUID") if isinstance(details, dict) else None
    return FindingRecord(
        finding=row.finding,
        model_name=row.model_name,
        model_version=row.model_version,
        SeriesInstanceUID=row.SeriesInstanceUID,
        mask_path=row.mask_path,
        SOPInstanceUID=str(sop) if sop else None,
        payload=payload,
    )


def instance_files(db: Database, series_uid: str) -> list[tuple[str, Path]]:
    """(SOPInstanceUID, stored file) of every instance of the series, in arrival order."""
    with db.session() as s:
        rows = s.execute(
            select(InstanceRow.SOPInstanceUID, InstanceRow.path)
            .join(SeriesRow, SeriesRow.id == InstanceRow.series_id)
            .where(SeriesRow.SeriesInstanceUID == series_uid)
            .order_by(InstanceRow.id)
        ).all()
    return [(str(uid), Path(path)) for uid, path in rows]


@dataclass(frozen=True)
class SliceRef:
    """One displayed slice: where its pixels are and how to turn them into the values sent.

    Attributes:
        index: its place in display order.
        SOPInstanceUID: its object.
        InstanceNumber: the file's InstanceNumber (None when absent or malformed).
        frame: 0-based frame of a multi-frame object; None for a single-frame object.
        position: ImagePositionPatient in mm (None for a radiograph).
        path: the stored file.
    """

    index: int
    SOPInstanceUID: str
    InstanceNumber: int | None
    frame: int | None
    position: tuple[float, float, float] | None
    path: Path


@dataclass(frozen=True)
class SeriesLayout:
    """A series as the viewer shows it (see the module docstring).

    Attributes:
        kind: ``volume`` (a CT stack) or ``image`` (one radiograph).
        pixel_type: ``int16`` (CT, HU) or ``uint16`` (stored values).
        window: the file's own (center, width) in the units of the pixels sent, else the
            modality default (CT: brain; radiographs: the whole stored range).
        window_source: ``file`` or ``default``.
        pixel_spacing: (between rows, between columns) in mm; None when the file has none.
        slices: in display order.
    """

    SeriesInstanceUID: str
    Modality: str
    SeriesDescription: str | None
    kind: SeriesKind
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    photometric: str
    pixel_type: Literal["int16", "uint16"]
    window: tuple[float, float]
    window_source: Literal["file", "default"]
    slices: tuple[SliceRef, ...] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """About what the layout holds in memory (for the cache's budget)."""
        return 1024 + 400 * len(self.slices)


def _first_number(value: Any) -> float | None:
    """The first value of a (possibly multi-valued) numeric attribute; None when absent or
    not a finite number."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def file_window(ds: pydicom.Dataset, frame: int | None = None) -> tuple[float, float] | None:
    """The object's first WindowCenter/WindowWidth pair (a frame's own, then the shared
    functional groups', then the object's); None when it states none with a positive width."""
    items: list[Any] = []
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        if frame < len(per_frame):
            items.extend(per_frame[frame].get("FrameVOILUTSequence") or [])
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        if shared:
            items.extend(shared[0].get("FrameVOILUTSequence") or [])
    items.append(ds)
    for item in items:
        center = _first_number(item.get("WindowCenter"))
        width = _first_number(item.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            return center, width
    return None


def _instance_number(ds: pydicom.Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _ct_layout(
    record: SeriesRecord,
    files: Sequence[tuple[str, Path]],
    headers: Sequence[pydicom.Dataset] | None,
) -> SeriesLayout:
    if headers is None:
        headers = read_headers([path for _, path in files])
    frames = [item for i, ds in enumerate(headers) for item in image_slices(ds, i)]
    if not frames:
        raise PreprocessError("the series holds no CT image slice")
    _row, _col, normal = sort_along_normal(frames)
    axial = abs(normal[2]) >= max(abs(normal[0]), abs(normal[1]))
    if axial and normal[2] > 0:  # ascending along the normal is inferior first
        frames.reverse()
    first = frames[0]
    window = file_window(first.dataset, first.frame)
    photometric = str(first.dataset.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    slices = tuple(
        SliceRef(
            index=i,
            SOPInstanceUID=str(item.dataset.SOPInstanceUID),
            InstanceNumber=_instance_number(item.dataset),
            frame=item.frame,
            position=(
                float(item.position[0]),
                float(item.position[1]),
                float(item.position[2]),
            ),
            path=item.path,
        )
        for i, item in enumerate(frames)
    )
    return SeriesLayout(
        SeriesInstanceUID=record.SeriesInstanceUID,
        Modality=record.Modality,
        SeriesDescription=record.SeriesDescription,
        kind="volume",
        rows=first.rows,
        columns=first.columns,
        pixel_spacing=first.pixel_spacing,
        photometric=photometric.strip() if photometric.strip() in _MONOCHROME else "MONOCHROME2",
        pixel_type="int16",
        window=window or CT_DEFAULT_WINDOW,
        window_source="default" if window is None else "file",
        slices=slices,
    )


def _read_header(path: Path, index: int, total: int) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise PreprocessError(f"file {index + 1} of {total} is not DICOM") from None
    except Exception as exc:
        raise PreprocessError(
            f"file {index + 1} of {total} cannot be read as DICOM ({type(exc).__name__})"
        ) from None


def _positive_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    try:
        number = default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0:
        raise PreprocessError(f"the radiograph lacks a positive {keyword}")
    return number


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing; None when neither holds two positive numbers."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            pair = [float(v) for v in value] if value else []
        except (TypeError, ValueError):
            continue
        if len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair):
            return pair[0], pair[1]
    return None


def _stored_window(ds: pydicom.Dataset) -> tuple[tuple[float, float], bool]:
    """The radiograph's window on its stored values, and whether the file gave it: its first
    window pair, else the input range of its first VOI LUT, each brought back through a linear
    rescale; else the whole stored range (BitsStored)."""
    slope = _first_number(ds.get("RescaleSlope")) or 1.0
    intercept = _first_number(ds.get("RescaleIntercept")) or 0.0
    window = file_window(ds)
    lut = (ds.get("VOILUTSequence") or [None])[0]
    if window is None and lut is not None and lut.get("LUTDescriptor") is not None:
        descriptor = [int(v) for v in lut.LUTDescriptor]
        entries = descriptor[0] or 2**16
        window = (descriptor[1] + (entries - 1) / 2, float(max(entries, 2)))
    if window is not None:
        center, width = window
        return ((center - intercept) / slope, width / abs(slope)), True
    bits = int(ds.get("BitsStored") or 16)
    return (float(2 ** (bits - 1)), float(2**bits)), False


def _image_layout(
    record: SeriesRecord, files: Sequence[tuple[str, Path]], preferred: Sequence[str]
) -> SeriesLayout:
    by_uid = dict(files)
    chosen = next((uid for uid in preferred if uid in by_uid), None)
    if chosen is not None:
        path = by_uid[chosen]
        ds = _read_header(path, list(by_uid).index(chosen), len(files))
    else:
        headers = [(_read_header(p, i, len(files)), p) for i, (_, p) in enumerate(files)]
        if not headers:
            raise PreprocessError("the series holds no image")
        ds, path = min(
            headers,
            key=lambda h: (_instance_number(h[0]) is None, _instance_number(h[0]) or 0),
        )
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in _MONOCHROME or int(ds.get("SamplesPerPixel") or 1) != 1:
        raise PreprocessError(
            f"only monochrome radiographs are shown (PhotometricInterpretation "
            f"{photometric[:16] or 'absent'!r})"
        )
    if _positive_int(ds, "NumberOfFrames", 1) != 1:
        raise PreprocessError("multi-frame radiographs are not shown")
    window, from_file = _stored_window(ds)
    return SeriesLayout(
        SeriesInstanceUID=record.SeriesInstanceUID,
        Modality=record.Modality,
        SeriesDescription=record.SeriesDescription,
        kind="image",
        rows=_positive_int(ds, "Rows"),
        columns=_positive_int(ds, "Columns"),
        pixel_spacing=_spacing(ds),
        photometric=photometric,
        pixel_type="uint16",
        window=window,
        window_source="file" if from_file else "default",
        slices=(
            SliceRef(
                index=0,
                SOPInstanceUID=str(ds.SOPInstanceUID),
                InstanceNumber=_instance_number(ds),
                frame=None,
                position=None,
                path=path,
            ),
        ),
    )


def build_layout(
    record: SeriesRecord,
    files: Sequence[tuple[str, Path]],
    preferred: Sequence[str] = (),
    *,
    headers: Sequence[pydicom.Dataset] | None = None,
) -> SeriesLayout:
    """Lays a series out for display (see the module docstring).

    Args:
        record: the series' index row.
        files: (SOPInstanceUID, stored file) of its instances.
        preferred: for a radiograph series, the images to show first (the model's).
        headers: for a CT series, its CT image headers already read from ``files``
            (:func:`triage.preprocess.ct_headers.read_headers`); None: read here.

    Raises:
        PreprocessError: no usable image, or headers that cannot be displayed (slices that
            differ in size or orientation, missing geometry, colour radiographs); the
            message names attributes and counts only.
    """
    if not files:
        raise PreprocessError("the series has no stored instance")
    if record.Modality == "CT":
        return _ct_layout(record, files, headers)
    return _image_layout(record, files, preferred)
