"""QIDO-RS (PS3.18 10.6): search the studies, series and instances this server holds, the
AI's DICOM results included, answered as DICOM JSON (PS3.18 Annex F).

Matching (PS3.4 C.2.2.2 as QIDO-RS uses it) on what the index keeps: single values, a list
of UIDs (comma or backslash separated), ``*``/``?`` wildcards on names and text, date
ranges (``20260101-20261231``, open at either end), case-insensitive PatientName, and
``fuzzymatching`` is ignored (answered as exact). Attributes not in the index are not
matchable here (400 names them); ``includefield`` is accepted and the index's attributes
are always returned. Instance-level answers read each instance's header (no pixels).

The study and series lists come from the database; the AI results (Segmentation, SR) are
listed as series of their study, read from their files.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from triage.db import Database
from triage.db.tables import DicomResultRow, InstanceRow, SeriesRow, StudyRow

MAX_LIMIT = 1000
STUDY_KEYS = frozenset(
    {
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "AccessionNumber",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
    }
)
SERIES_KEYS = frozenset({"SeriesInstanceUID", "Modality", "SeriesDescription"})
INSTANCE_KEYS = frozenset({"SOPInstanceUID", "SOPClassUID"})
CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_TAG_KEYWORD = re.compile(r"[0-9A-Fa-f]{8}")


class QueryError(ValueError):
    """A search this server cannot answer; ``str(exc)`` says which parameter and why."""


@dataclass(frozen=True)
class Query:
    """A parsed QIDO-RS query: the attribute filters, limit and offset."""

    filters: dict[str, str]
    limit: int
    offset: int


def _keyword(name: str) -> str:
    """An attribute named by keyword or by tag (``00100020``)."""
    if _TAG_KEYWORD.fullmatch(name):
        keyword = pydicom.datadict.keyword_for_tag(int(name, 16))
        if keyword:
            return str(keyword)
    return name


def parse_query(params: Iterable[tuple[str, str]], allowed: frozenset[str]) -> Query:
    """Raises :class:`QueryError` for an attribute that cannot be matched here, or a bad
    limit/offset."""
    filters: dict[str, str] = {}
    limit, offset = MAX_LIMIT, 0
    for raw, value in params:
        if raw in CONTROL:
            if raw in ("limit", "offset"):
                if not value.isdigit():
                    raise QueryError(f"{raw} must be a whole number")
                if raw == "limit":
                    limit = min(max(int(value), 1), MAX_LIMIT)
                else:
                    offset = int(value)
            continue
        key = _keyword(raw)
        if key not in allowed:
            raise QueryError(
                f"{raw} cannot be matched here; matching keys: {', '.join(sorted(allowed))}"
            )
        filters[key] = value
    return Query(filters, limit, offset)


def _matches_text(value: str | None, wanted: str, *, fold: bool = False) -> bool:
    if wanted == "":
        return True
    have = value or ""
    if fold:
        have, wanted = have.casefold(), wanted.casefold()
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(have, wanted.replace("[", "[[]"))
    return have == wanted


def _matches_uid(value: str | None, wanted: str) -> bool:
    uids = {u.strip() for u in re.split(r"[,\\]", wanted) if u.strip()}
    return not uids or (value or "") in uids


def _matches_date(value: str | None, wanted: str) -> bool:
    if not wanted:
        return True
    have = value or ""
    if "-" not in wanted:
        return have == wanted
    start, _, end = wanted.partition("-")
    return bool(have) and (not start or have >= start) and (not end or have <= end)


def _study_matches(study: StudyRow, modalities: set[str], filters: Mapping[str, str]) -> bool:
    for key, wanted in filters.items():
        if key == "StudyInstanceUID" and not _matches_uid(study.StudyInstanceUID, wanted):
            return False
        if key == "PatientName" and not _matches_text(study.PatientName, wanted, fold=True):
            return False
        if key in ("PatientID", "AccessionNumber", "StudyDescription") and not _matches_text(
            getattr(study, key), wanted
        ):
            return False
        if key == "StudyDate" and not _matches_date(study.StudyDate, wanted):
            return False
        if key == "ModalitiesInStudy":
            wanted_set = {m.strip() for m in re.split(r"[,\\]", wanted) if m.strip()}
            if wanted_set and not wanted_set & modalities:
                return False
    return True


@dataclass(frozen=True)
class SeriesEntry:
    """A series as QIDO-RS lists it: one of the received ones, or one of the AI's results."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    Modality: str | None
    SeriesDescription: str | None
    paths: tuple[Path, ...]
    SeriesNumber: int | None = None


def _result_series(rows: Iterable[DicomResultRow], study_uid: str) -> list[SeriesEntry]:
    """The AI results of a study grouped into their series, described from their files."""
    by_series: dict[str, list[DicomResultRow]] = {}
    for row in rows:
        by_series.setdefault(row.SeriesInstanceUID, []).append(row)
    out = []
    for series_uid, members in by_series.items():
        paths = tuple(Path(r.path) for r in members)
        modality, description, number = None, None, None
        try:
            head = pydicom.dcmread(paths[0], stop_before_pixels=True)
            modality = head.get("Modality")
            description = head.get("SeriesDescription")
            number = head.get("SeriesNumber")
        except (OSError, pydicom.errors.InvalidDicomError):
            pass
        out.append(
            SeriesEntry(
                study_uid,
                series_uid,
                modality,
                description,
                paths,
                int(number) if number is not None else None,
            )
        )
    return out


def study_series(db: Database, study_uid: str) -> list[SeriesEntry] | None:
    """Every series of a study (received, then the AI's); None when the study is unknown."""
    with db.session() as s:
        study = s.scalar(
            select(StudyRow)
            .where(StudyRow.StudyInstanceUID == study_uid)
            .options(selectinload(StudyRow.series).selectinload(SeriesRow.instances))
        )
        if study is None:
            return None
        received = [
            SeriesEntry(
                study_uid,
                se.SeriesInstanceUID,
                se.Modality,
                se.SeriesDescription,
                tuple(Path(i.path) for i in se.instances),
            )
            for se in study.series
        ]
        results = s.scalars(select(DicomResultRow).where(DicomResultRow.study_id == study.id))
        return received + _result_series(results, study_uid)


def _dataset(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        if value is not None and value != "":
            setattr(ds, keyword, value)
    return ds


def _json(ds: Dataset, retrieve_url: str) -> dict[str, Any]:
    ds.RetrieveURL = retrieve_url
    return dict(ds.to_json_dict())


def search_studies(db: Database, query: Query, base_url: str) -> list[dict[str, Any]]:
    """Matching studies, in order of arrival, as DICOM JSON."""
    with db.session() as s:
        studies = s.scalars(
            select(StudyRow).options(selectinload(StudyRow.series)).order_by(StudyRow.id)
        ).all()
        result_rows = s.scalars(select(DicomResultRow)).all()
    results_by_study: dict[int, list[DicomResultRow]] = {}
    for row in result_rows:
        results_by_study.setdefault(row.study_id, []).append(row)
    found: list[dict[str, Any]] = []
    skipped = 0
    for study in studies:
        extra = _result_series(results_by_study.get(study.id, []), study.StudyInstanceUID)
        modalities = {se.Modality for se in study.series if se.Modality} | {
            e.Modality for e in extra if e.Modality
        }
        if not _study_matches(study, modalities, query.filters):
            continue
        if skipped < query.offset:
            skipped += 1
            continue
        n_series = len(study.series) + len(extra)
        n_instances = sum(se.n_instances for se in study.series) + sum(len(e.paths) for e in extra)
        ds = _dataset(
            StudyInstanceUID=study.StudyInstanceUID,
            PatientName=study.PatientName,
            PatientID=study.PatientID,
            AccessionNumber=study.AccessionNumber,
            StudyDate=study.StudyDate,
            StudyDescription=study.StudyDescription,
            ModalitiesInStudy=sorted(modalities) or None,
            NumberOfStudyRelatedSeries=n_series,
            NumberOfStudyRelatedInstances=n_instances,
        )
        found.append(_json(ds, f"{base_url}/studies/{study.StudyInstanceUID}"))
        if len(found) >= query.limit:
            break
    return found


def _series_json(entry: SeriesEntry, base_url: str) -> dict[str, Any]:
    ds = _dataset(
        StudyInstanceUID=entry.StudyInstanceUID,
        SeriesInstanceUID=entry.SeriesInstanceUID,
        Modality=entry.Modality,
        SeriesDescription=entry.SeriesDescription,
        SeriesNumber=entry.SeriesNumber,
        NumberOfSeriesRelatedInstances=len(entry.paths),
    )
    return _json(
        ds, f"{base_url}/studies/{entry.StudyInstanceUID}/series/{entry.SeriesInstanceUID}"
    )


def _series_matches(entry: SeriesEntry, filters: Mapping[str, str]) -> bool:
    for key, wanted in filters.items():
        if key == "SeriesInstanceUID" and not _matches_uid(entry.SeriesInstanceUID, wanted):
            return False
        if key in ("Modality", "SeriesDescription") and not _matches_text(
            getattr(entry, key), wanted
        ):
            return False
    return True


def _page(items: list[Any], query: Query) -> list[Any]:
    return items[query.offset : query.offset + query.limit]


def search_series(
    db: Database, study_uid: str | None, query: Query, base_url: str
) -> list[dict[str, Any]] | None:
    """Matching series of one study (None: unknown study), or of every study matching the
    study-level filters."""
    series_filters = {k: v for k, v in query.filters.items() if k in SERIES_KEYS}
    study_filters = {k: v for k, v in query.filters.items() if k in STUDY_KEYS}
    if study_uid is not None:
        entries = study_series(db, study_uid)
        if entries is None:
            return None
    else:
        studies = search_studies(db, Query(study_filters, MAX_LIMIT, 0), base_url)
        entries = []
        for doc in studies:
            uid = doc["0020000D"]["Value"][0]
            entries.extend(study_series(db, uid) or [])
    matching = [e for e in entries if _series_matches(e, series_filters)]
    return [_series_json(e, base_url) for e in _page(matching, query)]


def instance_paths(
    db: Database, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[Path] | None:
    """The files of a study, one of its series, or one instance; None when unknown."""
    entries = study_series(db, study_uid)
    if entries is None:
        return None
    if series_uid is not None:
        entries = [e for e in entries if e.SeriesInstanceUID == series_uid]
        if not entries:
            return None
    paths = [p for e in entries for p in e.paths]
    if sop_uid is None:
        return paths
    with db.session() as s:
        stored = s.scalar(select(InstanceRow.path).where(InstanceRow.SOPInstanceUID == sop_uid))
        result = s.scalar(
            select(DicomResultRow.path).where(DicomResultRow.SOPInstanceUID == sop_uid)
        )
    wanted = {Path(p) for p in (stored, result) if p}
    chosen = [p for p in paths if p in wanted]
    return chosen or None


def search_instances(
    db: Database,
    study_uid: str,
    series_uid: str | None,
    query: Query,
    base_url: str,
) -> list[dict[str, Any]] | None:
    """Matching instances of a study or series (headers read from the files)."""
    paths = instance_paths(db, study_uid, series_uid)
    if paths is None:
        return None
    found = []
    for path in paths:
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        entry = {
            "SOPInstanceUID": str(head.get("SOPInstanceUID", "")),
            "SOPClassUID": str(head.get("SOPClassUID", "")),
        }
        if not all(
            _matches_uid(entry[k], v) for k, v in query.filters.items() if k in INSTANCE_KEYS
        ):
            continue
        series = str(head.get("SeriesInstanceUID", ""))
        ds = _dataset(
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series,
            SOPInstanceUID=entry["SOPInstanceUID"],
            SOPClassUID=entry["SOPClassUID"],
            InstanceNumber=head.get("InstanceNumber"),
            Rows=head.get("Rows"),
            Columns=head.get("Columns"),
            NumberOfFrames=head.get("NumberOfFrames"),
            Modality=head.get("Modality"),
        )
        found.append(
            (
                int(head.get("InstanceNumber") or 0),
                _json(
                    ds,
                    f"{base_url}/studies/{study_uid}/series/{series}"
                    f"/instances/{entry['SOPInstanceUID']}",
                ),
            )
        )
    found.sort(key=lambda pair: pair[0])
    return _page([doc for _, doc in found], query)
