"""A Comprehensive 3D SR measurement report (TID 1500, highdicom) of one AI finding.

The report's content:

* observation context: the model as the observing device (TID 1004: device UID derived from
  name, version and weights; name; manufacturer "triage"; model name and version; serial
  number = a digest of the weights), the procedure reported (LOINC 24725-4 "CT Head" and
  25045-6 "CT unspecified body region", CID 100), and the image library of the source series;
* one volumetric group (TID 1411) per segment of the Segmentation: the segment referenced,
  its class as finding type and site (see :mod:`~triage.dicomout.terminology`), the volume in
  ml (SCT 118565006 "Volume", UCUM ml) the finding states for the class, and the algorithm;
* one study-level group (TID 1501) for the finding itself: present or absent (the flag), the
  model's score (SCT 246262008 "Score", unit "1") and, when the finding states it, its total
  volume; a finding without any segment (nothing found) is reported with this group alone;
* a TEXT comment (DCM 121106) on the root saying the report is AI output not for diagnostic
  use; the series description says so too.

Values come from the :class:`~triage.domain.Finding` (what the worklist and the page show),
never recomputed here.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from triage.dicomout.patient import complete_deidentification
from triage.dicomout.seg import device_serial_number, segment_classes
from triage.dicomout.terminology import (
    ALGORITHM_FAMILY,
    MANUFACTURER,
    MILLILITRE,
    NOT_FOR_DIAGNOSTIC_USE,
    SCORE_UNIT,
    finding_code,
    segment_terms,
)
from triage.domain import Finding, ModelRef

__all__ = ["make_measurement_report"]

SCORE: Code = Code("246262008", "SCT", "Score")
PROCEDURES: tuple[Code, ...] = (codes.LN.HeadCT, codes.LN.CTUnspecifiedBodyRegion)


def _algorithm(model: ModelRef) -> hd.sr.AlgorithmIdentification:
    parameters = [f"weights_sha256={h}" for h in model.weights_sha256] or None
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        family=ALGORITHM_FAMILY,
        manufacturer=MANUFACTURER,
    )


def _observation_context(model: ModelRef) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(
            entropy_srcs=["triage-device", model.name, model.version, *model.weights_sha256]
        ),
        name=model.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} {model.version}",
        serial_number=device_serial_number(model),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _frame_segment(segmentation: pydicom.Dataset, item: pydicom.Dataset) -> int | None:
    """The segment number of a frame: from its own functional groups, or from the shared ones
    (where highdicom puts it when the Segmentation has a single segment)."""
    for groups in (item, *segmentation.get("SharedFunctionalGroupsSequence", [])):
        if "SegmentIdentificationSequence" in groups:
            return int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    return None


def _referenced_segment(segmentation: pydicom.Dataset, number: int) -> hd.sr.ReferencedSegment:
    """The segment and the source images its frames derive from.

    ``hd.sr.ReferencedSegment.from_segmentation`` reads the segment of each frame from the
    per-frame functional groups only and fails on a single-segment Segmentation (highdicom
    0.28 keeps the segment identification in the shared groups then); this reads both.
    """
    sources: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for item in segmentation.PerFrameFunctionalGroupsSequence:
        if _frame_segment(segmentation, item) != number:
            continue
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                if uid in sources:
                    continue
                frames = source.get("ReferencedFrameNumber")
                if frames is not None and source["ReferencedFrameNumber"].VM == 1:
                    frames = [frames]
                sources[uid] = hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=str(source.ReferencedSOPClassUID),
                    referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=[int(f) for f in frames] if frames else None,
                )
    if not sources:
        raise ValueError(f"no frame of the segmentation derives from an image for segment {number}")
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=number,
        source_images=list(sources.values()),
    )


def _segment_groups(
    finding: Finding, segmentation: pydicom.Dataset, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    uids = {int(s.SegmentNumber): str(s.TrackingUID) for s in segmentation.SegmentSequence}
    groups = []
    for name, number in segment_classes(segmentation).items():
        if name not in finding.volumes_ml:
            raise ValueError(f"the finding states no volume for the segmented class {name!r}")
        terms = segment_terms(name)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uids[number], identifier=name),
                referenced_segment=_referenced_segment(segmentation, number),
                finding_type=terms.type,
                finding_category=terms.category,
                finding_sites=[hd.sr.FindingSite(terms.region)],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=float(finding.volumes_ml[name]),
                        unit=MILLILITRE,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    return groups


def _finding_group(
    finding: Finding, algorithm: hd.sr.AlgorithmIdentification, report_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = finding_code(finding.finding)
    measurements = [
        hd.sr.Measurement(
            name=SCORE, value=float(finding.score), unit=SCORE_UNIT, algorithm_id=algorithm
        )
    ]
    total_ml = finding.details.get("blood_volume_ml")
    if isinstance(total_ml, int | float):
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(total_ml),
                unit=MILLILITRE,
                algorithm_id=algorithm,
            )
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[report_uid, "finding", finding.finding]),
            identifier=finding.finding,
        ),
        finding_type=code,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=code, value=codes.SCT.Present if finding.flag else codes.SCT.Absent
            )
        ],
    )


def make_measurement_report(
    finding: Finding,
    sources: Sequence[pydicom.Dataset],
    segmentation: pydicom.Dataset | None,
    *,
    series_number: int,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report of one finding and its segments.

    Args:
        finding: the study-level finding (flag, score, volume per class, the model that
            produced it with its weights).
        sources: the source series' image objects (headers are enough), for the image library
            and the evidence.
        segmentation: the Segmentation made from the finding's labels
            (:func:`~triage.dicomout.seg.make_segmentation`), or None when there is none
            (nothing segmented): the report then holds the study-level group only.
        series_number: SeriesNumber of the new series.
        series_instance_uid: its SeriesInstanceUID (default: a new UID).
        sop_instance_uid: the object's SOPInstanceUID (default: a new UID).
        instance_number: its InstanceNumber.

    Returns:
        The Comprehensive 3D SR (complete, preliminary, unverified).

    Raises:
        ValueError: the finding has no DICOM code, or states no volume for a segmented class.
    """
    if not sources:
        raise ValueError("no source images given")
    sop_instance_uid = sop_instance_uid or hd.UID()
    model = finding.model
    algorithm = _algorithm(model)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    if segmentation is not None:
        groups.extend(_segment_groups(finding, segmentation, algorithm))
    groups.append(_finding_group(finding, algorithm, sop_instance_uid))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=list(PROCEDURES),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=list(sources),
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=(
                f"AI output of {model.name} {model.version} ({MANUFACTURER}), "
                f"{NOT_FOR_DIAGNOSTIC_USE}: a preliminary automated measurement that has not "
                "been verified by a physician."
            ),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    evidence = [*sources, *([segmentation] if segmentation is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = f"AI measurements, {NOT_FOR_DIAGNOSTIC_USE}"
    complete_deidentification(sr)
    return sr
