"""Datasets for training: the generic format read and validated, series chosen as serving
chooses them, public data sets converted (RSNA 2019, CQ500, SIIM-ACR), patient-grouped splits,
and MONAI samples through the serving preprocessing (cached once, augmented reproducibly).

Every DICOM file is synthetic and built here (or pydicom-data's CR chest through the demo's
writer); the CQ500 test on the real study is marked ``realdata``."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from training.data.adapters import (
    convert_cq500,
    convert_rsna_ich,
    convert_siim_pneumothorax,
    rle_decode,
    rle_encode,
)
from training.data.dataset import (
    DatasetError,
    LabelRow,
    NoSeriesError,
    StudyRecord,
    choose_series,
    index_dicom,
    read_dataset,
    write_labels,
    write_meta,
)
from training.data.samples import (
    HAS_MASK,
    HEAD,
    IMAGE,
    LABEL,
    LABEL_MASK,
    STUDY,
    TARGET,
    AugmentedDataset,
    chest_dataset,
    haemorrhage_augmentation,
    haemorrhage_dataset,
    seed_for,
    warm_cache,
)
from training.data.splits import assign_splits, fingerprint, freeze_splits, frozen_test_set
from training.format import FORMAT, HAEMORRHAGE, LABEL_COLUMNS, PNEUMOTHORAX
from triage.analysis.analyzer import route_series
from triage.models.catalog import builtin_spec
from triage.preprocess.ct import HeadCT, prepare_head_ct

BLAST = builtin_spec("blast-ct-v1")
CHEST = builtin_spec("xrv-densenet121-res224-all")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------
# Synthetic DICOM


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    z: float,
    study: str,
    series: str,
    patient: str = "P1",
    origin_xy: tuple[float, float] = (0.0, 0.0),
    pixel_mm: float = 1.0,
    thickness: float = 2.0,
    kernel: str = "STANDARD",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    instance: int = 1,
) -> Path:
    """One uncompressed axial CT slice of a head CT; ``hu`` float (rows, columns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.ConvolutionKernel = kernel
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [origin_xy[0], origin_xy[1], float(z)]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.PixelData = np.rint(hu + 1024).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_flat_series(
    folder: Path,
    *,
    study: str,
    series: str | None = None,
    patient: str = "P1",
    n: int = 50,
    thickness: float = 2.0,
    size: int = 8,
    **kwargs: object,
) -> tuple[str, list[Path]]:
    """A series of ``n`` tiny slices ``thickness`` apart (headers are what routing reads)."""
    series = series or generate_uid()
    paths = [
        write_ct_slice(
            folder / f"{series[-8:]}_{k:03d}.dcm",
            np.full((size, size), 30.0),
            z=k * thickness,
            study=study,
            series=series,
            patient=patient,
            thickness=thickness,
            instance=k + 1,
            **kwargs,  # type: ignore[arg-type]
        )
        for k in range(n)
    ]
    return series, paths


# A head: a 30 mm ball of brain (30 HU) with a 12 mm cube of blood (70 HU), in air.
HEAD_CENTRE = np.array([38.0, 38.0, 46.0])  # LPS mm
CUBE_CENTRE = np.array([45.3, 33.7, 49.1])
CUBE_HALF = 6.0
BLEED_HU, BRAIN_HU = 70.0, 30.0


def write_head_series(
    folder: Path, *, study: str, patient: str = "P1", n: int = 47, size: int = 64
) -> tuple[str, list[Path], sitk.Image]:
    """A head CT series (2 mm slices, 1.2 mm pixels, 92 mm coverage) and its bleed mask on
    the series' grid (value 1 = IPH, LPS geometry)."""
    series = generate_uid()
    pixel, thickness = 1.2, 2.0
    xs = np.arange(size) * pixel
    x, y = np.meshgrid(xs, xs)  # (rows = y, columns = x)
    paths, masks = [], []
    for k in range(n):
        z = k * thickness
        ball = (x - HEAD_CENTRE[0]) ** 2 + (y - HEAD_CENTRE[1]) ** 2 + (z - HEAD_CENTRE[2]) ** 2
        cube = (
            (np.abs(x - CUBE_CENTRE[0]) < CUBE_HALF)
            & (np.abs(y - CUBE_CENTRE[1]) < CUBE_HALF)
            & (abs(z - CUBE_CENTRE[2]) < CUBE_HALF)
        )
        hu = np.where(ball < 30.0**2, BRAIN_HU, -1000.0)
        hu[cube] = BLEED_HU
        masks.append(cube.astype(np.uint8))
        paths.append(
            write_ct_slice(
                folder / f"IM{k:04d}.dcm",
                hu,
                z=z,
                study=study,
                series=series,
                patient=patient,
                pixel_mm=pixel,
                thickness=thickness,
                instance=k + 1,
            )
        )
    mask = sitk.GetImageFromArray(np.stack(masks))
    mask.SetSpacing((pixel, pixel, thickness))
    mask.SetOrigin((0.0, 0.0, 0.0))
    return series, paths, mask


def write_radiograph(
    path: Path,
    *,
    study: str,
    patient: str = "P1",
    rows: int = 32,
    columns: int = 24,
    spacing: tuple[float, float] = (0.5, 0.25),
) -> pydicom.Dataset:
    """A small DX chest PA (uint16 ramp with a window)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = list(spacing)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ramp = np.arange(rows * columns).reshape(rows, columns) * 4000 // (rows * columns)
    ds.PixelData = ramp.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_dataset(root: Path, rows: Sequence[LabelRow], task: str = HAEMORRHAGE) -> Path:
    write_meta(root, name="test", task=task, source="tests")
    write_labels(root, rows)
    (root / "dicom").mkdir(exist_ok=True)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------
# The generic format


@pytest.fixture()
def two_studies(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A dataset: study A (patient PA, two series, a mask, two findings), study B (PB)."""
    root = tmp_path / "ds"
    a, b = generate_uid(), generate_uid()
    sa1, _ = write_flat_series(root / "dicom" / "a1", study=a, patient="PA", n=3)
    sa2, _ = write_flat_series(root / "dicom" / "a2", study=a, patient="PA", n=2)
    sb, _ = write_flat_series(root / "dicom" / "b", study=b, patient="PB-header", n=2)
    (root / "dicom" / "README.txt").write_text("not DICOM")
    (root / "masks").mkdir(parents=True)
    (root / "masks" / "a.nii.gz").write_bytes(b"")
    rows = [
        LabelRow(a, "PA", HAEMORRHAGE, 1, mask="masks/a.nii.gz", subtype="subdural"),
        LabelRow(a, "PA", "midline_shift", 0, volume_ml=12.5, split="test"),
        LabelRow(b, "", HAEMORRHAGE, 0, SeriesInstanceUID=sb),
    ]
    write_dataset(root, rows)
    return root, {"a": a, "b": b, "sa1": sa1, "sa2": sa2, "sb": sb}


def test_read_dataset_merges_rows_and_indexes_series(
    two_studies: tuple[Path, dict[str, str]],
) -> None:
    root, uid = two_studies
    dataset = read_dataset(root)
    assert dataset.name == "test" and dataset.meta["format"] == FORMAT
    a, b = dataset.studies
    assert (a.study_uid, b.study_uid) == (uid["a"], uid["b"])
    assert a.labels == {HAEMORRHAGE: 1, "midline_shift": 0}
    assert a.patient_id == "PA" and a.split == "test" and a.volume_ml == 12.5
    assert a.mask == (root / "masks" / "a.nii.gz").resolve() and a.subtype == "subdural"
    assert {s.SeriesInstanceUID: len(s.paths) for s in a.series} == {uid["sa1"]: 3, uid["sa2"]: 2}
    assert a.series_uid is None and a.lines == (2, 3)
    # A blank PatientID falls back to the header's; the named series is kept.
    assert b.patient_id == "PB-header" and b.series_uid == uid["sb"] and b.split is None
    assert b.labels == {HAEMORRHAGE: 0} and b.mask is None and b.volume_ml is None


def _rewrite_cell(root: Path, line: int, column: str, value: str) -> None:
    rows = read_csv(root / "labels.csv")
    rows[line - 2][column] = value
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    ("line", "column", "value", "message"),
    [
        (2, "label", "yes", r"line 2, column 'label': must be 0 or 1"),
        (3, "split", "training", r"line 3, column 'split': must be one of"),
        (4, "volume_ml", "-3", r"line 4, column 'volume_ml': must be a number >= 0"),
        (2, "mask", "masks/none.nii.gz", r"line 2, column 'mask': names a file that does not"),
        (2, "mask", "/etc/passwd.nii.gz", r"line 2, column 'mask': must be a path relative"),
        (2, "mask", "../outside.nii.gz", r"line 2, column 'mask': must lie inside"),
        (2, "mask", "masks/a.png", r"line 2, column 'mask': must end with one of"),
        (4, "StudyInstanceUID", "", r"line 4, column 'StudyInstanceUID': must not be blank"),
        (3, "finding", HAEMORRHAGE, r"line 3, column 'finding': the study has this finding"),
        (3, "PatientID", "PX", r"lines 2, 3, column 'PatientID': the rows of one study disagree"),
        (4, "SeriesInstanceUID", "1.2.3", r"line 4, column 'SeriesInstanceUID': no DICOM file"),
        (4, "StudyInstanceUID", "1.2.3", r"line 4, column 'StudyInstanceUID': no DICOM file"),
    ],
)
def test_invalid_labels_name_file_line_and_column(
    two_studies: tuple[Path, dict[str, str]], line: int, column: str, value: str, message: str
) -> None:
    root, uid = two_studies
    (root.parent / "outside.nii.gz").write_bytes(b"")
    _rewrite_cell(root, line, column, value)
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset(root)
    text = str(info.value)
    assert text.startswith(f"{root / 'labels.csv'}: ")
    assert not any(u in text for u in uid.values()) and "PA" not in text.split(":", 1)[1]


def test_a_study_without_files_can_be_skipped(two_studies: tuple[Path, dict[str, str]]) -> None:
    root, uid = two_studies
    _rewrite_cell(root, 4, "StudyInstanceUID", generate_uid())
    dataset = read_dataset(root, on_missing="skip")
    assert [r.study_uid for r in dataset.studies] == [uid["a"]]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["StudyInstanceUID", "PatientID", "finding", "label"], r"line 1: missing column"),
        ([*LABEL_COLUMNS, "notes"], r"line 1: unknown column\(s\) notes"),
    ],
)
def test_labels_columns_are_checked(tmp_path: Path, header: list[str], message: str) -> None:
    write_dataset(tmp_path, [])
    (tmp_path / "labels.csv").write_text(",".join(header) + "\n")
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"dataset.json: missing"),
        ("{", r"dataset.json: line 1: not valid JSON"),
        ('{"format": "other/1", "name": "x", "task": "t"}', r"field 'format' must be"),
        (json.dumps({"format": FORMAT, "task": "t"}), r"field 'name' must be"),
    ],
)
def test_dataset_json_is_checked(tmp_path: Path, content: str | None, message: str) -> None:
    write_dataset(tmp_path, [])
    if content is None:
        (tmp_path / "dataset.json").unlink()
    else:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


def test_index_cache_reads_each_header_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data.dataset as module

    study = generate_uid()
    write_flat_series(tmp_path / "dicom", study=study, n=4)
    calls: list[Path] = []
    real = module.read_dicom_ids

    def counting(path: Path) -> module.DicomIds | None:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(module, "read_dicom_ids", counting)
    cache = tmp_path / "index.json"
    first = index_dicom(tmp_path / "dicom", cache=cache)
    assert len(calls) == 4
    second = index_dicom(tmp_path / "dicom", cache=cache)
    assert len(calls) == 4  # every header came from the cache
    assert first[study].series[0].paths == second[study].series[0].paths
    write_flat_series(tmp_path / "dicom" / "more", study=study, n=1)
    index_dicom(tmp_path / "dicom", cache=cache)
    assert len(calls) == 5  # only the new file


# --------------------------------------------------------------------------------------------
# The series the model reads


def test_choose_series_routes_as_serving(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    study = generate_uid()
    soft, _ = write_flat_series(root / "dicom" / "soft", study=study, thickness=2.0)
    bone, _ = write_flat_series(root / "dicom" / "bone", study=study, thickness=2.0, kernel="BONE")
    scout, _ = write_flat_series(
        root / "dicom" / "scout", study=study, n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    other = generate_uid()
    write_flat_series(root / "dicom" / "short", study=other, n=3)
    rows = [
        LabelRow(study, "P1", HAEMORRHAGE, 1),
        LabelRow(study, "P1", "bone_window_check", 0),
        LabelRow(other, "P2", HAEMORRHAGE, 0),
    ]
    write_dataset(root, rows)
    record, short = read_dataset(root).studies

    chosen = choose_series(record, BLAST)
    assert chosen.SeriesInstanceUID == soft

    class Registry:  # what the analyzer's router reads of its registry
        specs = (BLAST,)

    decision, _ = route_series(record.series, Registry())  # type: ignore[arg-type]
    assert decision.runs[0].series is not None
    assert decision.runs[0].series.SeriesInstanceUID == chosen.SeriesInstanceUID

    record.series_uid = bone  # a series named in labels.csv wins
    assert choose_series(record, BLAST).SeriesInstanceUID == bone
    with pytest.raises(NoSeriesError, match="blast-ct-v1: "):
        choose_series(short, BLAST)  # 3 slices: too short for the model
    record.series_uid = None
    with pytest.raises(NoSeriesError, match="reads CR/DX CHEST"):
        choose_series(record, CHEST)


# --------------------------------------------------------------------------------------------
# Splits


def _records(n_patients: int = 80, seed: int = 1) -> list[StudyRecord]:
    rng = random.Random(seed)
    records = []
    for p in range(n_patients):
        positive = int(p % 4 == 0)  # a quarter of the patients
        for s in range(rng.randint(1, 3)):
            records.append(
                StudyRecord(
                    study_uid=f"1.2.{p}.{s}",
                    patient_id=f"patient-{p}",
                    labels={HAEMORRHAGE: positive if s == 0 else 0},
                )
            )
    return records


def test_splits_group_by_patient_and_are_deterministic() -> None:
    records = _records()
    splits = assign_splits(records, seed=3)
    assert set(splits) == {r.study_uid for r in records}
    by_patient: dict[str, set[str]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, set()).add(splits[r.study_uid])
    assert all(len(s) == 1 for s in by_patient.values())  # never split a patient
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert assign_splits(shuffled, seed=3) == splits  # order does not matter
    assert assign_splits(records, seed=4) != splits  # the seed does

    patients = {p: s.pop() for p, s in by_patient.items()}
    counts = {k: sum(v == k for v in patients.values()) for k in ("train", "val", "test")}
    assert counts == {"train": 56, "val": 12, "test": 12}
    positives = {k: 0 for k in counts}
    for p, split in patients.items():
        positives[split] += int(p.split("-")[1]) % 4 == 0
    assert positives == {"train": 14, "val": 3, "test": 3}  # 20 positives: 70/15/15


def test_given_splits_are_kept_for_the_whole_patient() -> None:
    records = _records(20)
    first = next(r for r in records if r.patient_id == "patient-5")
    first.split = "test"
    splits = assign_splits(records, fractions=(1.0, 0.0, 0.0))
    assert {splits[r.study_uid] for r in records if r.patient_id == "patient-5"} == {"test"}
    assert {splits[r.study_uid] for r in records if r.patient_id != "patient-5"} == {"train"}
    clash = StudyRecord("1.9", "patient-5", {HAEMORRHAGE: 0}, split="val", lines=(9,))
    with pytest.raises(DatasetError, match="different splits"):
        assign_splits([*records, clash])
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(records, fractions=(0.5, 0.5))


def test_frozen_test_set_and_its_fingerprint(tmp_path: Path) -> None:
    records = _records(40)
    test = frozen_test_set(records, seed=2)
    assert test and all(isinstance(r, StudyRecord) for r in test)
    assert fingerprint(test) == fingerprint(list(reversed(test)))
    changed = [StudyRecord(r.study_uid, r.patient_id, dict(r.labels)) for r in test]
    changed[0].labels[HAEMORRHAGE] = 1 - changed[0].labels[HAEMORRHAGE]
    assert fingerprint(changed) != fingerprint(test)

    # Written into labels.csv, the test set stays when new patients arrive.
    root = tmp_path / "ds"
    write_dataset(
        root,
        [LabelRow(r.study_uid, r.patient_id, HAEMORRHAGE, r.labels[HAEMORRHAGE]) for r in records],
    )
    assert freeze_splits(root, assign_splits(records, seed=2)) == len(records)
    rows = read_csv(root / "labels.csv")
    frozen = [
        StudyRecord(
            r["StudyInstanceUID"], r["PatientID"], {HAEMORRHAGE: int(r["label"])}, split=r["split"]
        )
        for r in rows
    ]
    grown = frozen + _records(60)[len(records) :]  # patients 40..59, no split yet
    regrown = frozen_test_set(grown, seed=7)
    old = {r.study_uid for r in records}
    assert {r.study_uid for r in regrown if r.study_uid in old} == {r.study_uid for r in test}
    assert fingerprint([r for r in regrown if r.study_uid in old]) == fingerprint(test)


# --------------------------------------------------------------------------------------------
# SIIM run-length encoding


def siim_mask2rle(img: np.ndarray, width: int, height: int) -> str:
    """SIIM-ACR's published ``mask2rle`` (mask_functions.py), as given to the challenge: the
    image is indexed ``img[x][y]`` and walked column by column; values 255 inside."""
    rle: list[str] = []
    last, current, start, length = 0, 0, -1, 0
    for x in range(width):
        for y in range(height):
            colour = img[x][y]
            if colour != last:
                if colour == 255:
                    start, length = current, 1
                else:
                    rle += [str(start), str(length)]
                    start, length, current = -1, 0, 0
            elif start > -1:
                length += 1
            last = colour
            current += 1
    return " ".join(rle)


def test_rle_decode_is_column_major_and_relative() -> None:
    # 4 rows x 3 columns: pixel p is (p % 4, p // 4). Runs: pixels 5..7, then 2 after: 10..10.
    mask = rle_decode("5 3 2 1", (4, 3))
    expected = np.zeros((4, 3), dtype=bool)
    expected[1:4, 1] = True  # 5, 6, 7: rows 1-3 of column 1
    expected[2, 2] = True  # 10: row 2 of column 2
    np.testing.assert_array_equal(mask, expected)
    assert not rle_decode(" -1", (4, 3)).any() and not rle_decode("", (4, 3)).any()
    with pytest.raises(ValueError, match="pairs"):
        rle_decode("5 3 2", (4, 3))
    with pytest.raises(ValueError, match="past the end"):
        rle_decode("10 3", (4, 3))


def test_rle_matches_siims_published_encoder() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows, columns = rng.integers(3, 40, size=2)
        mask = rng.random((rows, columns)) < 0.3
        mask[-1, -1] = False  # SIIM's encoder drops a run that reaches the last pixel
        # The challenge's usage: mask2rle(image.T * 255, width, height), rle2mask(...).T
        reference = siim_mask2rle((mask.T * 255).astype(np.int32), columns, rows)
        assert rle_encode(mask) == (reference or "-1")
        np.testing.assert_array_equal(rle_decode(reference, (rows, columns)), mask)


# --------------------------------------------------------------------------------------------
# Adapters


def _is_relative_link(path: Path) -> bool:
    return path.is_symlink() and not os.path.isabs(os.readlink(path))


def test_rsna_adapter_aggregates_slices_into_studies(tmp_path: Path) -> None:
    src = tmp_path / "stage_2_train"
    a, b = generate_uid(), generate_uid()
    series_a = generate_uid()
    slices = {  # image id -> (study, series, patient, positive subtypes)
        "ID_0a1": (a, series_a, "ID_pa", ()),
        "ID_0a2": (a, series_a, "ID_pa", ("subdural",)),
        "ID_0a3": (a, series_a, "ID_pa", ("intraparenchymal", "subdural")),
        "ID_0b1": (b, generate_uid(), "ID_pb", ()),
    }
    for k, (image, (study, series, patient, _)) in enumerate(slices.items()):
        write_ct_slice(
            src / f"{image}.dcm",
            np.zeros((4, 4)),
            z=k,
            study=study,
            series=series,
            patient=patient,
        )
    lines = ["ID,Label"]
    for image, (*_, subtypes) in [*slices.items(), ("ID_0ff", (a, "", "", ("epidural",)))]:
        for name in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                     "subdural", "any"):  # fmt: skip
            value = int(name in subtypes or (name == "any" and bool(subtypes)))
            lines.append(f"{image}_{name},{value}")
    (tmp_path / "stage_2_train.csv").write_text("\n".join(lines) + "\n")

    out = tmp_path / "rsna"
    rows = convert_rsna_ich(tmp_path / "stage_2_train.csv", src, out)
    written = {r["StudyInstanceUID"]: r for r in read_csv(out / "labels.csv")}
    assert len(rows) == 2 and set(written) == {a, b}
    assert written[a] | {"StudyInstanceUID": ""} == {
        "StudyInstanceUID": "",
        "PatientID": "ID_pa",
        "SeriesInstanceUID": series_a,
        "finding": HAEMORRHAGE,
        "label": "1",
        "mask": "",
        "subtype": "intraparenchymal+subdural",  # the slice without a file adds nothing
        "volume_ml": "",
        "split": "",
    }
    assert (written[b]["label"], written[b]["subtype"]) == ("0", "")
    assert json.loads((out / "dataset.json").read_text())["task"] == HAEMORRHAGE
    linked = sorted((out / "dicom").iterdir())
    assert [p.name for p in linked] == [f"{i}.dcm" for i in slices]
    assert all(_is_relative_link(p) for p in linked)
    dataset = read_dataset(out)
    assert {r.study_uid: len(r.series[0].paths) for r in dataset.studies} == {a: 3, b: 1}

    with pytest.raises(DatasetError, match="exists already"):
        convert_rsna_ich(tmp_path / "stage_2_train.csv", src, out)
    convert_rsna_ich(tmp_path / "stage_2_train.csv", src, out, copy=True, overwrite=True)
    assert not any(p.is_symlink() for p in (out / "dicom").iterdir())

    (tmp_path / "bad.csv").write_text("ID,Label\nID_0a1_haemorrhage,1\n")
    with pytest.raises(DatasetError, match=r"bad.csv: line 2, column 'ID'"):
        convert_rsna_ich(tmp_path / "bad.csv", src, tmp_path / "bad")


CQ500_HEADER = ["name", "Category"] + [
    f"R{r}:{c}" for r in (1, 2, 3) for c in ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture")
]


def _cq500_row(name: str, reads: dict[int, set[str]]) -> list[str]:
    """A row of reads.csv: reader k marked the codes in ``reads[k]``."""
    cells = []
    for column in CQ500_HEADER[2:]:
        reader, code = column.split(":")
        cells.append(str(int(code in reads[int(reader[1:])])))
    return [name, "B1", *cells]


def test_cq500_adapter_takes_the_readers_majority(tmp_path: Path) -> None:
    src = tmp_path / "cq500"
    s0, s1 = generate_uid(), generate_uid()
    write_flat_series(src / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT PLAIN THIN", study=s0,
                      patient="CQ500-CT-0", n=2)  # fmt: skip
    # No PatientID in the headers: the folder names the scan.
    write_flat_series(src / "CQ500CT1 CQ500CT1" / "Unknown Study" / "CT 5mm", study=s1,
                      patient="", n=2)  # fmt: skip
    write_flat_series(src / "CQ500CT9 CQ500CT9" / "Unknown Study" / "CT", study=generate_uid(),
                      patient="", n=1)  # fmt: skip
    with (tmp_path / "reads.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CQ500_HEADER)
        writer.writerow(_cq500_row("CQ500-CT-0", {1: {"ICH", "SAH"}, 2: set(), 3: set()}))
        writer.writerow(
            _cq500_row(
                "CQ500-CT-1",
                {1: {"ICH", "IPH", "SDH"}, 2: {"ICH", "IPH", "IVH"}, 3: {"Fracture"}},
            )
        )
        writer.writerow(_cq500_row("CQ500-CT-2", {1: {"ICH"}, 2: {"ICH"}, 3: {"ICH"}}))

    out = tmp_path / "ds"
    convert_cq500(tmp_path / "reads.csv", src, out)
    written = {r["PatientID"]: r for r in read_csv(out / "labels.csv")}
    assert set(written) == {"CQ500-CT-0", "CQ500-CT-1"}  # CT-2 has no files, CT9 no read
    assert (written["CQ500-CT-0"]["label"], written["CQ500-CT-0"]["subtype"]) == ("0", "")
    assert written["CQ500-CT-1"]["StudyInstanceUID"] == s1
    assert (written["CQ500-CT-1"]["label"], written["CQ500-CT-1"]["subtype"]) == (
        "1",
        "intraparenchymal",
    )
    assert written["CQ500-CT-1"]["SeriesInstanceUID"] == ""  # the router chooses
    linked = out / "dicom" / "CQ500CT1 CQ500CT1" / "Unknown Study" / "CT 5mm"
    assert len(list(linked.iterdir())) == 2 and not (out / "dicom" / "CQ500CT9 CQ500CT9").exists()
    assert {r.patient_id for r in read_dataset(out).studies} == {"CQ500-CT-0", "CQ500-CT-1"}


@pytest.mark.realdata
def test_cq500_adapter_on_the_real_study(tmp_path: Path, cq500_dir: Path) -> None:
    series_dir = (
        tmp_path / "cq500" / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT 4cc sec 150cc D3D on"
    )
    series_dir.mkdir(parents=True)
    for path in sorted(cq500_dir.glob("*.dcm")):
        (series_dir / path.name).symlink_to(path)
    with (tmp_path / "reads.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CQ500_HEADER)  # SOURCE.md: reader 1 SAH, readers 2 and 3 normal
        writer.writerow(_cq500_row("CQ500-CT-0", {1: {"ICH", "SAH"}, 2: set(), 3: set()}))
    out = tmp_path / "ds"
    (row,) = convert_cq500(tmp_path / "reads.csv", tmp_path / "cq500", out)
    assert (row.PatientID, row.label, row.subtype) == ("CQ500-CT-0", 0, "")
    (record,) = read_dataset(out).studies
    chosen = choose_series(record, BLAST)
    assert len(chosen.paths) == len(list(cq500_dir.glob("*.dcm")))


def test_siim_adapter_writes_labels_and_masks(tmp_path: Path) -> None:
    src = tmp_path / "dicom-images-train"
    negative, positive = generate_uid(), generate_uid()
    ds_neg = write_radiograph(src / "s1" / "x" / "neg.dcm", study=negative, patient="pn")
    ds_pos = write_radiograph(src / "s2" / "y" / "pos.dcm", study=positive, patient="pp")
    # SIIM names files by ImageId (the SOPInstanceUID).
    for ds, old in ((ds_neg, "neg"), (ds_pos, "pos")):
        folder = src / ("s1/x" if old == "neg" else "s2/y")
        (folder / f"{old}.dcm").rename(folder / f"{ds.SOPInstanceUID}.dcm")
    region_1, region_2 = "3 4", "100 10 30 2"  # on 32 x 24: column-major
    (tmp_path / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n"
        f"{ds_neg.SOPInstanceUID}, -1\n"
        f"{ds_pos.SOPInstanceUID}, {region_1}\n"
        f"{ds_pos.SOPInstanceUID}, {region_2}\n"
        f"{generate_uid()}, 1 1\n"  # an image without a file
    )
    out = tmp_path / "siim"
    convert_siim_pneumothorax(tmp_path / "train-rle.csv", src, out)
    written = {r["StudyInstanceUID"]: r for r in read_csv(out / "labels.csv")}
    assert set(written) == {negative, positive}
    assert written[negative]["label"] == "0" and written[negative]["mask"] == ""
    assert written[positive]["finding"] == PNEUMOTHORAX and written[positive]["label"] == "1"
    assert written[positive]["PatientID"] == "pp"
    assert written[positive]["SeriesInstanceUID"] == ds_pos.SeriesInstanceUID
    assert written[positive]["mask"] == f"masks/{ds_pos.SOPInstanceUID}.nii.gz"

    image = sitk.ReadImage(str(out / written[positive]["mask"]))
    assert image.GetSize() == (24, 32) and image.GetSpacing() == pytest.approx((0.25, 0.5))
    mask = sitk.GetArrayFromImage(image)
    expected = rle_decode(region_1, (32, 24)) | rle_decode(region_2, (32, 24))
    pneumothorax = CHEST.outputs.index("Pneumothorax")
    np.testing.assert_array_equal(mask, expected.astype(np.uint8) * pneumothorax)
    assert mask[3:7, 0].all() and mask.sum() == pneumothorax * 16  # rows 3-6 of column 0

    dataset = read_dataset(out)
    by_uid = {r.study_uid: r for r in dataset.studies}
    assert by_uid[positive].mask == (out / written[positive]["mask"]).resolve()
    assert choose_series(by_uid[negative], CHEST).paths[0].name == f"{ds_neg.SOPInstanceUID}.dcm"

    (tmp_path / "bad.csv").write_text(f"ImageId,EncodedPixels\n{ds_pos.SOPInstanceUID},5000 9\n")
    with pytest.raises(DatasetError, match=r"bad.csv: line 2, column 'EncodedPixels': RLE runs"):
        convert_siim_pneumothorax(tmp_path / "bad.csv", src, tmp_path / "bad")


# --------------------------------------------------------------------------------------------
# Samples


class CountingPrepare:
    """``prepare_head_ct`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, paths: Sequence[Path]) -> HeadCT:
        self.calls += 1
        return prepare_head_ct(paths)


@pytest.fixture(scope="module")
def head_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A positive study with a mask, a negative one and a positive one without a mask."""
    root = tmp_path_factory.mktemp("heads")
    rows = []
    for name, label, with_mask in (("pos", 1, True), ("neg", 0, False), ("nomask", 1, False)):
        study = generate_uid()
        _, _, mask = write_head_series(root / "dicom" / name, study=study, patient=name)
        mask_rel = ""
        if with_mask:
            mask_rel = f"masks/{name}.nii.gz"
            (root / "masks").mkdir(exist_ok=True)
            sitk.WriteImage(mask, str(root / mask_rel))
        rows.append(LabelRow(study, name, HAEMORRHAGE, label, mask=mask_rel))
    write_meta(root, name="heads", task=HAEMORRHAGE, source="tests")
    write_labels(root, rows)
    return root


def test_head_ct_label_lines_up_with_the_image_and_is_cached(
    head_dataset: Path, tmp_path: Path
) -> None:
    records = read_dataset(head_dataset).studies
    prepare = CountingPrepare()
    dataset = haemorrhage_dataset(records, BLAST, cache_dir=tmp_path / "cache", prepare=prepare)
    assert len(dataset) == 3
    sample = dataset[0]
    image, label, head = sample[IMAGE], sample[LABEL], sample[HEAD]
    assert image.dtype == torch.float32 and label.dtype == torch.uint8 and head.dtype == torch.uint8
    assert image.ndim == 4 and image.shape[0] == 1 and label.shape == image.shape == head.shape
    assert sample[HAS_MASK] is True and sample[TARGET] == 1.0
    assert sample[STUDY] == records[0].study_uid
    hu, labelled = image[0].numpy(), label[0].numpy() == 1
    assert set(np.unique(label.numpy())) == {0, 1}
    # 1 ml of blood at 1 mm: the label lies on the bright cube, and covers it.
    assert 1500 < labelled.sum() < 2100
    assert np.mean(hu[labelled] >= (BLEED_HU + BRAIN_HU) / 2 - 1) > 0.9
    bright = hu > BLEED_HU - 5
    assert bright.sum() > 800 and np.mean(labelled[bright]) > 0.95
    assert prepare.calls == 1

    again = dataset[0]  # from the cache
    assert prepare.calls == 1
    torch.testing.assert_close(again[IMAGE], image)
    reopened = haemorrhage_dataset(records, BLAST, cache_dir=tmp_path / "cache", prepare=prepare)
    reopened[0]
    assert prepare.calls == 1  # the cache outlives the dataset object

    negative, no_mask = dataset[1], dataset[2]
    assert negative[HAS_MASK] is True and negative[TARGET] == 0.0 and not negative[LABEL].any()
    assert no_mask[HAS_MASK] is False and no_mask[TARGET] == 1.0 and not no_mask[LABEL].any()
    assert prepare.calls == 3
    assert warm_cache(dataset) == [0, 1, 2] and prepare.calls == 3


def test_dicom_segmentation_masks_are_read_by_class_name(tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from training.data.samples import read_mask

    _, paths, mask = write_head_series(tmp_path / "ct", study=generate_uid(), n=12, size=32)
    sources = []
    for path in paths:  # what highdicom needs of the sources beyond the test's slices
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "TEST^SEG", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "1200", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber = "", 1
        sources.append(ds)
    cube = np.zeros(sitk.GetArrayViewFromImage(mask).shape, dtype=bool)  # (z, y, x): files
    cube[5:8, 10:14, 12:17] = True
    box = np.zeros_like(cube)
    box[2, 4:8, 4:8] = True

    def segment(number: int, label: str, tracking: str) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Hemorrhage,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            tracking_id=tracking,
            tracking_uid=hd.UID(),
        )

    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.stack([cube, box], axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            segment(1, "Intraparenchymal haemorrhage", "reader 1"),  # by label
            segment(2, "Blood outside the brain", "EAH"),  # by TrackingID
        ],
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="tests",
        manufacturer_model_name="tests",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(tmp_path / "seg.dcm")
    image = read_mask(tmp_path / "seg.dcm", BLAST.outputs)
    on_source = sitk.Resample(image, mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    expected = cube.astype(np.uint8) + 2 * box.astype(np.uint8)
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_source), expected)
    with pytest.raises(DatasetError, match="segment 1 names no class"):
        read_mask(tmp_path / "seg.dcm", ("background", "blood"))


def test_augmentation_depends_only_on_seed_epoch_and_index() -> None:
    rng = np.random.default_rng(0)
    base = []
    for _ in range(4):
        label = np.zeros((1, 12, 14, 16), dtype=np.uint8)
        label[0, 4:8, 5:9, 3:7] = 1
        base.append(
            {
                IMAGE: torch.from_numpy(rng.normal(30, 10, (1, 12, 14, 16)).astype(np.float32)),
                LABEL: torch.from_numpy(label),
                HEAD: torch.from_numpy(np.ones_like(label)),
            }
        )
    augment = haemorrhage_augmentation(flip_prob=0.5, affine_prob=1.0, noise_prob=1.0)
    one = AugmentedDataset(base, augment, seed=11)
    other = AugmentedDataset(base, augment, seed=11)  # e.g. another DDP process
    first = [one[i] for i in range(4)]
    for i in (3, 1, 0, 2):  # another order of access
        torch.testing.assert_close(other[i][IMAGE], first[i][IMAGE])
        torch.testing.assert_close(other[i][LABEL], first[i][LABEL])
    assert not torch.equal(first[0][IMAGE], base[0][IMAGE])
    assert first[0][LABEL].dtype == torch.uint8
    assert set(torch.unique(first[0][LABEL]).tolist()) <= {0, 1}
    one.set_epoch(1)
    assert not torch.equal(one[0][IMAGE], first[0][IMAGE])  # a new epoch, new samples
    assert not torch.equal(AugmentedDataset(base, augment, seed=12)[0][IMAGE], first[0][IMAGE])
    assert AugmentedDataset(base, None)[2] is base[2]

    assert seed_for(0, 1, 2) == seed_for(0, 1, 2)
    assert len({seed_for(0, e, i) for e in range(3) for i in range(3)}) == 9
    assert 0 <= seed_for(2**40, 7, 3) < 2**32
    with pytest.raises(ValueError):
        seed_for(0, -1, 0)


def test_chest_sample_is_the_serving_input(tmp_path: Path) -> None:
    from triage.demo.xray import write_demo_radiograph
    from triage.models.chest import ChestXrayModel

    root = tmp_path / "chest"
    study = generate_uid()
    paths = write_demo_radiograph(root / "dicom", StudyInstanceUID=study)
    write_dataset(root, [LabelRow(study, "DEMO", PNEUMOTHORAX, 1)], task=PNEUMOTHORAX)
    records = read_dataset(root).studies
    dataset = chest_dataset(records, CHEST)
    sample = dataset[0]
    expected = ChestXrayModel(CHEST, None, device="cpu").prepare(paths).x[0]
    assert sample[IMAGE].shape == (1, 224, 224) and sample[IMAGE].dtype == torch.float32
    np.testing.assert_array_equal(sample[IMAGE].numpy(), expected)
    index = CHEST.outputs.index("Pneumothorax")
    assert sample[LABEL].tolist() == [float(i == index) for i in range(len(CHEST.outputs))]
    assert sample[LABEL_MASK].tolist() == sample[LABEL].tolist()  # only pneumothorax labelled
    assert sample[STUDY] == study
