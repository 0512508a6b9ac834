"""Tests of X-ray (CR, DX) preprocessing: files built here, pydicom(-data) CR files, real CR."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_encoder, pixel_array
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.conftest import pydicom_file
from triage.preprocess.ct import PreprocessError
from triage.preprocess.errors import CorruptSliceError
from triage.preprocess.xray import (
    InputContractError,
    ResizeGeometry,
    ResizeWithAspect,
    ResizeWithAspectd,
    XRayImage,
    XRayInput,
    check_xray_input,
    load_radiograph,
    prepare_radiograph,
)

PATIENT_NAME = "Doe^Jane"

# One float32 ulp at 1.0 (1.19e-7). Measured on the real CR: the same radiograph stored as
# MONOCHROME1 and as MONOCHROME2 gives identical inputs (difference 0.0); a MONOCHROME1
# relabelling of the same stored values gives 1 - input to within 1.19e-7.
INVERSION_TOL = float(np.finfo(np.float32).eps)

# ---------------------------------------------------------------------------------------------
# Files built here


def _write(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_allocated: int | None = None,
    bits_stored: int | None = None,
    modality: str = "CR",
    sop_class: str = ComputedRadiographyImageStorage,
    pixel_bytes: bytes | None = None,
    **attributes: Any,
) -> Path:
    """Writes one uncompressed radiograph whose stored values are ``stored`` (rows, columns)."""
    signed = np.issubdtype(stored.dtype, np.signedinteger)
    allocated = bits_allocated or stored.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "ID-12345"
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixel_bytes if pixel_bytes is not None else stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(rows: int = 64, cols: int = 48, top: int = 4095) -> np.ndarray:
    """uint16 values rising smoothly over the image, 0 ... top."""
    r, c = np.mgrid[0:rows, 0:cols]
    return np.rint((r * cols + c) / (rows * cols - 1) * top).astype(np.uint16)


def _lut_item(entries: np.ndarray, first: int, bits: int) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(entries) % 2**16, first, bits])
    item.add_new("LUTData", "US", [int(v) for v in entries])
    return item


def _recode(src: Path, dst: Path, syntax: UID) -> Path:
    """Re-encodes a file in another transfer syntax (lossless only)."""
    ds = pydicom.dcmread(src)
    arr = pixel_array(ds)
    if syntax.is_compressed:
        ds.compress(syntax, arr)
        ds.save_as(dst, enforce_file_format=True)
        return dst
    big = syntax == ExplicitVRBigEndian
    ds.PixelData = (arr.byteswap() if big else arr).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = syntax
    if big:  # save_as refuses to change the byte order of a dataset read as little endian
        pydicom.dcmwrite(dst, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.save_as(dst, enforce_file_format=True)
    return dst


# ---------------------------------------------------------------------------------------------
# Intensity: Modality LUT, VOI LUT, window, data window, MONOCHROME1, BitsStored


def test_window_applies_the_dicom_linear_formula(tmp_path: Path) -> None:
    stored = _ramp()
    path = _write(tmp_path / "w.dcm", stored, WindowCenter=2000, WindowWidth=1001)
    image = load_radiograph(path)
    c, w = 2000 - 0.5, 1001 - 1  # PS3.3 C.11.2.1.2.1
    expected = np.clip((stored - c) / w + 0.5, 0, 1)
    assert image.voi_source == "window"
    assert image.pixels.dtype == np.float32 and image.pixels.shape == stored.shape
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_modality_rescale_comes_before_the_window(tmp_path: Path) -> None:
    stored = _ramp()
    path = _write(
        tmp_path / "r.dcm",
        stored,
        RescaleSlope=2.0,
        RescaleIntercept=-1000.0,
        WindowCenter=3000,
        WindowWidth=4001,
    )
    rescaled = stored * 2.0 - 1000.0
    expected = np.clip((rescaled - 2999.5) / 4000 + 0.5, 0, 1)
    np.testing.assert_allclose(load_radiograph(path).pixels, expected, atol=1e-6)


def test_modality_lut_sequence(tmp_path: Path) -> None:
    stored = _ramp(top=255).astype(np.uint8)
    table = (np.arange(256) ** 2 // 64).astype(np.uint16)  # 0 ... 1016
    path = _write(
        tmp_path / "m.dcm",
        stored,
        ModalityLUTSequence=DicomSequence([_lut_item(table, 0, 16)]),
        WindowCenter=512,
        WindowWidth=1025,
    )
    expected = np.clip((table[stored] - 511.5) / 1024 + 0.5, 0, 1)
    np.testing.assert_allclose(load_radiograph(path).pixels, expected, atol=1e-6)


def test_voi_lut_sequence_is_used_and_preferred_to_the_window(tmp_path: Path) -> None:
    # An 8-bit LUT with 1024 entries: pydicom 3.0's apply_voi alone wraps indices above 255.
    stored = _ramp(top=1023) + 100  # 100 ... 1123
    entries = np.rint(255 * np.sqrt(np.arange(1024) / 1023)).astype(np.uint16)
    path = _write(
        tmp_path / "v.dcm",
        stored,
        VOILUTSequence=DicomSequence([_lut_item(entries, 100, 8)]),
        WindowCenter=10,
        WindowWidth=2,
    )
    image = load_radiograph(path)
    assert image.voi_source == "VOILUTSequence"
    np.testing.assert_allclose(image.pixels, entries[stored - 100] / 255.0, atol=1e-6)


def test_voi_lut_is_scaled_by_its_entries_not_its_nominal_depth(tmp_path: Path) -> None:
    # Descriptor says 16 bits, entries use 12 (a known vendor quirk): still spans [0, 1].
    stored = _ramp(top=4095)
    entries = np.arange(4096, dtype=np.uint16)
    path = _write(
        tmp_path / "q.dcm", stored, VOILUTSequence=DicomSequence([_lut_item(entries, 0, 16)])
    )
    pixels = load_radiograph(path).pixels
    np.testing.assert_allclose(pixels, stored / 4095.0, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = _ramp()
    kwargs: dict[str, Any] = {"WindowCenter": 2048, "WindowWidth": 4096}
    m2 = load_radiograph(_write(tmp_path / "m2.dcm", stored, **kwargs))
    m1 = load_radiograph(_write(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **kwargs))
    assert m1.photometric == "MONOCHROME1" and m2.photometric == "MONOCHROME2"
    assert m2.pixels[-1, -1] == 1.0 and m1.pixels[-1, -1] == 0.0  # highest value: dark in M1
    assert np.abs(m1.pixels - (1.0 - m2.pixels)).max() <= INVERSION_TOL
    # The same picture stored both ways gives the same presentation.
    m1_inverted = load_radiograph(
        _write(tmp_path / "i.dcm", (4095 - stored).astype(np.uint16), photometric="MONOCHROME1")
    )
    m2_data = load_radiograph(_write(tmp_path / "d.dcm", stored))
    assert np.abs(m1_inverted.pixels - m2_data.pixels).max() <= INVERSION_TOL


def test_data_window_ignores_collimation_and_padding(tmp_path: Path) -> None:
    stored = np.zeros((100, 100), dtype=np.uint16)  # shutter at the lowest value
    field = np.linspace(1000, 2000, 80 * 80).reshape(80, 80)
    stored[10:90, 10:90] = np.rint(field).astype(np.uint16)
    stored[0, :] = 4095  # saturated line at the highest value
    stored[:, 0] = 3000  # PixelPaddingValue
    path = _write(tmp_path / "d.dcm", stored, PixelPaddingValue=3000)
    image = load_radiograph(path)
    assert image.voi_source == "data"
    inside = image.pixels[10:90, 10:90]
    lo, hi = np.percentile(field, (0.5, 99.5))
    np.testing.assert_allclose(inside, np.clip((stored[10:90, 10:90] - lo) / (hi - lo), 0, 1))
    assert inside.min() == 0.0 and inside.max() == 1.0
    assert np.count_nonzero(inside == 1.0) < 0.01 * inside.size  # not stretched by the shutter


def test_unusable_window_falls_back_to_the_data_window(tmp_path: Path) -> None:
    stored = _ramp()
    path = _write(tmp_path / "w0.dcm", stored, WindowCenter=100, WindowWidth=0)
    image = load_radiograph(path)
    assert image.voi_source == "data"
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_a_single_grey_value_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "flat.dcm", np.full((8, 8), 7, dtype=np.uint16))
    with pytest.raises(PreprocessError, match="single grey value"):
        load_radiograph(path)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_are_ignored(tmp_path: Path, signed: bool) -> None:
    clean = _ramp(top=4095)  # 12-bit values
    if signed:
        clean = (clean.astype(np.int32) - 2048).astype(np.int16)
    raw = clean.view(np.uint16) & np.uint16(0x0FFF)
    junk = raw | np.uint16(0xA000)  # garbage in the 4 unused high bits
    attrs: dict[str, Any] = {"WindowCenter": 0 if signed else 2048, "WindowWidth": 4096}
    kwargs: dict[str, Any] = {"bits_allocated": 16, "bits_stored": 12, **attrs}
    reference = _write(tmp_path / "ref.dcm", clean, **kwargs)
    dirty = _write(tmp_path / "junk.dcm", clean, pixel_bytes=junk.tobytes(), **kwargs)
    assert pixel_array(pydicom.dcmread(dirty)).tolist() == clean.tolist()
    a, b = load_radiograph(reference), load_radiograph(dirty)
    assert a.bits_stored == 12
    assert np.array_equal(a.pixels, b.pixels)
    assert b.pixels.min() == 0.0 and b.pixels.max() == 1.0


# ---------------------------------------------------------------------------------------------
# Header facts: spacing, view, laterality


@pytest.mark.parametrize(
    ("attrs", "spacing", "source"),
    [
        ({"PixelSpacing": [0.2, 0.1]}, (0.2, 0.1), "PixelSpacing"),
        ({"PixelSpacing": [0, 0]}, None, None),
        ({"PixelSpacing": [0.2, -0.1]}, None, None),
        ({"PixelSpacing": [0.2]}, None, None),
        ({}, None, None),
        ({"ImagerPixelSpacing": [0.15, 0.15]}, (0.15, 0.15), "ImagerPixelSpacing"),
        (
            {"ImagerPixelSpacing": [0.15, 0.12], "EstimatedRadiographicMagnificationFactor": 1.2},
            (0.125, 0.1),
            "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor",
        ),
        (
            {"PixelSpacing": [0.0, 0.0], "ImagerPixelSpacing": [0.15, 0.15]},
            (0.15, 0.15),
            "ImagerPixelSpacing",
        ),
        (
            {"PixelSpacing": [0.14, 0.14], "ImagerPixelSpacing": [0.15, 0.15]},
            (0.14, 0.14),
            "PixelSpacing",
        ),
    ],
)
def test_pixel_spacing(
    tmp_path: Path, attrs: dict[str, Any], spacing: tuple[float, float] | None, source: str | None
) -> None:
    image = load_radiograph(_write(tmp_path / "s.dcm", _ramp(), **attrs))
    assert image.spacing_source == source
    if spacing is None:
        assert image.pixel_spacing_mm is None
    else:
        assert image.pixel_spacing_mm == pytest.approx(spacing)


def _code(meaning: str) -> DicomSequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X", "99TEST", meaning
    return DicomSequence([item])


@pytest.mark.parametrize(
    ("attrs", "view"),
    [
        ({"ViewPosition": "PA"}, "PA"),
        pytest.param(
            {"ViewPosition": "ll "},
            "LL",
            marks=pytest.mark.filterwarnings("ignore:Invalid value for VR CS"),
        ),
        ({"ViewPosition": "RLD"}, "RLD"),
        ({"ViewPosition": "LATERAL"}, "LATERAL"),
        ({"ViewPosition": "AP SUPINE"}, "AP"),
        ({"ViewCodeSequence": _code("postero-anterior")}, "PA"),
        ({"ViewCodeSequence": _code("left lateral")}, "LL"),
        ({"ViewCodeSequence": _code("latero-medial")}, "LATERAL"),
        ({"SeriesDescription": "view: PA"}, "PA"),
        ({"SeriesDescription": "Chest LAT"}, "LATERAL"),
        ({"SeriesDescription": "PA and LAT"}, None),
        ({"SeriesDescription": "CHEST PAPER"}, None),
        ({"ViewPosition": "", "SeriesDescription": "THORAX AP"}, "AP"),
        ({}, None),
    ],
)
def test_view_position(tmp_path: Path, attrs: dict[str, Any], view: str | None) -> None:
    assert load_radiograph(_write(tmp_path / "v.dcm", _ramp(), **attrs)).view_position == view


@pytest.mark.parametrize(
    ("attrs", "laterality"),
    [
        ({"ImageLaterality": "L"}, "L"),
        ({"ImageLaterality": "B", "Laterality": "R"}, "B"),
        ({"Laterality": "R"}, "R"),
        ({"ImageLaterality": "X"}, None),
        ({}, None),
    ],
)
def test_laterality(tmp_path: Path, attrs: dict[str, Any], laterality: str | None) -> None:
    assert load_radiograph(_write(tmp_path / "l.dcm", _ramp(), **attrs)).laterality == laterality


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(("name", "modality"), [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_other_modalities_are_refused(name: str, modality: str) -> None:
    with pytest.raises(PreprocessError, match=f"modality '{modality}' is not a radiograph"):
        load_radiograph(pydicom_file(name))


def _refusal(tmp_path: Path, **kwargs: Any) -> str:
    stored = kwargs.pop("stored", _ramp())
    with pytest.raises(PreprocessError) as info:
        load_radiograph(_write(tmp_path / "x.dcm", stored, **kwargs))
    message = str(info.value)
    assert PATIENT_NAME.split("^")[0] not in message and "ID-12345" not in message
    assert str(tmp_path) not in message
    return message


def test_mammography_is_refused(tmp_path: Path) -> None:
    assert "modality 'MG'" in _refusal(tmp_path, modality="MG")


def test_missing_modality_is_refused(tmp_path: Path) -> None:
    assert "modality absent" in _refusal(tmp_path, modality="")


def test_multi_frame_is_refused(tmp_path: Path) -> None:
    frames = np.stack([_ramp(), _ramp()])
    message = _refusal(tmp_path, stored=frames, NumberOfFrames=2)
    assert "multi-frame" in message and "2 frames" in message


def test_colour_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    message = _refusal(
        tmp_path,
        stored=rgb[..., 0],
        pixel_bytes=rgb.tobytes(),
        photometric="RGB",
        SamplesPerPixel=3,
        PlanarConfiguration=0,
    )
    assert "SamplesPerPixel 3" in message


def test_for_processing_is_refused(tmp_path: Path) -> None:
    message = _refusal(tmp_path, modality="DX", sop_class=DigitalXRayImageStorageForProcessing)
    assert "FOR PROCESSING" in message


def test_non_dicom_and_missing_pixels_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(PreprocessError, match="not DICOM"):
        load_radiograph(junk)
    ds = pydicom.dcmread(_write(tmp_path / "p.dcm", _ramp()))
    del ds.PixelData
    ds.save_as(tmp_path / "p.dcm")
    with pytest.raises(PreprocessError, match="no pixel data"):
        load_radiograph(tmp_path / "p.dcm")


def test_truncated_pixel_data_is_refused(tmp_path: Path) -> None:
    stored = _ramp()
    message = _refusal(tmp_path, stored=stored, pixel_bytes=stored.tobytes()[:100])
    assert "cannot be decoded" in message and "Explicit VR Little Endian" in message


# ---------------------------------------------------------------------------------------------
# Resizing with the aspect kept


def test_resize_with_aspect_pads_the_short_side_symmetrically() -> None:
    img = np.ones((1, 100, 47), dtype=np.float32)
    transform = ResizeWithAspect((64, 64))
    out = transform(img)
    geo = transform.geometry((100, 47))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 64, 64)
    assert geo.resized_shape == (64, 30)  # 47 * 0.64 = 30.08
    assert geo.padding == ((0, 0), (17, 17))
    assert geo.scale == (0.64, 30 / 47)
    assert np.all(out[0, :, 17:47] == 1.0)
    assert np.all(out[0, :, :17] == 0.0) and np.all(out[0, :, 47:] == 0.0)


def test_resize_with_aspect_odd_padding_and_upscaling() -> None:
    img = np.random.default_rng(0).random((1, 10, 20)).astype(np.float32)
    transform = ResizeWithAspect((33, 40))
    out = transform(img)
    geo = transform.geometry((10, 20))
    assert geo.resized_shape == (20, 40) and geo.padding == ((6, 7), (0, 0))
    assert out.shape == (1, 33, 40) and 0.0 <= out.min() and out.max() <= 1.0
    assert np.all(out[0, :6] == 0) and np.all(out[0, 26:] == 0)


def test_resize_with_aspect_on_tensors_and_as_a_dict_transform() -> None:
    img = torch.rand(1, 30, 60)
    out = ResizeWithAspect((32, 32))(img)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, 32, 32)
    d = ResizeWithAspectd("image", size=(32, 32))({"image": img.numpy(), "other": 1})
    assert d["other"] == 1 and d["image"].shape == (1, 32, 32)
    expected = ResizeGeometry((30, 60), (16, 32), (32, 32), (16 / 30, 32 / 60), ((8, 8), (0, 0)))
    assert d["image_geometry"] == expected
    np.testing.assert_allclose(d["image"], np.asarray(out), atol=1e-6)


def test_geometry_maps_findings_back() -> None:
    img = np.zeros((1, 400, 200), dtype=np.float32)
    img[0, 300:312, 40:52] = 1.0  # a finding centred at (305.5, 45.5)
    transform = ResizeWithAspect((100, 100))
    out = transform(img)
    geo = transform.geometry((400, 200))
    assert geo.padding == ((0, 0), (25, 25))
    centre = np.array([305.5, 45.5])
    in_model = geo.to_model(centre)
    weights = out[0]
    rows, cols = np.mgrid[0:100, 0:100]
    found = np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()
    np.testing.assert_allclose(in_model, found, atol=1e-5)
    np.testing.assert_allclose(geo.to_original(in_model), centre, atol=1e-9)
    corners = np.array([[-0.5, -0.5], [399.5, 199.5]])  # outer pixel edges
    np.testing.assert_allclose(geo.to_model(corners), [[-0.5, 24.5], [99.5, 74.5]])


def test_resize_with_aspect_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ResizeWithAspect((0, 10))
    with pytest.raises(ValueError):
        ResizeWithAspect((10, 10))(np.zeros((10, 10), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Contract check


def test_contract_accepts_a_good_input() -> None:
    good = np.full((1, 8, 6), 0.5, dtype=np.float32)
    check_xray_input(good, size=(8, 6))
    check_xray_input(np.stack([good, good]), size=(8, 6))  # batch
    check_xray_input(torch.from_numpy(good), size=(8, 6), spacing_mm=(0.3, 0.3))
    check_xray_input(good, size=(8, 6), spacing_mm=(0.3, 0.3), spacing_range_mm=(0.1, 0.5))


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (lambda a: a[0], {}, "shape"),
        (lambda a: a.transpose(0, 2, 1), {}, "shape"),
        (lambda a: np.concatenate([a, a]), {}, "shape"),
        (lambda a: a.astype(np.float64), {}, "dtype"),
        (lambda a: torch.from_numpy(a).to(torch.float16), {}, "dtype"),
        (lambda a: (a * 255).astype(np.uint8), {}, "dtype"),
        (lambda a: a.tolist(), {}, "expected an array"),
        (lambda a: np.where(a > 0.4, np.nan, a).astype(np.float32), {}, "NaN"),
        (lambda a: np.full_like(a, np.inf), {}, "NaN or infinite"),
        (lambda a: a * np.float32(255), {}, "outside the allowed"),
        (lambda a: a - np.float32(0.5), {}, "outside the allowed"),
        (lambda a: a, {"spacing_range_mm": (0.1, 0.5)}, "spacing is unknown"),
        (lambda a: a, {"spacing_mm": (0.7, 0.7), "spacing_range_mm": (0.1, 0.5)}, "spacing"),
    ],
)
def test_contract_failures(make: Callable[[np.ndarray], Any], kwargs: Any, match: str) -> None:
    good = np.linspace(0, 1, 48, dtype=np.float32).reshape(1, 8, 6)
    with pytest.raises(InputContractError, match=match):
        check_xray_input(make(good), size=(8, 6), **kwargs)
    assert issubclass(InputContractError, PreprocessError)


# ---------------------------------------------------------------------------------------------
# pydicom-data CR files (RG1: chest PA, RG3: extremity) in every transfer syntax


RG_SYNTAXES = ("UNCR", "J2KR", "UNCI", "J2KI")


@functools.cache
def _prepared(path: Path) -> XRayInput:
    return prepare_radiograph(path)


def _rg(name: str) -> XRayInput:
    return _prepared(pydicom_file(f"{name}.dcm"))


@pytest.mark.parametrize("syntax", RG_SYNTAXES)
def test_rg1_chest_pa(syntax: str) -> None:
    x = _rg(f"RG1_{syntax}")
    assert (x.Modality, x.photometric, x.view_position, x.body_part) == (
        "CR",
        "MONOCHROME1",
        "PA",
        "CHEST",
    )
    assert x.voi_source == "window" and x.laterality is None
    assert x.pixel_spacing_mm is None and x.spacing_source is None  # PixelSpacing is 0\0
    check_xray_input(x.image, size=(512, 512))
    # 1955 x 1841: not square; aspect kept, the columns padded.
    geo = x.geometry
    assert geo.original_shape == (1955, 1841) and geo.resized_shape == (512, 482)
    assert geo.padding == ((0, 0), (15, 15))
    assert abs(geo.scale[0] - geo.scale[1]) < 1 / 482
    assert np.all(x.image[0, :, :15] == 0) and np.all(x.image[0, :, -15:] == 0)
    assert x.image[0, :, 15:-15].min(axis=0).max() > 0.0
    # Bone bright: the mediastinum is brighter than both lungs at mid height.
    band = x.image[0, 200:300]
    assert band[:, 246:266].mean() > band[:, 120:140].mean() + 0.1
    assert band[:, 246:266].mean() > band[:, 372:392].mean() + 0.1


@pytest.mark.parametrize("syntax", RG_SYNTAXES)
def test_rg3_extremity(syntax: str) -> None:
    x = _rg(f"RG3_{syntax}")
    assert (x.view_position, x.laterality, x.body_part) == ("AP", "R", "EXTREMITY")
    assert x.pixel_spacing_mm is None and x.spacing_source is None  # no spacing at all
    assert x.geometry.padding == ((0, 0), (0, 0)) and x.geometry.resized_shape == (512, 512)
    check_xray_input(x.image, size=(512, 512))


@pytest.mark.parametrize("image", ["RG1", "RG3"])
def test_same_input_across_pydicom_data_transfer_syntaxes(image: str) -> None:
    original = _rg(f"{image}_UNCR").image
    lossless = _rg(f"{image}_J2KR").image
    lossy = _rg(f"{image}_J2KI").image
    lossy_reference = _rg(f"{image}_UNCI").image  # the lossy image, decompressed
    assert np.array_equal(lossless, original)
    # Measured with pylibjpeg-openjpeg: J2KI decodes exactly to UNCI; allow another decoder's
    # +-1 code value (1/1023 of RG3's window).
    assert np.abs(lossy - lossy_reference).max() <= 1e-3
    # Lossy compression: measured max 0.0025 (RG1), 0.0020 (RG3); mean 3.7e-4, 1.9e-4.
    diff = np.abs(lossy_reference - original)
    assert diff.max() <= 0.004 and diff.mean() <= 5e-4


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ],
    ids=lambda u: u.name,
)
def test_same_input_in_other_transfer_syntaxes(tmp_path: Path, syntax: UID) -> None:
    if syntax.is_compressed and not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder installed")
    src = pydicom_file("RG3_UNCR.dcm")
    recoded = _recode(src, tmp_path / "rg3.dcm", syntax)
    assert pydicom.dcmread(recoded).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(prepare_radiograph(recoded).image, _prepared(src).image)


@pytest.mark.parametrize(("name", "view"), [("6154", "LL"), ("6247", "AP"), ("6278", "AP")])
def test_pydicom_cr_thumbnails(name: str, view: str) -> None:
    # 16 x 16 MONOCHROME1 CR images with RescaleSlope 0.684 and a window; ImagerPixelSpacing.
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    image = load_radiograph(path)
    assert image.view_position == view and image.body_part == "CSPINE"
    assert image.pixel_spacing_mm == pytest.approx((0.1, 0.1))
    assert image.spacing_source == "ImagerPixelSpacing"
    assert image.voi_source == "window" and image.bits_stored == 12
    rescaled = pixel_array(ds) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1
    expected = 1.0 - np.clip((rescaled - c) / w + 0.5, 0, 1)  # MONOCHROME1
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    x = prepare_radiograph(path, size=(64, 64))
    assert x.image.shape == (1, 64, 64) and x.geometry.scale == (4.0, 4.0)
    assert x.pixel_spacing_mm == pytest.approx((0.025, 0.025))


# ---------------------------------------------------------------------------------------------
# Real chest CR (../shared/data/xray)


@pytest.mark.realdata
def test_siim_chest_input(xray_dir: Path) -> None:
    x = prepare_radiograph(xray_dir / "siim-cr-chest.dcm")
    assert isinstance(x, XRayInput)
    assert (x.Modality, x.photometric, x.view_position, x.body_part) == (
        "CR",
        "MONOCHROME2",
        "PA",
        "CHEST",
    )
    assert x.spacing_source == "PixelSpacing"
    assert x.pixel_spacing_mm == pytest.approx((0.336, 0.336))  # 0.168 mm at half size
    assert x.voi_source == "data"  # the file has no window
    check_xray_input(x.image, size=(512, 512))
    assert x.image.min() == 0.0 and x.image.max() == 1.0
    geo = x.geometry
    assert geo.original_shape == (1024, 1024) and geo.scale == (0.5, 0.5)
    assert geo.padding == ((0, 0), (0, 0))  # square: no padding
    band = x.image[0, 170:340]
    assert band[:, 246:266].mean() > band[:, 118:138].mean() + 0.2  # mediastinum vs lungs
    assert band[:, 246:266].mean() > band[:, 374:394].mean() + 0.2
    full = load_radiograph(xray_dir / "siim-cr-chest.dcm")
    assert isinstance(full, XRayImage) and full.pixel_spacing_mm == pytest.approx((0.168, 0.168))
    assert full.bits_stored == 8 and full.pixels.shape == (1024, 1024)


@pytest.mark.realdata
def test_siim_monochrome1_file_is_the_relabelled_negative(xray_dir: Path) -> None:
    # siim-cr-chest-monochrome1.dcm holds the very same stored pixels as the MONOCHROME2 file,
    # only relabelled MONOCHROME1: on display it is the negative, so its input is 1 - input.
    m2_path, m1_path = xray_dir / "siim-cr-chest.dcm", xray_dir / "siim-cr-chest-monochrome1.dcm"
    assert pydicom.dcmread(m1_path).PixelData == pydicom.dcmread(m2_path).PixelData
    m2, m1 = prepare_radiograph(m2_path), prepare_radiograph(m1_path)
    assert m1.photometric == "MONOCHROME1"
    assert np.abs(m1.image - (1.0 - m2.image)).max() <= INVERSION_TOL
    full2, full1 = load_radiograph(m2_path), load_radiograph(m1_path)
    assert np.abs(full1.pixels - (1.0 - full2.pixels)).max() <= INVERSION_TOL


@pytest.mark.realdata
def test_siim_monochrome1_and_monochrome2_give_the_same_input(
    xray_dir: Path, tmp_path: Path
) -> None:
    # The same radiograph truly stored as MONOCHROME1 (stored values inverted) and as
    # MONOCHROME2 gives the same model input (identical here; one float32 ulp allowed).
    source = pydicom.dcmread(xray_dir / "siim-cr-chest.dcm")
    inverted = (255 - pixel_array(source)).astype(np.uint8)
    path = _write(
        tmp_path / "m1.dcm",
        inverted,
        photometric="MONOCHROME1",
        PixelSpacing=[0.168, 0.168],
        ViewPosition="PA",
        BodyPartExamined="CHEST",
    )
    m2, m1 = prepare_radiograph(xray_dir / "siim-cr-chest.dcm"), prepare_radiograph(path)
    assert np.abs(m1.image - m2.image).max() <= INVERSION_TOL
    assert m1.pixel_spacing_mm == m2.pixel_spacing_mm and m1.view_position == "PA"
    # Not resized: the full-resolution presentation values agree too.
    full2, full1 = load_radiograph(xray_dir / "siim-cr-chest.dcm"), load_radiograph(path)
    assert np.abs(full1.pixels - full2.pixels).max() <= INVERSION_TOL
    # A smaller, non-square model input keeps the aspect: 1024 x 1024 into 256 x 320.
    small = prepare_radiograph(path, size=(256, 320))
    assert small.geometry.resized_shape == (256, 256)
    assert small.geometry.padding == ((0, 0), (32, 32))
    assert small.pixel_spacing_mm == pytest.approx((0.672, 0.672))


@pytest.mark.parametrize("pad", [False, True], ids=["cut", "cut-and-zero-padded"])
def test_a_cut_compressed_radiograph_is_refused_not_decoded_to_filler(
    tmp_path: Path, pad: bool
) -> None:
    if not get_encoder(JPEGLSLossless).is_available:
        pytest.skip("no JPEG-LS encoder installed")
    recoded = _recode(pydicom_file("RG3_UNCR.dcm"), tmp_path / "rg3.dcm", JPEGLSLossless)
    ds = pydicom.dcmread(recoded)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    cut = frame[: len(frame) // 3]
    ds.PixelData = encapsulate([cut + bytes(len(frame) - len(cut)) if pad else cut])
    ds.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    with pytest.raises(CorruptSliceError, match="incomplete: 1 of 1 frame"):
        load_radiograph(tmp_path / "cut.dcm")
    assert load_radiograph(recoded).pixels.shape == (ds.Rows, ds.Columns)  # intact: read
