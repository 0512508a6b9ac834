"""Every real file of pydicom's test files and the pydicom-data package, through every entry
point: the ingest path itself, ``triage import``, STOW-RS and C-STORE with DCMTK storescu.

The oracle, per file:

* stored (success or warning): the stored file lies under the store, parses, and its pixels
  decode exactly as the source's do (JPEG 2000, JPEG-LS, RLE, JPEG lossless, big endian,
  deflated, enhanced multi-frame CT, ...). CT, CR, DX and secondary capture images must
  decode, except the two corpus files that no installed decoder reads from the source either.
* rejected: a specific reason (never an internal error), the bytes kept in quarantine.
* nothing crashes, nothing is written outside the data directory, no traceback in the log.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import run_cli, running_server
from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow
from triage.demo.run import STORESCU_PROPOSE
from triage.ingest.store import DuplicatePolicy, Ingestor, StoreStatus
from triage.serve.launcher import ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test files

# CT, enhanced CT, CR, DX (presentation and processing) and the secondary capture family.
IN_SCOPE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
# In scope but undecodable from the source with pylibjpeg/openjpeg/pillow (a misplaced JPEG
# marker; a J2K stream cut by an embedded delimiter): stored, and analysis reports them.
UNDECODABLE_SOURCES = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}
SPECIFIC_REASONS = (
    "missing required attribute",
    "contains characters other than digits and dots",
    "characters long (at most 64 allowed)",
    "truncated",
    "image too large",
    "data set does not match",
    "not DICOM",
    "unreadable DICOM",
    "a DICOMDIR",
    "the 128-byte preamble",
    "Rows, Columns, NumberOfFrames",
    "a different instance under a stored SOPInstanceUID",
)


def corpus_files() -> list[Path]:
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    files = sorted({p.resolve() for r in roots for p in r.rglob("*") if p.is_file()})
    return [p for p in files if p.stat().st_size < 16 * 1024**2]


@cache
def header(path: Path) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None


def sop_class(path: Path) -> str:
    ds = header(path)
    return str(ds.get("SOPClassUID", "")) if ds is not None else ""


def decode(source: Path | bytes) -> np.ndarray | None:
    """The decoded pixels, or None when no installed decoder reads them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            ds = pydicom.dcmread(fp, force=True)
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                return None
            return np.asarray(ds.pixel_array)
    except Exception:
        return None


def transfer_syntax(path: Path) -> str:
    ds = header(path)
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def has_pixels(path: Path) -> bool:
    ds = header(path)
    return ds is not None and "Image Storage" in pydicom.uid.UID(sop_class(path)).name


def assert_specific(reason: str) -> None:
    assert reason.startswith(SPECIFIC_REASONS) or any(r in reason for r in SPECIFIC_REASONS), (
        f"not a specific reason: {reason}"
    )


def new_ingestor(root: Path, policy: DuplicatePolicy) -> Ingestor:
    (root / "incoming").mkdir(parents=True)
    db = Database(f"sqlite:///{root / 'triage.db'}")
    db.migrate()
    return Ingestor(
        db, root / "dicom", root / "incoming", root / "quarantine", **{"duplicate_policy": policy}
    )


def test_every_corpus_file_through_the_ingest_path(tmp_path: Path) -> None:
    """Each file in turn (policy replace, so that every different variant of an instance is
    the stored copy once; another encoding of the same data set is a resend): stored files
    decode like their source, rejections are specific and kept."""
    files = corpus_files()
    assert len(files) > 150
    ingestor = new_ingestor(tmp_path, DuplicatePolicy.REPLACE)
    stored_in_scope = 0
    for path in files:
        data = path.read_bytes()
        outcome = ingestor.ingest(data, source="corpus")
        in_scope = sop_class(path) in IN_SCOPE_CLASSES
        if not outcome.ok:
            assert_specific(outcome.reason)
            assert outcome.status != StoreStatus.out_of_resources, (path.name, outcome.reason)
            with ingestor.db.session() as s:
                kept = s.scalars(
                    select(QuarantineRow.path).where(
                        QuarantineRow.sha256 == hashlib.sha256(data).hexdigest()
                    )
                ).first()
            assert kept is not None and Path(kept).read_bytes() == data, path.name
            continue
        with ingestor.db.session() as s:
            stored_path = Path(
                s.scalars(
                    select(InstanceRow.path).where(
                        InstanceRow.SOPInstanceUID == outcome.SOPInstanceUID
                    )
                ).one()
            )
        assert stored_path.resolve().is_relative_to((tmp_path / "dicom").resolve())
        if outcome.status == StoreStatus.success and not outcome.duplicate:
            assert stored_path.read_bytes() == data, path.name  # stored exactly as received
        elif outcome.duplicate:
            # Another encoding of a stored data set (liver_expb.dcm after liver.dcm): the
            # same instance, so the first copy stays; it must decode to the same pixels.
            assert "same data set" in outcome.reason or stored_path.read_bytes() == data
        if has_pixels(path):
            source_pixels, stored_pixels = decode(data), decode(stored_path)
            if source_pixels is None and outcome.status == StoreStatus.coercion_of_elements:
                source_pixels = stored_pixels  # the file meta we added makes it decodable
            if source_pixels is None:
                assert stored_pixels is None
                if in_scope:
                    assert path.name in UNDECODABLE_SOURCES, path.name
                continue
            assert stored_pixels is not None, path.name
            np.testing.assert_array_equal(stored_pixels, source_pixels, err_msg=path.name)
            stored_in_scope += in_scope
    assert stored_in_scope >= 70
    files_under_data = {p.resolve() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.is_relative_to(tmp_path.resolve()) for p in files_under_data)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the corpus with unique names (some names repeat across the two packages)."""
    d = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(corpus_files()):
        shutil.copyfile(path, d / f"{i:04d}_{path.name}")
    return d


def check_store(data_dir: Path, corpus: Path) -> None:
    """What a run through an entry point left behind is consistent: every indexed instance
    is a file under the store with the recorded hash, and decodes when its source does."""
    db = Database(f"sqlite:///{(data_dir / 'triage.db').resolve()}")
    sources: dict[str, list[Path]] = {}
    for path in sorted(corpus.iterdir()):
        ds = header(path)
        if ds is not None and ds.get("SOPInstanceUID"):
            sources.setdefault(str(ds.SOPInstanceUID), []).append(path)
    try:
        with db.session() as s:
            rows = s.execute(
                select(InstanceRow.SOPInstanceUID, InstanceRow.path, InstanceRow.sha256)
            ).all()
            quarantined = s.scalars(select(QuarantineRow.reason)).all()
    finally:
        db.dispose()
    assert rows, "nothing was stored"
    for reason in quarantined:
        assert_specific(reason)
    for uid, stored, digest in rows:
        path = Path(stored)
        assert path.resolve().is_relative_to((data_dir / "dicom").resolve())
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        # Some corpus files are one instance in several encodings (the first to arrive is
        # kept): the source is the file with the stored bytes (import, STOW-RS store files
        # as received) or else (C-STORE rebuilds the file meta) those in the same encoding.
        stored_bytes = path.read_bytes()
        candidates = [c for c in sources.get(uid, []) if c.read_bytes() == stored_bytes] or [
            c for c in sources.get(uid, []) if transfer_syntax(c) == transfer_syntax(path)
        ]
        if candidates and has_pixels(candidates[0]):
            if all(decode(c) is not None for c in candidates):
                assert decode(path) is not None, candidates[0].name
    in_scope_uids = {
        uid
        for uid, paths in sources.items()
        if any(sop_class(p) in IN_SCOPE_CLASSES and decode(p) is not None for p in paths)
    }
    assert len({r[0] for r in rows} & in_scope_uids) >= 40


def test_triage_import_of_the_corpus(tmp_path: Path, corpus_dir: Path) -> None:
    result = run_cli(["import", str(corpus_dir)], tmp_path / "data", timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out  # some files are rejected, none crash the import
    assert "Traceback" not in out
    assert f"{len(list(corpus_dir.iterdir()))} file(s):" in out.replace("\n", "")
    check_store(tmp_path / "data", corpus_dir)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data", {"TRIAGE_SERIES_QUIET_SECONDS": "3600"}) as srv:
        yield srv


@pytest.mark.e2e
def test_stow_rs_of_the_corpus(server: ServerProcess, corpus_dir: Path) -> None:
    files = sorted(corpus_dir.iterdir())
    referenced = failed = 0
    for start in range(0, len(files), 25):
        boundary = "corpus-boundary-7d1f"
        body = (
            b"".join(
                b"--"
                + boundary.encode()
                + b"\r\nContent-Type: application/dicom\r\n\r\n"
                + f.read_bytes()
                + b"\r\n"
                for f in files[start : start + 25]
            )
            + f"--{boundary}--\r\n".encode()
        )
        response = httpx.post(
            f"{server.http_url}/dicomweb/studies",
            content=body,
            headers={
                **server.headers,
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
            timeout=120,
        )
        assert response.status_code in (200, 202, 409), response.text
        doc = json.loads(response.text)
        referenced += len(doc.get("00081199", {}).get("Value", []))
        failed += len(doc.get("00081198", {}).get("Value", []))
    assert referenced + failed == len(files)
    assert httpx.get(f"{server.http_url}/api/health").status_code == 200
    assert "Traceback" not in server.log()
    check_store(server.data_dir, corpus_dir)


@pytest.mark.e2e
def test_c_store_of_the_corpus_with_storescu(
    server: ServerProcess, corpus_dir: Path, storescu: str
) -> None:
    """One storescu per file, proposing the file's own SOP class and transfer syntax."""
    sent = refused_by_client = 0
    for path in sorted(corpus_dir.iterdir()):
        ds = header(path)
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds is not None else ""
        cmd = [
            storescu,
            "-R",
            STORESCU_PROPOSE.get(ts, "-xe"),
            "-aet",
            "CORPUS",
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dicom_port),
            str(path),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            sent += 1
        else:
            refused_by_client += 1
    assert sent > 150
    assert httpx.get(f"{server.http_url}/api/health").status_code == 200
    assert "Traceback" not in server.log()
    check_store(server.data_dir, corpus_dir)
