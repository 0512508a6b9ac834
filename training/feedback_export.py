"""The radiologists' feedback as a de-identified dataset in the generic format.

:func:`export_feedback` reads the feedback records (``triage.worklist.feedback``) and the
index of the studies they judge, and writes a dataset folder (:mod:`training.format`)::

    <out>/dataset.json   format, name, task, source "feedback", created, filters, counts,
                         the de-identification method and library (never the salt)
    <out>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
                         every indexed instance of each exported study, de-identified
                         (:mod:`training.deid`); the folder names are the new UIDs
    <out>/labels.csv     :data:`~training.format.LABEL_COLUMNS`, then :data:`EXTRA_COLUMNS`

Labels. A judgement says whether the finding is present (a vote):

=========  ===============  =====
verdict    the AI           vote
=========  ===============  =====
agree      flagged it       1
disagree   flagged it       0
agree      did not flag it  0
disagree   did not flag it  1
missed     (did not flag)   1
=========  ===============  =====

``flagged`` is what the AI said when the judgement was made (kept with the record). For each
study and finding, each reader's latest judgement counts (a reader who changed their mind
counts once, as they decided last), and the majority of readers gives the label; a tie
leaves the finding out of ``labels.csv`` and is counted (``ExportReport.ties``). A study is
exported when at least one of its findings is labelled and at least one of its files is.

The extra columns keep what the AI said, from the latest counted judgement that names a
model: ``model``, ``model_version``, ``ai_score``, ``ai_flagged`` (1/0; blank when the AI
reported nothing), ``judgements`` (readers counted) and ``missed_slice``: the de-identified
SOPInstanceUIDs of the slices readers marked as missed (``;``-separated), for a later expert
annotation step. ``mask`` stays blank: masks come from experts, not from the AI's output.
``SeriesInstanceUID`` is the (de-identified) series the judgements refer to, when they agree
on one.

Everything is written into ``<out>.partial`` and renamed to ``<out>`` at the end; an
existing non-empty ``<out>`` is refused. A file the index names but the store lacks (or that
cannot be read) is left out and reported by its content hash, never its UIDs. Logs carry
counts only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from training.deid import (
    LIBRARY,
    METHOD_CODES,
    METHOD_TEXT,
    BurnedInAnnotationError,
    Deidentifier,
    library_version,
)
from training.format import DICOM_DIR, FORMAT, LABEL_COLUMNS, LABELS_FILE, META_FILE
from triage.config import Settings
from triage.db import Database
from triage.db.tables import FeedbackRow, FindingRow, InstanceRow, SeriesRow, StudyRow
from triage.domain import FeedbackVerdict

log = logging.getLogger(__name__)

SOURCE: Final = "feedback"
#: Columns after the standard ones: what the AI said, and where a reader saw a miss.
EXTRA_COLUMNS: Final[tuple[str, ...]] = (
    "model",
    "model_version",
    "ai_score",
    "ai_flagged",
    "judgements",
    "missed_slice",
)
COLUMNS: Final = LABEL_COLUMNS + EXTRA_COLUMNS


class ExportError(Exception):
    """The export cannot be made; ``str(exc)`` is one line that says why and what to do."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and what it left out.

    Attributes:
        out: the dataset folder.
        studies: studies exported.
        patients: distinct patients (pseudonyms) among them.
        rows: rows of ``labels.csv``.
        positives: rows labelled 1.
        negatives: rows labelled 0.
        ties: study findings left out because the readers were evenly split.
        instances: DICOM files written.
        missing: sha256 (as indexed) of files the index names but the store lacks.
        unreadable: sha256 of stored files that could not be read as DICOM or de-identified
            (never written).
        burned_in: instances left out because their pixels may carry identity.
        studies_without_files: labelled studies left out because none of their files was
            exported.
        cleaned: elements the de-identification's last check had to empty (0 normally).
    """

    out: Path
    studies: int = 0
    patients: int = 0
    rows: int = 0
    positives: int = 0
    negatives: int = 0
    ties: int = 0
    instances: int = 0
    missing: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()
    burned_in: int = 0
    studies_without_files: int = 0
    cleaned: int = 0


@dataclass(frozen=True)
class Judgement:
    """One feedback record, as the labelling reads it."""

    id: int
    study_id: int
    finding: str
    reader: str
    verdict: str
    at: datetime
    ai_flag: bool | None
    ai_score: float | None
    model: str | None
    model_version: str | None
    SeriesInstanceUID: str | None
    SOPInstanceUID: str | None


def vote(verdict: str, ai_flag: bool | None) -> int | None:
    """Whether a judgement says the finding is present (1) or absent (0).

    Args:
        verdict: a :class:`~triage.domain.FeedbackVerdict` value.
        ai_flag: whether the AI flagged the finding when the judgement was made; None when
            the AI reported nothing.

    Returns:
        1 or 0 (see the module doc); None for agree/disagree without an AI finding.
    """
    if verdict == FeedbackVerdict.missed:
        return 1
    if ai_flag is None:
        return None
    if verdict == FeedbackVerdict.agree:
        return 1 if ai_flag else 0
    if verdict == FeedbackVerdict.disagree:
        return 0 if ai_flag else 1
    return None


def latest_per_reader(judgements: Iterable[Judgement]) -> list[Judgement]:
    """Each reader's latest judgement (by time, then record order) among ``judgements``."""
    latest: dict[str, Judgement] = {}
    for j in sorted(judgements, key=lambda j: (j.at, j.id)):
        latest[j.reader] = j
    return sorted(latest.values(), key=lambda j: (j.at, j.id))


def majority(votes: Iterable[int]) -> int | None:
    """1 or 0 by majority of ``votes``; None when evenly split (or no votes)."""
    ones = zeros = 0
    for v in votes:
        ones += v == 1
        zeros += v == 0
    if ones == zeros:
        return None
    return 1 if ones > zeros else 0


@dataclass
class _Study:
    id: int
    StudyInstanceUID: str
    patient_key: str
    rows: list[dict[str, str]] = field(default_factory=list)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _judgements(
    db: Database, *, model: str | None, finding: str | None
) -> tuple[list[Judgement], dict[int, tuple[str, str]]]:
    """The feedback records (filtered by model and finding) and, per study id, its
    (StudyInstanceUID, patient key)."""
    with db.session() as s:
        query = select(FeedbackRow)
        if finding is not None:
            query = query.where(FeedbackRow.finding == finding)
        records = list(s.scalars(query.order_by(FeedbackRow.id)))
        if model is not None:
            # Missed findings the AI did not report carry no model: kept when the model
            # reports that finding on some study.
            model_findings = set(
                s.scalars(select(FindingRow.finding).where(FindingRow.model_name == model))
            )
            records = [
                r
                for r in records
                if r.model_name == model or (r.model_name is None and r.finding in model_findings)
            ]
        study_ids = sorted({r.study_id for r in records})
        studies: dict[int, tuple[str, str]] = {}
        for sid, uid, patient_id in s.execute(
            select(StudyRow.id, StudyRow.StudyInstanceUID, StudyRow.PatientID).where(
                StudyRow.id.in_(study_ids)
            )
        ):
            # The patient is the indexed PatientID (the index keeps no issuer); a study
            # without one is a patient of its own (it cannot be linked).
            studies[sid] = (uid, patient_id if patient_id else f"study:{uid}")
        judgements = [
            Judgement(
                id=r.id,
                study_id=r.study_id,
                finding=r.finding,
                reader=r.reader,
                verdict=r.verdict,
                at=_utc(r.created_at),
                ai_flag=None if r.ai_flag is None else bool(r.ai_flag),
                ai_score=r.ai_score,
                model=r.model_name,
                model_version=r.model_version,
                SeriesInstanceUID=r.SeriesInstanceUID,
                SOPInstanceUID=r.SOPInstanceUID,
            )
            for r in records
        ]
    return judgements, studies


def _row(
    study_uid: str,
    finding: str,
    label: int,
    counted: list[Judgement],
    deid: Deidentifier,
    pseudonym: str,
) -> dict[str, str]:
    series = {j.SeriesInstanceUID for j in counted if j.SeriesInstanceUID}
    said = [j for j in counted if j.model is not None]
    ai = said[-1] if said else None
    missed = sorted(
        {
            deid.uid(j.SOPInstanceUID)
            for j in counted
            if j.verdict == FeedbackVerdict.missed and j.SOPInstanceUID
        }
    )
    return {
        "StudyInstanceUID": deid.uid(study_uid),
        "PatientID": pseudonym,
        "SeriesInstanceUID": deid.uid(series.pop()) if len(series) == 1 else "",
        "finding": finding,
        "label": str(label),
        "mask": "",
        "subtype": "",
        "volume_ml": "",
        "split": "",
        "model": (ai.model or "") if ai else "",
        "model_version": (ai.model_version or "") if ai else "",
        "ai_score": "" if ai is None or ai.ai_score is None else repr(float(ai.ai_score)),
        "ai_flagged": "" if ai is None or ai.ai_flag is None else str(int(ai.ai_flag)),
        "judgements": str(len(counted)),
        "missed_slice": ";".join(missed),
    }


def _open(source: Settings | Database) -> tuple[Database, bool]:
    """The database and whether this module opened it (and must close it)."""
    if isinstance(source, Database):
        return source, False
    url = source.resolved_database_url
    if source.database_url is None and not (source.data_dir / "triage.db").is_file():
        raise ExportError(
            f"no triage database in {source.data_dir.resolve()}: give the data folder"
            " (TRIAGE_DATA_DIR, --data-dir)"
        )
    try:
        db = Database(url)
        db.migrate()
    except SQLAlchemyError as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ExportError(f"cannot open the database {shown}: {reason}") from None
    return db, True


def _prepare(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: export into a new folder")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # left by an export that did not finish
        shutil.rmtree(partial)
    (partial / DICOM_DIR).mkdir(parents=True)
    return partial


def _task(rows: list[dict[str, str]], finding: str | None) -> str:
    findings = {r["finding"] for r in rows}
    if finding is not None:
        return finding
    return findings.pop() if len(findings) == 1 else "findings"


def export_feedback(
    source: Settings | Database,
    out: Path,
    *,
    since: datetime | None = None,
    model: str | None = None,
    finding: str | None = None,
    salt: bytes | None = None,
    now: datetime | None = None,
) -> ExportReport:
    """Export the studies that have feedback as a de-identified dataset in ``out``.

    Args:
        source: the settings (the configured database; the files by the paths it indexes)
            or an open database.
        out: the dataset folder to make; must not exist or be empty.
        since: only study findings whose counted judgements include one made at or after
            this time (naive: UTC); every reader's latest judgement still counts for the
            label.
        model: only judgements of this model's findings (and misses of findings it reports).
        finding: only this finding code.
        salt: the export's secret for pseudonyms, date shifts and UIDs (at least 16 bytes);
            None: a random one, so the export links to no other. Never written out.
        now: the creation time written into dataset.json (default: now).

    Returns:
        What was written and left out.

    Raises:
        ExportError: ``out`` exists and is not empty, or the database is absent or cannot
            be opened.
    """
    out = Path(out)
    deid = Deidentifier(salt if salt is not None else os.urandom(32))
    since = _utc(since) if since is not None else None
    db, opened = _open(source)
    partial = _prepare(out)
    try:
        report, rows = _export(db, out, partial, deid, since=since, model=model, finding=finding)
        meta = _meta(report, rows, out, since=since, model=model, finding=finding, now=now)
        (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked): the rename takes its place
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if opened:
            db.dispose()
    log.info(
        "feedback export: %d studies of %d patients, %d rows (%d ties left out), %d files,"
        " %d missing, %d unreadable, %d with possible burned-in annotation left out",
        report.studies,
        report.patients,
        report.rows,
        report.ties,
        report.instances,
        len(report.missing),
        len(report.unreadable),
        report.burned_in,
    )
    return report


def _meta(
    report: ExportReport,
    rows: list[dict[str, str]],
    out: Path,
    *,
    since: datetime | None,
    model: str | None,
    finding: str | None,
    now: datetime | None,
) -> dict[str, object]:
    """dataset.json: the format's keys, the filters, the counts and the method (no salt)."""
    return {
        "format": FORMAT,
        "name": out.name,
        "task": _task(rows, finding),
        "source": SOURCE,
        "created": (now or datetime.now(UTC)).isoformat(),
        "filters": {
            "since": since.isoformat() if since else None,
            "model": model,
            "finding": finding,
        },
        "counts": {
            "studies": report.studies,
            "patients": report.patients,
            "rows": report.rows,
            "positives": report.positives,
            "negatives": report.negatives,
            "ties": report.ties,
            "instances": report.instances,
            "missing": len(report.missing),
            "unreadable": len(report.unreadable),
            "burned_in": report.burned_in,
        },
        "columns": list(COLUMNS),
        "deidentification": {
            "method": METHOD_TEXT,
            "codes": [
                {"value": c.value, "scheme": c.scheme_designator, "meaning": c.meaning}
                for c in METHOD_CODES
            ],
            "library": {"name": LIBRARY, "version": library_version()},
        },
    }


def _export(
    db: Database,
    out: Path,
    partial: Path,
    deid: Deidentifier,
    *,
    since: datetime | None,
    model: str | None,
    finding: str | None,
) -> tuple[ExportReport, list[dict[str, str]]]:
    judgements, study_keys = _judgements(db, model=model, finding=finding)
    groups: dict[tuple[int, str], list[Judgement]] = defaultdict(list)
    for j in judgements:
        groups[(j.study_id, j.finding)].append(j)

    studies: dict[int, _Study] = {}
    ties = 0
    for (study_id, code), group in sorted(groups.items()):
        counted = latest_per_reader(group)
        if since is not None and not any(j.at >= since for j in counted):
            continue
        voted = [(j, v) for j in counted if (v := vote(j.verdict, j.ai_flag)) is not None]
        label = majority(v for _, v in voted)
        if label is None:
            ties += 1 if voted else 0
            continue
        uid, patient_key = study_keys[study_id]
        study = studies.setdefault(study_id, _Study(study_id, uid, patient_key))
        study.rows.append(
            _row(uid, code, label, [j for j, _ in voted], deid, deid.pseudonym(patient_key))
        )

    rows: list[dict[str, str]] = []
    missing: list[str] = []
    unreadable: list[str] = []
    instances = burned_in = cleaned = without_files = 0
    patients: set[str] = set()
    for study in studies.values():
        with db.session() as s:
            files = list(
                s.execute(
                    select(InstanceRow.path, InstanceRow.sha256)
                    .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
                    .where(SeriesRow.study_id == study.id)
                    .order_by(InstanceRow.id)
                )
            )
        written = 0
        for path, sha256 in files:
            try:
                ds = pydicom.dcmread(path)
            except FileNotFoundError:
                missing.append(sha256)
                continue
            except (InvalidDicomError, OSError, ValueError, EOFError):
                unreadable.append(sha256)
                continue
            try:
                cleaned += deid.deidentify(ds, patient_key=study.patient_key)
            except BurnedInAnnotationError:
                burned_in += 1
                continue
            except Exception as exc:  # never written when it cannot be de-identified
                log.warning("an instance could not be de-identified (%s)", type(exc).__name__)
                unreadable.append(sha256)
                continue
            dest = (
                partial
                / DICOM_DIR
                / str(ds.StudyInstanceUID)
                / str(ds.SeriesInstanceUID)
                / f"{ds.SOPInstanceUID}.dcm"
            )
            dest.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dest, enforce_file_format=True)
            written += 1
        if not written:
            without_files += 1
            continue
        instances += written
        rows.extend(study.rows)
        patients.add(deid.pseudonym(study.patient_key))

    with (partial / LABELS_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    report = ExportReport(
        out=out,
        studies=len(studies) - without_files,
        patients=len(patients),
        rows=len(rows),
        positives=sum(r["label"] == "1" for r in rows),
        negatives=sum(r["label"] == "0" for r in rows),
        ties=ties,
        instances=instances,
        missing=tuple(missing),
        unreadable=tuple(unreadable),
        burned_in=burned_in,
        studies_without_files=without_files,
        cleaned=cleaned,
    )
    return report, rows
