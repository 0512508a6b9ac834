"""DICOMweb read side against a running ``triage serve``, driven by a real DICOMweb client
(the ``dicomweb-client`` package, as OHIF-like viewers and scripts use it): QIDO-RS finds
the study, its series and instances; WADO-RS returns the instances as stored, their
metadata, decoded frames (from a JPEG 2000 file too) and a rendered PNG."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from requests.exceptions import HTTPError

from tests.conftest import pydicom_file, running_server
from tests.serve.test_access import BOUNDARY, MULTIPART
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e]

CT = "CT_small.dcm"
MR_J2K = "emri_small_jpeg_2k_lossless.dcm"  # 10 frames, JPEG 2000 lossless


def stow_body(paths: list[Path]) -> bytes:
    parts = b""
    for path in paths:
        parts += (
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
        )
    return parts + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("triage-dicomweb"), {}) as srv:
        paths = [pydicom_file(CT), pydicom_file(MR_J2K)]
        with srv.client() as http:
            answer = http.post(
                "/dicomweb/studies", content=stow_body(paths), headers={"Content-Type": MULTIPART}
            )
        assert answer.status_code == 200, answer.text
        yield srv


@pytest.fixture()
def client(server: ServerProcess) -> DICOMwebClient:
    return DICOMwebClient(url=f"{server.http_url}/dicomweb", headers=server.headers)


def value(doc: dict, keyword: str):  # type: ignore[no-untyped-def,type-arg]
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    return doc.get(tag, {}).get("Value", [None])[0]


def test_qido_finds_the_study_by_patient_and_by_wildcard(client: DICOMwebClient) -> None:
    ct = pydicom.dcmread(pydicom_file(CT))
    found = client.search_for_studies(search_filters={"PatientID": ct.PatientID})
    assert [value(d, "StudyInstanceUID") for d in found] == [ct.StudyInstanceUID]
    assert value(found[0], "ModalitiesInStudy") == "CT"
    assert value(found[0], "NumberOfStudyRelatedInstances") == 1
    name = str(ct.PatientName)
    wild = client.search_for_studies(search_filters={"PatientName": name[:4].lower() + "*"})
    assert ct.StudyInstanceUID in [value(d, "StudyInstanceUID") for d in wild]
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    everything = {value(d, "StudyInstanceUID") for d in client.search_for_studies()}
    mr = pydicom.dcmread(pydicom_file(MR_J2K))
    assert {ct.StudyInstanceUID, mr.StudyInstanceUID} <= everything


def test_qido_series_and_instances(client: DICOMwebClient) -> None:
    mr = pydicom.dcmread(pydicom_file(MR_J2K))
    series = client.search_for_series(study_instance_uid=mr.StudyInstanceUID)
    assert [value(d, "SeriesInstanceUID") for d in series] == [mr.SeriesInstanceUID]
    assert value(series[0], "Modality") == "MR"
    instances = client.search_for_instances(
        study_instance_uid=mr.StudyInstanceUID, series_instance_uid=mr.SeriesInstanceUID
    )
    assert [value(d, "SOPInstanceUID") for d in instances] == [mr.SOPInstanceUID]
    assert value(instances[0], "NumberOfFrames") == 10


def test_wado_returns_the_instance_as_stored(client: DICOMwebClient) -> None:
    ct = pydicom.dcmread(pydicom_file(CT))
    got = client.retrieve_instance(
        study_instance_uid=ct.StudyInstanceUID,
        series_instance_uid=ct.SeriesInstanceUID,
        sop_instance_uid=ct.SOPInstanceUID,
    )
    assert got.SOPInstanceUID == ct.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ct.pixel_array)
    study = client.retrieve_study(study_instance_uid=ct.StudyInstanceUID)
    assert [d.SOPInstanceUID for d in study] == [ct.SOPInstanceUID]


def test_wado_metadata_leaves_pixel_data_out(client: DICOMwebClient) -> None:
    mr = pydicom.dcmread(pydicom_file(MR_J2K))
    meta = client.retrieve_series_metadata(
        study_instance_uid=mr.StudyInstanceUID, series_instance_uid=mr.SeriesInstanceUID
    )
    assert len(meta) == 1
    assert value(meta[0], "SOPInstanceUID") == mr.SOPInstanceUID
    assert "7FE00010" not in meta[0]
    ds = pydicom.Dataset.from_json(meta[0])
    assert ds.Rows == mr.Rows and ds.Columns == mr.Columns


def test_wado_frames_are_decoded(client: DICOMwebClient) -> None:
    mr = pydicom.dcmread(pydicom_file(MR_J2K))
    frames = client.retrieve_instance_frames(
        study_instance_uid=mr.StudyInstanceUID,
        series_instance_uid=mr.SeriesInstanceUID,
        sop_instance_uid=mr.SOPInstanceUID,
        frame_numbers=[2, 7],
        media_types=("application/octet-stream",),
    )
    expected = mr.pixel_array
    for got, n in zip(frames, (2, 7), strict=True):
        array = np.frombuffer(got, dtype=expected.dtype.newbyteorder("<")).reshape(
            mr.Rows, mr.Columns
        )
        assert np.array_equal(array, expected[n - 1])


def test_wado_rendered_is_a_png(client: DICOMwebClient) -> None:
    ct = pydicom.dcmread(pydicom_file(CT))
    png = client.retrieve_instance_rendered(
        study_instance_uid=ct.StudyInstanceUID,
        series_instance_uid=ct.SeriesInstanceUID,
        sop_instance_uid=ct.SOPInstanceUID,
        media_types=("image/png",),
    )
    image = Image.open(io.BytesIO(png))
    assert image.size == (ct.Columns, ct.Rows)
    assert len(set(image.getdata())) > 10  # an image, not a blank


def test_without_a_token_nothing_is_answered(server: ServerProcess) -> None:
    anonymous = DICOMwebClient(url=f"{server.http_url}/dicomweb")
    with pytest.raises(HTTPError) as refused:
        anonymous.search_for_studies()
    assert refused.value.response.status_code == 401


def test_searches_and_retrievals_are_audited_without_patient_data(
    server: ServerProcess, client: DICOMwebClient
) -> None:
    ct = pydicom.dcmread(pydicom_file(CT))
    client.search_for_studies(search_filters={"PatientName": str(ct.PatientName)})
    with server.client() as http:
        records = http.get("/api/audit", params={"action": "query", "limit": 1}).json()["records"]
    assert records[0]["detail"] == {"level": "study", "keys": ["PatientName"]}
    assert str(ct.PatientName) not in str(records)


def test_a_viewer_finds_and_retrieves_the_ai_segmentation(
    server: ServerProcess, client: DICOMwebClient, tmp_path: Path
) -> None:
    """A study analysed as the worker leaves it (its SEG and SR made): the client finds the
    SEG series by QIDO-RS and retrieves it and its metadata by WADO-RS."""
    import highdicom as hd

    from tests.dicomout.stored import store_cube_study
    from triage.db import Database
    from triage.dicomout.results import make_results

    db = Database(server.database_url)
    try:
        study = store_cube_study(db, tmp_path / "store")
        make_results(
            db,
            study.StudyInstanceUID,
            findings=[study.finding],
            overlays=study.overlays,
            results_dir=tmp_path / "results",
            destinations=[],
        )
    finally:
        db.dispose()
    found = client.search_for_studies(search_filters={"StudyInstanceUID": study.StudyInstanceUID})
    assert value(found[0], "ModalitiesInStudy") is not None
    segs = client.search_for_series(
        study_instance_uid=study.StudyInstanceUID, search_filters={"Modality": "SEG"}
    )
    (seg_series,) = [value(d, "SeriesInstanceUID") for d in segs]
    (ds,) = client.retrieve_series(
        study_instance_uid=study.StudyInstanceUID, series_instance_uid=seg_series
    )
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert seg.SeriesInstanceUID == seg_series
    assert seg.number_of_segments >= 1
    (meta,) = client.retrieve_series_metadata(
        study_instance_uid=study.StudyInstanceUID, series_instance_uid=seg_series
    )
    assert value(meta, "Modality") == "SEG"
