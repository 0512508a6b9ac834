"""Synthetic CT series for the preprocessing tests: uncompressed slices, JPEG Lossless
re-encoding (GDCM's encoder), and compressed frames cut short with valid encapsulation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_slice(
    path: Path,
    hu: np.ndarray,
    *,
    position: Sequence[float],
    series_uid: str,
    study_uid: str,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> Path:
    """Writes one uncompressed CT slice whose HU are ``hu`` (float (rows, columns))."""
    stored = np.rint((hu - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp_series(
    directory: Path,
    n: int = 20,
    *,
    size: int = 32,
    spacing: float = 2.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    skip: Sequence[int] = (),
    **kwargs: object,
) -> list[Path]:
    """Axial slices k = 0..n-1 at z = 10 + k × spacing, each filled with HU 10 × k.

    File names and InstanceNumbers run against the spatial order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    paths = []
    for k in range(n):
        if k in skip:
            continue
        paths.append(
            write_slice(
                directory / f"{series_uid[-6:]}_{n - k:03d}.dcm",
                np.full((size, size), 10.0 * k),
                position=(-16.0, -16.0, 10.0 + k * spacing),
                series_uid=series_uid,
                study_uid=study_uid,
                instance=n - k,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return paths


def to_jpeg_lossless(path: Path) -> None:
    """Rewrites a native single-frame file in place as JPEG Lossless SV1 (GDCM's encoder)."""
    ds = pydicom.dcmread(path)
    scratch = path.with_suffix(".gdcm.dcm")
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(scratch))
    writer.UseCompressionOn()
    writer.SetCompressor("JPEG")  # GDCM: JPEG Lossless, process 14, selection value 1
    writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None]))
    encoded = pydicom.dcmread(scratch)
    scratch.unlink()
    assert encoded.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    ds.PixelData = encapsulate(list(generate_frames(encoded.PixelData, number_of_frames=1)))
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(path, enforce_file_format=True)


def cut_frame(stream: bytes, keep: float = 1 / 3, *, zero_fill: bool = False) -> bytes:
    """A compressed frame cut to ``keep`` of its bytes (the end marker lost); with
    ``zero_fill`` padded back to its length with zero bytes."""
    cut = stream[: int(len(stream) * keep)]
    return cut + bytes(len(stream) - len(cut)) if zero_fill else cut


def cut_slice(path: Path, keep: float = 1 / 3, *, zero_fill: bool = False) -> None:
    """Cuts the one compressed frame of a single-frame file in place (``cut_frame``), keeping
    the encapsulation valid: the frame is encapsulated again, so its item length is right."""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_encapsulated
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([cut_frame(frame, keep, zero_fill=zero_fill)])
    ds.save_as(path)
