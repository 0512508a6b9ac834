"""Series selection rules and the router: which model reads which series, and why."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from triage.models.catalog import builtin_specs
from triage.models.haemorrhage import BLAST_CT_V1
from triage.preprocess.routing import body_regions, route_study
from triage.preprocess.series import (
    SeriesInfo,
    SeriesRule,
    read_series_info,
    select_series,
    series_info_from_headers,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
CR = "1.2.840.10008.5.1.4.1.1.1"
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
MODELS = [(spec.name, spec.accepts) for spec in builtin_specs()]


def headers(
    uid: str,
    n: int = 30,
    *,
    thickness: float = 5.0,
    sop_class: str = CT,
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    iop: list[float] | None = None,
    **attrs: object,
) -> list[Dataset]:
    """Headers of a constructed series: n slices, ``thickness`` apart along the normal."""
    out = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SeriesInstanceUID = uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = iop or AXIAL
        if ds.ImageOrientationPatient == CORONAL:
            ds.ImagePositionPatient = [0.0, -i * thickness, 0.0]
        else:
            ds.ImagePositionPatient = [0.0, 0.0, i * thickness]
        ds.PixelSpacing = [0.45, 0.45]
        ds.Columns = 512
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


def info(uid: str, n: int = 30, **kwargs: object) -> SeriesInfo:
    return series_info_from_headers(headers(uid, n, **kwargs))  # type: ignore[arg-type]


def test_series_facts_from_headers() -> None:
    facts = info("1.1", 32, thickness=5.0, ConvolutionKernel="H30s", BodyPartExamined="HEAD")
    assert facts.orientation == "axial"
    assert facts.slice_thickness_mm == 5.0
    assert facts.coverage_mm == 160.0  # 31 steps of 5 mm plus one slice
    assert facts.kernel == "H30S" and facts.n_frames == 32
    assert facts.field_of_view_mm == pytest.approx(230.4)
    assert info("1.2", iop=CORONAL).orientation == "coronal"
    tilt = math.radians(25)  # a head CT tilted along the orbitomeatal line: still axial
    tilted = [1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt)]
    assert info("1.3", iop=tilted).orientation == "axial"
    oblique = math.radians(40)
    steep = [1.0, 0.0, 0.0, 0.0, math.cos(oblique), math.sin(oblique)]
    assert info("1.4", iop=steep).orientation == "oblique"


def test_localizer_bone_and_soft_tissue_the_soft_tissue_series_is_chosen() -> None:
    study = [
        info(
            "1.1",
            2,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            SeriesDescription="Topogram",
        ),
        info("1.2", 150, thickness=1.0, ConvolutionKernel="BONE", SeriesDescription="Bone 1mm"),
        info("1.3", 150, thickness=1.0, ConvolutionKernel="SOFT", SeriesDescription="Brain 1mm"),
        info("1.4", 1, sop_class=SC, modality="CT", SeriesDescription="Dose Report"),
        info("1.5", 40, iop=CORONAL, thickness=3.0, SeriesDescription="Brain cor"),
    ]
    for facts in study:
        object.__setattr__(facts, "attributes", {**facts.attributes, "BodyPartExamined": "HEAD"})
    decision = route_study(study, MODELS)
    (run,) = decision.runs
    assert run.series is not None and run.series.SeriesInstanceUID == "1.3"
    doc = decision.to_json()
    assert doc["model"] == "blast-ct-v1" and doc["SeriesInstanceUID"] == "1.3"
    verdicts = {v["SeriesInstanceUID"]: v for v in doc["models"][0]["series"]}
    assert "LOCALIZER" in verdicts["1.1"]["reasons"][0]
    assert verdicts["1.2"]["eligible"] and "less preferred" in verdicts["1.2"]["reasons"][0]
    assert verdicts["1.3"]["reasons"][0].startswith("chosen: axial CT 1 mm kernel SOFT")
    assert "secondary capture" in " ".join(verdicts["1.4"]["reasons"])
    assert "coronal orientation" in " ".join(verdicts["1.5"]["reasons"])


def test_only_a_bone_series_is_used_with_a_note() -> None:
    study = [info("1.2", 150, thickness=1.0, ConvolutionKernel="H70h", BodyPartExamined="HEAD")]
    selection = select_series(BLAST_CT_V1.accepts.series_rule, study)
    assert selection.chosen is not None
    assert "sharp/bone reconstruction" in selection.reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ContrastBolusAgent": "IOPAMIDOL"}, "contrast-enhanced"),
        ({"SeriesDescription": "CTA Circle of Willis"}, "says CTA"),
        ({"thickness": 10.0}, "slice thickness 10 mm"),
        ({"image_type": ("DERIVED", "SECONDARY", "MPR")}, "is not ORIGINAL"),
    ],
)
def test_series_rules_refuse_with_reasons(changes: dict[str, object], reason: str) -> None:
    facts = info("1.1", 40, BodyPartExamined="HEAD", **changes)  # type: ignore[arg-type]
    selection = select_series(BLAST_CT_V1.accepts.series_rule, [facts])
    assert selection.chosen is None
    (verdict,) = selection.verdicts
    assert any(reason in r for r in verdict.reasons), verdict.reasons


@pytest.mark.parametrize(
    ("agent", "contrast"),
    [
        ("NONE", False),
        ("none", False),
        ("No contrast", False),
        ("NATIV", False),
        ("", False),
        ("IOPAMIDOL", True),
        ("OMNIPAQUE 350", True),
    ],
)
def test_contrast_agent_words(agent: str, contrast: bool) -> None:
    assert info("1.1", ContrastBolusAgent=agent).contrast is contrast


def test_a_short_head_series_is_incomplete_not_inapplicable() -> None:
    decision = route_study([info("1.1", 3, BodyPartExamined="HEAD")], MODELS)
    assert not decision.runs
    (route,) = decision.incomplete
    assert route.reason.startswith("incomplete series: covers 15 mm, needs at least 90 mm")


def test_conditions_are_regular_expressions_like_monai_deploy() -> None:
    rule = SeriesRule(modalities=("CT",), conditions={"SeriesDescription": r"^(?!.*bone).*$"})
    chosen = select_series(
        rule,
        [info("1.1", SeriesDescription="Head BONE"), info("1.2", SeriesDescription="Head")],
    ).chosen
    assert chosen is not None and chosen.SeriesInstanceUID == "1.2"


@pytest.mark.parametrize(
    ("attrs", "region"),
    [
        ({"BodyPartExamined": "HEAD"}, "HEAD"),
        ({"BodyPartExamined": "BRAIN"}, "HEAD"),
        ({"BodyPartExamined": "Schädel"}, "HEAD"),
        ({"StudyDescription": "CT HEAD W/O"}, "HEAD"),
        ({"StudyDescription": "CT KOPF nativ"}, "HEAD"),
        ({"StudyDescription": "CCT nativ"}, "HEAD"),
        ({"StudyDescription": "CT Schaedel"}, "HEAD"),
        ({"SeriesDescription": "BRAIN 5mm STND"}, "HEAD"),
        ({"ProtocolName": "CRÂNE SANS INJECTION"}, "HEAD"),
        ({"ProtocolName": "TC CRÁNEO SIN CONTRASTE"}, "HEAD"),
        ({"StudyDescription": "TC ENCEFALO"}, "HEAD"),
        ({"StudyDescription": "CT hersenen blanco"}, "HEAD"),
        ({"StudyDescription": "DT hjärna"}, "HEAD"),
        ({"RequestedProcedureDescription": "Cerebral CT"}, "HEAD"),
        ({"StudyDescription": "CT THORAX"}, "CHEST"),
        ({"StudyDescription": "Thorax pa"}, "CHEST"),
        ({"BodyPartExamined": "CHEST"}, "CHEST"),
        ({"StudyDescription": "CT ABD/PELVIS W CONTRAST"}, "ABDOMEN"),
        ({"StudyDescription": "CT Becken"}, "PELVIS"),
    ],
)
def test_body_region_from_free_text_in_several_languages(
    attrs: dict[str, str], region: str
) -> None:
    found, how = body_regions(info("1.1", **attrs))  # type: ignore[arg-type]
    assert region in found, (attrs, found, how)


def test_body_region_from_anatomic_region_code() -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "69536005", "SCT"
    found, how = body_regions(info("1.1", AnatomicRegionSequence=[code]))
    assert found == ("HEAD",) and how == "anatomic region code"


def test_field_of_view_fallback_only_when_nothing_is_said() -> None:
    assert body_regions(info("1.1", ReconstructionDiameter=230))[0] == ("HEAD",)
    assert body_regions(info("1.1", ReconstructionDiameter=400))[0] == ()
    chest = info("1.1", ReconstructionDiameter=230, StudyDescription="CT THORAX")
    assert body_regions(chest)[0] == ("CHEST",)


@pytest.mark.parametrize(
    ("series", "words"),
    [
        ([info("1.1", 1, sop_class=CR, modality="CR", BodyPartExamined="CHEST")], "CR images"),
        ([info("1.1", 100, BodyPartExamined="CHEST")], "series show CHEST"),
        ([info("1.1", 100, ReconstructionDiameter=400)], "series show unknown"),
    ],
)
def test_no_applicable_model_says_why(series: list[SeriesInfo], words: str) -> None:
    decision = route_study(series, MODELS)
    assert not decision.runs and not decision.incomplete
    assert "reads CT HEAD" in decision.reason and words in decision.reason


def test_trauma_scan_head_series_goes_to_the_head_model() -> None:
    study = [
        info("1.1", 300, thickness=1.0, SeriesDescription="Thorax-Abdomen 1mm"),
        info("1.2", 150, thickness=1.0, SeriesDescription="Kopf 1mm", ConvolutionKernel="H31s"),
    ]
    (run,) = route_study(study, MODELS).runs
    assert run.series is not None and run.series.SeriesInstanceUID == "1.2"


@pytest.mark.realdata
def test_real_series_facts_and_route(cq500_dir: Path) -> None:
    paths = sorted(cq500_dir.iterdir())
    random.Random(7).shuffle(paths)
    facts = read_series_info(paths)
    assert facts.orientation == "axial"  # an 8.5 degree gantry tilt is still axial
    assert facts.n_frames == 238 and facts.slice_thickness_mm == pytest.approx(0.625)
    assert facts.coverage_mm is not None and 140 < facts.coverage_mm < 160
    decision = route_study([facts], MODELS)
    (run,) = decision.runs
    assert "field of view fits only a head" in run.reason


def test_spec_documents_its_acceptance() -> None:
    doc = BLAST_CT_V1.to_json()
    assert doc["accepts"]["body_regions"] == ["HEAD"]
    assert doc["accepts"]["series_rule"]["exclude_contrast"] is True
