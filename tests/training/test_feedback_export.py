"""The feedback export: studies ingested through the real ingest path into a real database
(SQLite, and PostgreSQL when TRIAGE_TEST_POSTGRES_URL is set), findings, readers'
judgements recorded by ``record_feedback``, then exported and checked element by element:
no identity or original UID left anywhere, pseudonyms and date shifts per patient, UID
references kept, labels by the readers' majority, ties left out, re-export refused."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid
from sqlalchemy import select

from tests.conftest import pydicom_file
from training.feedback_export import (
    COLUMNS,
    ExportError,
    export_feedback,
    majority,
    vote,
)
from training.format import DICOM_DIR, FORMAT, LABEL_COLUMNS, LABELS_FILE, META_FILE
from triage.config import Settings
from triage.db import Database
from triage.db.tables import FindingRow, InstanceRow, StudyRow
from triage.domain import FeedbackVerdict
from triage.ingest.store import Ingestor
from triage.worklist.feedback import FeedbackInput, record_feedback

SALT = b"feedback-export-test-salt-000001"
ICH = "intracranial_haemorrhage"
SHIFT = "midline_shift"
BLAST = ("blast-ct-v1", "1")
SHIFT_MODEL = ("shift-v1", "2")
T0 = datetime(2024, 6, 1, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Patient:
    id: str
    name: str
    birth: str
    other_id: str
    accession: str


@dataclass(frozen=True)
class SourceStudy:
    key: str  # S1, S2, S3
    patient: Patient
    study_date: str
    series_number: int  # kept by the profile: tells the exported studies apart
    uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    sops: tuple[str, str] = field(default_factory=lambda: (generate_uid(), generate_uid()))
    frame_uid: str = field(default_factory=generate_uid)


P1 = Patient("MRN-HX-40417", "HOLLOWAY^PERPETUA", "19500315", "ALT-77123", "ACC-5512")
P2 = Patient("MRN-QZ-99821", "BRANNIGAN^OSWALD", "19621111", "ALT-88234", "ACC-6623")
INSTITUTION = "ST ELSEWHERE GENERAL"
REFERRING = "KILDARE^JAMES"


@dataclass
class Site:
    db: Database
    settings: Settings
    studies: dict[str, SourceStudy]
    sources: list[Dataset]


def source_instance(study: SourceStudy, index: int) -> Dataset:
    """An instance of ``study`` (CT_small's pixels) carrying identity everywhere it can."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    p = study.patient
    ds.PatientName = p.name
    ds.PatientID = p.id
    ds.PatientBirthDate = p.birth
    ds.OtherPatientIDs = p.other_id
    ds.AccessionNumber = p.accession
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = REFERRING
    ds.StudyDescription = f"CT head {p.name.split('^')[0]} follow-up"
    ds.ImageComments = f"called {p.name.split('^')[1]} on ext 4417"
    ds.ContrastBolusAgent = f"as agreed with {p.name.split('^')[0]}"  # kept by the profile
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = study.series_uid
    ds.SOPInstanceUID = study.sops[index]
    ds.file_meta.MediaStorageSOPInstanceUID = study.sops[index]
    ds.FrameOfReferenceUID = study.frame_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.SeriesNumber = study.series_number
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 5 * index]
    block = ds.private_block(0x0041, "ACME HOSPITAL 1.0", create=True)
    block.add_new(0x10, "LO", p.name)
    block.add_new(0x11, "LO", p.id)
    if index == 1:  # refers to the first instance of its series
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = study.sops[0]
        ds.ReferencedImageSequence = Sequence([ref])
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def add_finding(
    db: Database,
    study_uid: str,
    finding: str,
    model: tuple[str, str],
    flag: bool,
    score: float,
    series_uid: str,
) -> None:
    with db.session() as s:
        study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == study_uid))
        model_doc = {"name": model[0], "version": model[1], "weights_sha256": []}
        s.add(
            FindingRow(
                study_id=study_id,
                finding=finding,
                flag=int(flag),
                score=score,
                model_name=model[0],
                model_version=model[1],
                SeriesInstanceUID=series_uid,
                payload={"finding": finding, "flag": flag, "score": score, "model": model_doc},
                mask_path=None,
                created_at=T0,
            )
        )


def judge(
    db: Database,
    study: SourceStudy,
    reader: str,
    minutes: int,
    finding: str,
    verdict: FeedbackVerdict,
    sop: str | None = None,
) -> None:
    item = FeedbackInput(finding=finding, verdict=verdict, SOPInstanceUID=sop)
    record_feedback(db, study.uid, reader, item, now=T0 + timedelta(minutes=minutes))


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    """Two patients (P1 with studies S1 and S2, P2 with S3), two instances each, ingested;
    findings and judgements:

    - S1 ICH flagged: alice disagree then agree, bob agree -> 1 (2 readers).
    - S2 ICH flagged: alice disagree, bob agree -> tie, left out.
    - S2 midline shift not flagged: alice agree, bob agree -> 0.
    - S3 ICH not flagged: alice disagree, bob missed (2nd slice), carol agree -> 1 (2 to 1).
    """
    database_url = db.engine.url.render_as_string(hide_password=False)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, _env_file=None)  # type: ignore[call-arg]
    studies = {
        "S1": SourceStudy("S1", P1, "20240105", 11),
        "S2": SourceStudy("S2", P1, "20240320", 12),
        "S3": SourceStudy("S3", P2, "20240210", 21),
    }
    ingestor = Ingestor.from_settings(settings, db)
    sources = []
    for study in studies.values():
        for index in (0, 1):
            ds = source_instance(study, index)
            sources.append(ds)
            assert ingestor.ingest(to_bytes(ds), source="test").ok
    s1, s2, s3 = studies.values()
    add_finding(db, s1.uid, ICH, BLAST, True, 0.92, s1.series_uid)
    add_finding(db, s2.uid, ICH, BLAST, True, 0.81, s2.series_uid)
    add_finding(db, s2.uid, SHIFT, SHIFT_MODEL, False, 0.1, s2.series_uid)
    add_finding(db, s3.uid, ICH, BLAST, False, 0.2, s3.series_uid)
    v = FeedbackVerdict
    judge(db, s1, "alice", 1, ICH, v.disagree)
    judge(db, s1, "bob", 2, ICH, v.agree)
    judge(db, s1, "alice", 3, ICH, v.agree)  # changed her mind: this one counts
    judge(db, s2, "alice", 10, ICH, v.disagree)
    judge(db, s2, "bob", 11, ICH, v.agree)
    judge(db, s2, "alice", 12, SHIFT, v.agree)
    judge(db, s2, "bob", 13, SHIFT, v.agree)
    judge(db, s3, "alice", 20, ICH, v.disagree)
    judge(db, s3, "bob", 21, ICH, v.missed, sop=s3.sops[1])
    judge(db, s3, "carol", 22, ICH, v.agree)
    return Site(db, settings, studies, sources)


def exported(out: Path) -> list[Dataset]:
    files = sorted((out / DICOM_DIR).rglob("*.dcm"))
    return [pydicom.dcmread(f) for f in files]


def labels(out: Path) -> list[dict[str, str]]:
    with (out / LABELS_FILE).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def by_study(files: list[Dataset], site: Site) -> dict[str, list[Dataset]]:
    """Exported instances by source study (told apart by SeriesNumber), in instance order."""
    keys = {s.series_number: s.key for s in site.studies.values()}
    found: dict[str, list[Dataset]] = defaultdict(list)
    for ds in sorted(files, key=lambda d: int(d.InstanceNumber)):
        found[keys[int(ds.SeriesNumber)]].append(ds)
    return found


def elements(ds: Dataset) -> list[pydicom.DataElement]:
    """Every element of the data set and its file meta, through all sequences."""
    found: list[pydicom.DataElement] = []
    ds.walk(lambda _d, e: found.append(e))
    ds.file_meta.walk(lambda _d, e: found.append(e))
    return found


def text_values(element: pydicom.DataElement) -> list[str]:
    value = element.value
    if element.VR == "SQ" or isinstance(value, bytes | bytearray) or value is None:
        return []
    if isinstance(value, pydicom.multival.MultiValue | list):
        return [str(v) for v in value]
    return [str(value)]


def original_uids(sources: list[Dataset]) -> set[str]:
    """Instance UIDs of the sources: every UI value but registered DICOM UIDs (SOP classes,
    transfer syntaxes) and the implementation's class UID."""
    uids: set[str] = set()
    for ds in sources:
        for e in elements(ds):
            if e.VR == "UI" and e.keyword != "ImplementationClassUID":
                uids.update(v for v in text_values(e) if v and UID(v).name == v)
    return uids


def identity(sources: list[Dataset]) -> tuple[set[str], set[str]]:
    """(exact values that must be gone, words that must not appear in any text)."""
    exact: set[str] = {INSTITUTION, REFERRING}
    words: set[str] = {"ELSEWHERE", "KILDARE"}
    for p in (P1, P2):
        exact |= {p.id, p.name, p.birth, p.other_id, p.accession}
        words |= {p.id, p.other_id, p.accession, *p.name.split("^")}
    for ds in sources:  # CT_small's Other Patient IDs Sequence
        exact |= {str(e.value) for e in elements(ds) if e.keyword == "PatientID"}
    return exact, words


def test_vote_follows_the_table() -> None:
    v = FeedbackVerdict
    assert vote(v.agree, True) == 1 and vote(v.disagree, True) == 0
    assert vote(v.agree, False) == 0 and vote(v.disagree, False) == 1
    assert vote(v.missed, False) == 1 and vote(v.missed, None) == 1
    assert vote(v.agree, None) is None
    assert majority([1, 1, 0]) == 1 and majority([0, 0, 1]) == 0
    assert majority([1, 0]) is None and majority([]) is None


def test_no_identity_private_tag_or_original_uid_remains(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "export"
    report = export_feedback(site.db, out, salt=SALT)
    files = exported(out)
    assert len(files) == report.instances == 6
    assert report.cleaned == 6  # the name in ContrastBolusAgent, found by the last check
    uids = original_uids(site.sources)
    assert len(uids) >= 3 * 4  # study, series, two instances (and frame of reference) each
    exact, words = identity(site.sources)
    for ds in files:
        for e in elements(ds):
            assert not e.tag.is_private, f"private element {e.tag} kept"
            for value in text_values(e):
                assert value not in uids, f"{e.keyword or e.tag} keeps an original UID"
                assert value not in exact, f"{e.keyword or e.tag} keeps an identity value"
                assert not any(w.upper() in value.upper() for w in words), e.keyword
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientBirthDate == ""
        assert "StudyDescription" not in ds and "ImageComments" not in ds  # free text
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert {"113100", "113107"} <= codes
        assert any("dicognito" in m for m in ds.DeidentificationMethod)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # class UIDs stay
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.pixel_array.shape == (128, 128)
    for name in (LABELS_FILE, META_FILE):
        text = (out / name).read_text(encoding="utf-8").upper()
        assert not any(v.upper() in text for v in exact | words | uids), name
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    assert SALT.decode() not in json.dumps(meta)


def test_pseudonyms_and_date_shifts_are_per_patient(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_feedback(site.db, out, salt=SALT)
    studies = by_study(exported(out), site)

    def shift(key: str) -> set[int]:
        original = datetime.strptime(site.studies[key].study_date, "%Y%m%d").date()
        return {
            (original - datetime.strptime(d, "%Y%m%d").date()).days
            for ds in studies[key]
            for d in (ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate)
        }

    pseudonyms = {k: {(ds.PatientID, str(ds.PatientName)) for ds in v} for k, v in studies.items()}
    assert all(len(p) == 1 for p in pseudonyms.values())
    assert pseudonyms["S1"] == pseudonyms["S2"] != pseudonyms["S3"]
    shifts = {k: shift(k) for k in studies}
    assert all(len(s) == 1 for s in shifts.values())  # one shift within a study
    assert shifts["S1"] == shifts["S2"] != shifts["S3"]
    assert all(62 <= s.pop() < 730 for s in shifts.values())
    assert {ds.StudyTime for ds in studies["S1"]} == {"072730"}  # whole days: times kept
    s1, s2 = (date.fromisoformat(studies[k][0].StudyDate) for k in ("S1", "S2"))
    assert (s2 - s1).days == 75  # the interval between the patient's studies is kept
    # labels.csv names the patient as the files do
    patient_of = {str(ds.StudyInstanceUID): ds.PatientID for v in studies.values() for ds in v}
    for row in labels(out):
        assert row["PatientID"] == patient_of[row["StudyInstanceUID"]]
    # another salt, other pseudonyms: exports do not link unless the salt is kept
    other = tmp_path / "other"
    export_feedback(site.db, other, salt=b"another-salt-of-the-same-length!")
    assert {ds.PatientID for ds in exported(other)}.isdisjoint(
        {ds.PatientID for ds in exported(out)}
    )


def test_uid_references_survive_consistently(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_feedback(site.db, out, salt=SALT)
    studies = by_study(exported(out), site)
    assert len({str(v[0].StudyInstanceUID) for v in studies.values()}) == 3
    for first, second in studies.values():
        assert first.StudyInstanceUID == second.StudyInstanceUID
        assert first.SeriesInstanceUID == second.SeriesInstanceUID
        assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
        assert first.SOPInstanceUID != second.SOPInstanceUID
        (ref,) = second.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == first.SOPClassUID
        for ds in (first, second):
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # labels point at the exported study and series; the missed slice at the exported image
    rows = {(r["StudyInstanceUID"], r["finding"]): r for r in labels(out)}
    s3_first, s3_second = studies["S3"]
    row = rows[(str(s3_first.StudyInstanceUID), ICH)]
    assert row["SeriesInstanceUID"] == s3_first.SeriesInstanceUID
    assert row["missed_slice"] == s3_second.SOPInstanceUID


def test_labels_follow_the_readers_majority(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "export"
    report = export_feedback(site.db, out, salt=SALT)
    studies = by_study(exported(out), site)
    uid = {k: str(v[0].StudyInstanceUID) for k, v in studies.items()}
    rows = labels(out)
    assert list(rows[0]) == list(COLUMNS) and COLUMNS[: len(LABEL_COLUMNS)] == LABEL_COLUMNS
    got = {
        (r["StudyInstanceUID"], r["finding"]): (
            r["label"],
            r["model"],
            r["model_version"],
            r["ai_score"],
            r["ai_flagged"],
            r["judgements"],
            r["missed_slice"] != "",
            r["mask"],
        )
        for r in rows
    }
    assert got == {
        (uid["S1"], ICH): ("1", "blast-ct-v1", "1", "0.92", "1", "2", False, ""),
        (uid["S2"], SHIFT): ("0", "shift-v1", "2", "0.1", "0", "2", False, ""),
        (uid["S3"], ICH): ("1", "blast-ct-v1", "1", "0.2", "0", "3", True, ""),
    }  # S2's haemorrhage: one reader each way, left out
    assert (report.rows, report.positives, report.negatives, report.ties) == (3, 2, 1, 1)
    assert (report.studies, report.patients, report.missing) == (3, 2, ())
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    assert (meta["format"], meta["source"], meta["name"]) == (FORMAT, "feedback", "export")
    assert meta["counts"]["ties"] == 1 and meta["task"] == "findings"
    assert meta["deidentification"]["library"]["name"] == "dicognito"
    assert "Basic Application Confidentiality Profile" in meta["deidentification"]["method"]


def test_filters_by_finding_model_and_time(site: Site, tmp_path: Path) -> None:
    only_shift = export_feedback(site.db, tmp_path / "a", finding=SHIFT, salt=SALT)
    assert (only_shift.rows, only_shift.studies, only_shift.ties) == (1, 1, 0)
    meta = json.loads((tmp_path / "a" / META_FILE).read_text(encoding="utf-8"))
    assert meta["task"] == SHIFT
    by_model = export_feedback(site.db, tmp_path / "b", model="blast-ct-v1", salt=SALT)
    assert {r["finding"] for r in labels(tmp_path / "b")} == {ICH}
    assert (by_model.rows, by_model.ties) == (2, 1)
    # since: S3's judgements only (minutes 20-22); all its readers still count
    later = export_feedback(site.db, tmp_path / "c", since=T0 + timedelta(minutes=15), salt=SALT)
    (row,) = labels(tmp_path / "c")
    assert (later.rows, row["judgements"], row["label"]) == (1, "3", "1")


def test_export_into_a_used_folder_is_refused(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()  # an empty folder is fine
    first = export_feedback(site.settings, out, salt=SALT)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ExportError) as refused:
        export_feedback(site.settings, out, salt=SALT)
    assert "not empty" in str(refused.value) and "\n" not in str(refused.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not (tmp_path / "export.partial").exists()
    assert first.instances == 6


def test_missing_and_burned_in_files_are_reported_not_fatal(site: Site, tmp_path: Path) -> None:
    s1, _, s3 = site.studies.values()
    with site.db.session() as s:
        paths = {u: p for u, p in s.execute(select(InstanceRow.SOPInstanceUID, InstanceRow.path))}
        gone_sha = s.scalar(
            select(InstanceRow.sha256).where(InstanceRow.SOPInstanceUID == s1.sops[1])
        )
    Path(paths[s1.sops[1]]).unlink()
    burned = pydicom.dcmread(paths[s3.sops[0]])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(paths[s3.sops[0]], enforce_file_format=True)
    report = export_feedback(site.db, tmp_path / "export", salt=SALT)
    assert report.missing == (gone_sha,) and s1.sops[1] not in report.missing
    assert (report.burned_in, report.instances, report.studies) == (1, 4, 3)
    assert all(
        "BurnedInAnnotation" not in ds or ds.BurnedInAnnotation != "YES"
        for ds in exported(tmp_path / "export")
    )


def test_no_database_is_one_line_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "none", database_url=None, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ExportError, match="no triage database") as refused:
        export_feedback(settings, tmp_path / "export")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "none" / "triage.db").exists() and not (tmp_path / "export").exists()
