"""Concurrent large STOW-RS uploads and a Deflate bomb against a running ``triage serve``:
the bodies are spooled to disk and the parts ingested within the memory budget, so the
server's peak resident memory (VmHWM, from /proc) stays under a ceiling that holding the
uploads in memory would pass; every instance is stored and the bomb is refused with its
reason and kept in quarantine."""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import running_server
from tests.e2e.test_malformed_e2e import peak_growth, quarantined, reset_peak
from tests.ingest.test_malformed import BOMBS
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e]

MiB = 1024**2
UPLOADS = 4
FRAMES = 192  # 512 x 512 x 16 bits: 96 MiB of pixel data per instance
PIXEL_BYTES = 512 * 512 * 2 * FRAMES
BUDGET = 64 * MiB  # TRIAGE_STOW_MEMORY_BYTES: below one instance, so parts go one at a time
# Held in memory, the four bodies alone would be 384 MiB, and each part is copied again while
# it is checked (measured before the bodies were spooled: 1,166 MiB). Spooled and ingested
# one at a time, the server needs about two copies of one instance (measured: 234 MiB).
CEILING = 7 * PIXEL_BYTES // 2
BOUNDARY = "stow-memory-e2e"
CHUNK = b"\0" * MiB
CONTENT_TYPE = f"multipart/related; type=application/dicom; boundary={BOUNDARY}"


def instance_head() -> tuple[bytes, str]:
    """A multi-frame secondary capture without its pixel data (appended by the sender)."""
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "MEM"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = FRAMES
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, PIXEL_BYTES)
    return buf.getvalue() + pixel_header, str(ds.SOPInstanceUID)


def body(head: bytes, extra: bytes | None) -> Iterator[bytes]:
    """The request body, generated as it is sent (the sender holds none of it)."""
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
    for _ in range(PIXEL_BYTES // MiB):
        yield CHUNK
    if extra is not None:
        yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + extra
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("stow-memory")
    env = {
        "TRIAGE_SERIES_QUIET_SECONDS": "3600",
        "TRIAGE_STOW_MEMORY_BYTES": str(BUDGET),
        "TRIAGE_MAX_UPLOAD_BYTES": str(2 * PIXEL_BYTES),
        "TRIAGE_MAX_INFLATED_BYTES": str(32 * MiB),
        "TRIAGE_MAX_ELEMENT_BYTES": str(16 * MiB),
        "TRIAGE_MIN_FREE_BYTES": "0",
    }
    with running_server(root / "data", env) as srv:
        yield srv


def test_concurrent_large_uploads_and_a_bomb_stay_under_the_memory_ceiling(
    server: ServerProcess,
) -> None:
    bomb, phrase = BOMBS["pixel-data-bomb"][0](), BOMBS["pixel-data-bomb"][1]
    heads = [instance_head() for _ in range(UPLOADS)]
    responses: list[httpx.Response | BaseException] = [RuntimeError("not sent")] * UPLOADS
    start = reset_peak(server)

    def upload(i: int) -> None:
        try:
            responses[i] = httpx.post(
                f"{server.http_url}/dicomweb/studies",
                content=body(heads[i][0], bomb if i == 0 else None),
                headers={**server.headers, "Content-Type": CONTENT_TYPE},
                timeout=600,
            )
        except BaseException as exc:  # reported by the assertions below
            responses[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    growth = peak_growth(server, start)

    for i, response in enumerate(responses):
        assert isinstance(response, httpx.Response), response
        assert response.status_code == (202 if i == 0 else 200), response.text
    assert growth < CEILING, f"peak grew {growth // MiB} MiB (ceiling {CEILING // MiB} MiB)"
    stored = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers).json()["items"]
    assert len(stored) == UPLOADS
    (kept,) = quarantined(server)
    assert phrase in str(kept["reason"]) and kept["status"] == "0xC000"
    incoming = Path(server.data_dir) / "incoming"
    assert not list(incoming.glob("*.part"))
    assert "Traceback" not in server.log()
