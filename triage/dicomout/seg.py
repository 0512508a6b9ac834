"""A DICOM Segmentation (highdicom) of a label map on the source images.

BINARY, one segment per class that has any pixel, frames only where a segment has pixels;
every segment names the model as its algorithm (name, family "Artificial Intelligence",
version, weights), and the series, content label and description say it is AI output not for
diagnostic use. Segments carry a TrackingID (the class name) and TrackingUID that the TID 1500
report (:mod:`triage.dicomout.sr`) repeats, so report groups and segments match.

Source images without a FrameOfReferenceUID (some de-identified data sets drop it, though CT
requires it) get one derived from their SeriesInstanceUID for the Segmentation, which must
have one; it is logged, and the Segmentation's frames still reference the source images
(DerivationImageSequence) one by one.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

import triage
from triage.dicomout.geometry import SourceLabels
from triage.dicomout.patient import complete_deidentification
from triage.dicomout.terminology import (
    ALGORITHM_FAMILY,
    CONTENT_LABEL,
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    segment_terms,
)
from triage.domain import ModelRef

__all__ = [
    "algorithm_identification",
    "device_serial_number",
    "make_segmentation",
    "segment_classes",
]

logger = logging.getLogger(__name__)


def algorithm_identification(model: ModelRef) -> hd.AlgorithmIdentificationSequence:
    """The model as a segment's algorithm: name, family, version, and the weights' sha256."""
    parameters = (
        {"weights_sha256": " ".join(model.weights_sha256)} if model.weights_sha256 else None
    )
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=ALGORITHM_FAMILY,
        version=model.version,
        source=MANUFACTURER,
        parameters=parameters,
    )


def _sources(labels: SourceLabels) -> list[pydicom.Dataset]:
    """The distinct source objects, in order."""
    seen: dict[int, pydicom.Dataset] = {}
    for s in labels.slices:
        seen.setdefault(id(s.dataset), s.dataset)
    return list(seen.values())


def _with_frame_of_reference(sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The sources, given a derived FrameOfReferenceUID (on copies) when none has one."""
    uids = {str(ds.FrameOfReferenceUID) for ds in sources if "FrameOfReferenceUID" in ds}
    if len(uids) == 1 and all("FrameOfReferenceUID" in ds for ds in sources):
        return sources
    if uids:
        raise ValueError("the source images have different or missing FrameOfReferenceUIDs")
    series = str(sources[0].get("SeriesInstanceUID", ""))
    uid = generate_uid(entropy_srcs=["triage-frame-of-reference", series])
    logger.warning(
        "source images have no FrameOfReferenceUID; the segmentation uses %s, derived from "
        "the series",
        uid,
    )
    out = []
    for ds in sources:
        ds = copy.deepcopy(ds)  # the caller's objects stay as they are (shallow copies share)
        ds.FrameOfReferenceUID = uid
        out.append(ds)
    return out


def _pixel_array(
    labels: SourceLabels, sources: list[pydicom.Dataset], lut: np.ndarray
) -> np.ndarray:
    """Segment numbers per pixel, (frames, rows, columns), frame i on the i-th source frame."""
    relabelled = lut[labels.labels]
    if all(s.frame is None for s in labels.slices):
        return relabelled
    if len(sources) != 1:
        raise ValueError(
            "a segmentation of multi-frame images needs exactly one multi-frame source object, "
            f"got {len(sources)} objects"
        )
    n_frames = int(sources[0].get("NumberOfFrames", 1))
    out = np.zeros((n_frames, *relabelled.shape[1:]), dtype=np.uint8)
    for i, s in enumerate(labels.slices):
        assert s.frame is not None
        out[s.frame] = relabelled[i]
    return out


def _long_string(text: str, short: str) -> str:
    """``text`` when it fits a LO value (64 characters), else ``short``."""
    return text if len(text) <= 64 else short


def device_serial_number(model: ModelRef) -> str:
    """A short digest of the weight files: the "serial number" of this software device."""
    if not model.weights_sha256:
        return "unknown"
    return hashlib.sha256(" ".join(model.weights_sha256).encode()).hexdigest()[:16]


def make_segmentation(
    labels: SourceLabels,
    model: ModelRef,
    *,
    series_number: int,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """A BINARY DICOM Segmentation of a label map on the source images.

    Args:
        labels: the label map on the source images (:func:`~triage.dicomout.geometry.
            labels_on_source`); its slices' datasets are the source images (headers are
            enough), single-frame objects or one multi-frame object.
        model: the model that produced the labels (name, version, weights sha256).
        series_number: SeriesNumber of the new series.
        series_instance_uid: its SeriesInstanceUID (default: a new UID).
        sop_instance_uid: the object's SOPInstanceUID (default: a new UID).
        instance_number: its InstanceNumber.

    Returns:
        The Segmentation: one segment per class with any pixel (segment numbers in class
        order from 1; TrackingID = the class name), frames only where a segment has pixels.

    Raises:
        ValueError: no class has any pixel (there is nothing to segment), or the sources are
            several multi-frame objects or disagree on their FrameOfReferenceUID.
    """
    counts = labels.voxel_counts()
    present = [value for value, name in enumerate(labels.classes, start=1) if counts[name] > 0]
    if not present:
        raise ValueError("no class has any pixel on the source images: nothing to segment")
    sop_instance_uid = sop_instance_uid or hd.UID()
    lut = np.zeros(256, dtype=np.uint8)
    algorithm = algorithm_identification(model)
    descriptions = []
    for number, value in enumerate(present, start=1):
        lut[value] = number
        name = labels.classes[value - 1]
        terms = segment_terms(name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=terms.label,
            segmented_property_category=terms.category,
            segmented_property_type=terms.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(entropy_srcs=[sop_instance_uid, "segment", name]),
            tracking_id=name,
            anatomic_regions=[terms.region],
            display_color=hd.color.CIELabColor(*terms.colour_lab),
        )
        description.SegmentDescription = f"{terms.label}, AI output, {NOT_FOR_DIAGNOSTIC_USE}"
        descriptions.append(description)
    sources = _with_frame_of_reference(_sources(labels))
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=_pixel_array(labels, sources, lut),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        # Two values (highdicom passes any sequence on; its annotation says one string).
        software_versions=cast(
            "tuple[str]", [f"triage {triage.__version__}", f"{model.name} {model.version}"]
        ),
        device_serial_number=device_serial_number(model),
        content_label=CONTENT_LABEL,
        content_description=_long_string(
            f"AI segmentation, {model.name} {model.version}, {NOT_FOR_DIAGNOSTIC_USE}",
            f"AI segmentation, {NOT_FOR_DIAGNOSTIC_USE}",
        ),
        omit_empty_frames=True,
    )
    seg.SeriesDescription = f"AI segmentation, {NOT_FOR_DIAGNOSTIC_USE}"
    complete_deidentification(seg)
    return seg


def segment_classes(seg: pydicom.Dataset) -> dict[str, int]:
    """Class name (the segment's TrackingID) -> segment number, for a Segmentation made by
    :func:`make_segmentation`."""
    return {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
