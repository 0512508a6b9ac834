"""A Secondary Capture (highdicom ``SCImage``) of a radiograph with the chest model's saliency
map laid on it, for any PACS viewer to show.

The picture: the source radiograph at its own size (rows, columns), in presentation grey as
the file asks for it (Modality LUT, then its VOI LUT or first window, else the whole stored
range, as the viewer and the model read it; MONOCHROME1 inverted so that bone is bright:
:func:`triage.preprocess.xray.load_radiograph`), with the saliency laid back on it by the
overlay's origin and scale (:func:`triage.viewer.overlays.heatmap_on_source`, the viewer's
own mapping) and coloured as the viewer colours it (``heatColour`` in
``triage/serve/static/viewer.js``): transparent below :data:`HEAT_FLOOR`, then red turning
yellow from the middle of the scale, blended at most :data:`HEAT_OPACITY` over the grey. A
caption, "AI saliency — <finding> — not for diagnostic use", is burned into a black band at
the bottom (BurnedInAnnotation YES).

The object: RGB, 8 bits, Explicit VR Little Endian, in the source's study (the Patient and
Study modules copied from it), a new series (a series description saying it is AI output
not for diagnostic use), Modality OT, ImageType DERIVED\\SECONDARY, the source image in
SourceImageSequence (purpose DCM 121322 "Source image for image processing operation",
spatial locations preserved), in ReferencedImageSequence and, with its series, in
ReferencedSeriesSequence (Common Instance Reference); the model, its version and the
finding's score in ImageComments; the source's PixelSpacing and PatientOrientation (the
pixels keep the source's grid), and its lossy-compression marking when it was compressed
lossily (that cannot be undone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

import triage
from triage.dicomout.patient import complete_deidentification, drop_invalid_age
from triage.dicomout.seg import device_serial_number
from triage.dicomout.terminology import MANUFACTURER, NOT_FOR_DIAGNOSTIC_USE
from triage.domain import Finding
from triage.preprocess.xray import load_radiograph
from triage.results import Overlay
from triage.viewer.overlays import heatmap_on_source

__all__ = [
    "CAPTION_SEPARATOR",
    "HEAT_FLOOR",
    "HEAT_OPACITY",
    "caption",
    "heat_blend_table",
    "make_saliency_capture",
    "saliency_picture",
]

HEAT_FLOOR: Final[float] = 0.05
"""Saliency (of the map's [0, 1]) below which nothing is drawn: the viewer's floor."""
HEAT_FULL: Final[float] = 0.5
"""Saliency from which the colour is fully opaque (times :data:`HEAT_OPACITY`): the viewer's."""
HEAT_OPACITY: Final[float] = 0.5
"""The most the colour covers the grey: the viewer's default opacity."""

CAPTION_SEPARATOR: Final[str] = " \u2014 "
"""Between the caption's parts (an em dash, drawn as a bar: the bundled font has none)."""

SOURCE_IMAGE_PURPOSE: Final[Code] = Code(
    "121322", "DCM", "Source image for image processing operation"
)
"""PurposeOfReferenceCode of the source image (CID 7202 "Source Image Purposes of Reference")."""

SERIES_DESCRIPTION: Final[str] = f"AI saliency map, {NOT_FOR_DIAGNOSTIC_USE}"

# Attributes of the General Image module that say the source was compressed lossily: once
# "01", every image derived from it keeps it (PS3.3 C.7.6.1.1.5).
_LOSSY: Final[tuple[str, ...]] = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def heat_blend_table() -> np.ndarray:
    """uint8 (256, 256, 3): the colour of grey ``g`` under saliency ``v`` (both 0..255) at
    ``[v, g]``, as the viewer blends it: red (255, 0, 0) turning yellow (255, 255, 0) over
    the upper half of the scale, alpha rising from 0 at :data:`HEAT_FLOOR` to 1 at
    :data:`HEAT_FULL`, times :data:`HEAT_OPACITY`."""
    t = np.arange(256, dtype=np.float64) / 255.0
    colour = np.zeros((256, 3), dtype=np.float64)
    colour[:, 0] = 255.0
    colour[:, 1] = np.where(t < 0.5, 0.0, np.round((t - 0.5) * 2.0 * 255.0))
    alpha = np.clip((t - HEAT_FLOOR) / (HEAT_FULL - HEAT_FLOOR), 0.0, 1.0) * HEAT_OPACITY
    grey = np.arange(256, dtype=np.float64)[None, :, None]
    out = grey + (colour[:, None, :] - grey) * alpha[:, None, None]
    return np.rint(out).astype(np.uint8)


_BLEND: Final[np.ndarray] = heat_blend_table()


def caption(finding: Finding) -> str:
    """The burned-in caption: ``AI saliency — <finding's label> — not for diagnostic use``."""
    label = str(finding.details.get("label") or finding.finding)
    return CAPTION_SEPARATOR.join(("AI saliency", label, NOT_FOR_DIAGNOSTIC_USE.lower()))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _burn_caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """``rgb`` with ``text`` in white on a black band along the bottom edge, the font sized
    to about a fortieth of the image's height and shrunk until the line fits the width."""
    rows, columns = rgb.shape[:2]
    parts = text.split(CAPTION_SEPARATOR)
    size = max(10, rows // 40)
    while True:
        font = _font(size)
        dash = max(4, round(size * 0.8))
        gap = max(2, round(size * 0.3))
        widths = [int(np.ceil(font.getlength(p))) for p in parts]
        total = sum(widths) + (len(parts) - 1) * (dash + 2 * gap)
        if total <= columns - 2 * gap or size <= 6:
            break
        size -= 1
    band = round(size * 1.6)
    image = Image.fromarray(rgb)  # uint8 (rows, columns, 3): RGB
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, rows - band, columns, rows), fill=(0, 0, 0))
    x = gap
    y = rows - band + (band - size) // 2
    _, x_top, _, x_bottom = font.getbbox("x")  # the bar at the middle of the x-height
    thickness = max(1, round(size / 14))
    bar_top = y + round((x_top + x_bottom - thickness) / 2)
    for i, (part, width) in enumerate(zip(parts, widths, strict=True)):
        if i:
            x += gap
            draw.rectangle((x, bar_top, x + dash - 1, bar_top + thickness - 1), fill="white")
            x += dash + gap
        draw.text((x, y), part, fill=(255, 255, 255), font=font)
        x += width
    return np.asarray(image, dtype=np.uint8)


def saliency_picture(source_path: Path, overlay: Overlay, text: str) -> np.ndarray:
    """The radiograph in presentation grey with the saliency coloured on it and the caption:
    uint8 (rows, columns, 3) RGB at the source's own size.

    Raises:
        PreprocessError: the file is not a radiograph the product reads (the reason says why).
        ValueError: the overlay is not a heatmap placed on this image.
    """
    if overlay.kind != "heatmap":
        raise ValueError(f"a saliency capture needs a heatmap overlay, not {overlay.kind!r}")
    if overlay.data.ndim != 2 or len(overlay.origin) != 2 or len(overlay.scale) != 2:
        raise ValueError("the saliency map lacks its place on the image")
    image = load_radiograph(source_path, fallback_window="bits")
    if image.SOPInstanceUID != overlay.SOPInstanceUID:
        raise ValueError("the stored image is not the one the saliency map explains")
    grey = np.rint(np.clip(image.pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    heat = heatmap_on_source(overlay.data, overlay.origin, overlay.scale, grey.shape)
    return _burn_caption(_BLEND[heat, grey], text)


def _image_reference(source: Dataset, purpose: Code | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if purpose is not None:
        item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept(purpose.value, purpose.scheme_designator, purpose.meaning)
        ]
    return item


def _comments(finding: Finding) -> str:
    model = finding.model
    threshold = finding.details.get("threshold")
    flag = f", flag threshold {threshold}" if isinstance(threshold, int | float) else ""
    weights = f", weights sha256 {' '.join(model.weights_sha256)}" if model.weights_sha256 else ""
    return (
        f"AI output of {model.name} {model.version}{weights} ({MANUFACTURER} "
        f"{triage.__version__}), {NOT_FOR_DIAGNOSTIC_USE}: saliency map of the finding "
        f"{finding.finding} ({finding.details.get('label') or finding.finding}), "
        f"score {finding.score:.4f}{flag}, flagged. Where the model looked, not a finding's "
        "outline; not verified by a physician."
    )


def make_saliency_capture(
    finding: Finding,
    overlay: Overlay,
    source: Dataset,
    source_path: Path,
    *,
    series_number: int,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> hd.sc.SCImage:
    """The Secondary Capture of one flagged finding's saliency on its radiograph.

    Args:
        finding: the finding (flagged; its model, score and label go into the object).
        overlay: its ``heatmap`` overlay, naming ``source`` as the image it explains.
        source: the source image's header (the caller's own copy: Type 2 attributes the
            copy needs are expected to be present, see
            :func:`~triage.dicomout.patient.complete_type2`).
        source_path: the source image's file (its pixels are read here).
        series_number: SeriesNumber of the new series.
        series_instance_uid: its SeriesInstanceUID (default: a new UID).
        sop_instance_uid: the object's SOPInstanceUID (default: a new UID).
        instance_number: its InstanceNumber.

    Raises:
        PreprocessError: the source is not a radiograph the product reads.
        ValueError: the finding is not flagged, or the overlay does not fit the source.
    """
    if not finding.flag:
        raise ValueError("saliency captures are made for flagged findings only")
    if overlay.SOPInstanceUID != str(source.get("SOPInstanceUID", "")):
        raise ValueError("the saliency map explains another image than the source given")
    pixels = saliency_picture(source_path, overlay, caption(finding))
    if pixels.shape[:2] != (int(source.Rows), int(source.Columns)):
        raise ValueError("the source image's pixels do not match its Rows and Columns")
    model = finding.model
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # Replaced below by the source's own value: highdicom insists on one, but a
        # radiograph often states none (Type 2C: empty).
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=model.name,
        software_versions=f"triage {triage.__version__}",
        device_serial_number=device_serial_number(model),
    )
    sc.copy_patient_and_study_information(source)
    drop_invalid_age(sc)
    # The source's own value, or empty (Type 2C): the pixels keep its grid.
    sc["PatientOrientation"].value = source.get("PatientOrientation") or ""
    sc.ConversionType = "WSD"  # made by a workstation (software), not a digital interface
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = [
        f"triage {triage.__version__}",
        f"{model.name} {model.version}",
    ]
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.DerivationDescription = (
        f"AI saliency map of {model.name} {model.version} laid over the source "
        "radiograph as a colour map, caption burned in; " + NOT_FOR_DIAGNOSTIC_USE
    )
    sc.ImageComments = _comments(finding)
    derived_from = _image_reference(source, SOURCE_IMAGE_PURPOSE)
    derived_from.SpatialLocationsPreserved = "YES"  # same rows and columns as the source
    sc.SourceImageSequence = [derived_from]
    sc.ReferencedImageSequence = [_image_reference(source, None)]
    series = Dataset()  # Common Instance Reference: the source's series, in the same study
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = [_image_reference(source, None)]
    sc.ReferencedSeriesSequence = [series]
    spacing = source.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        sc.PixelSpacing = list(spacing)
    body_part = source.get("BodyPartExamined")
    if body_part:
        sc.BodyPartExamined = body_part
    if str(source.get("LossyImageCompression", "")) == "01":
        for keyword in _LOSSY:
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)
    complete_deidentification(sc)
    return sc
