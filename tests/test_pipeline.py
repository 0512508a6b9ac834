"""Routing of studies to the haemorrhage model."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage.pipeline import SeriesFiles, route


def series(uid: str, n: int = 30, **header: str) -> SeriesFiles:
    return SeriesFiles(uid, [Path(f"{uid}-{i}.dcm") for i in range(n)], dict(header))


@pytest.mark.parametrize(
    "header",
    [
        {"Modality": "CT", "BodyPartExamined": "HEAD"},
        {"Modality": "CT", "StudyDescription": "CT HEAD W/O"},
        {"Modality": "CT", "StudyDescription": "CT KOPF nativ"},
        {"Modality": "CT", "SeriesDescription": "Brain 5mm"},
        {"Modality": "CT", "ProtocolName": "CRANE SANS INJECTION"},
        # Nothing said: the field of view (227 mm, as in the real CQ500 series) fits a head.
        {"Modality": "CT", "SeriesDescription": "4cc sec 150cc D3D on", "field_of_view_mm": "227"},
    ],
)
def test_head_ct_goes_to_the_haemorrhage_model(header: dict[str, str]) -> None:
    chosen, routing = route([series("1.1", **header)])
    assert chosen is not None and routing["model"] == "blast-ct-v1"
    assert "head CT" in routing["reason"]


@pytest.mark.parametrize(
    "header",
    [
        {"Modality": "CR", "BodyPartExamined": "CHEST"},
        {"Modality": "CT", "BodyPartExamined": "CHEST", "field_of_view_mm": "240"},
        {"Modality": "CT", "field_of_view_mm": "400"},
        {"Modality": "CT"},
    ],
)
def test_other_studies_have_no_applicable_model(header: dict[str, str]) -> None:
    chosen, routing = route([series("1.1", **header)])
    assert chosen is None and routing["model"] is None
    assert routing["reason"]


def test_largest_head_series_is_chosen() -> None:
    study = [
        series("1.1", 2, Modality="CT", BodyPartExamined="HEAD"),
        series("1.2", 40, Modality="CT", BodyPartExamined="HEAD"),
        series("1.3", 1, Modality="CR", BodyPartExamined="CHEST"),
    ]
    chosen, routing = route(study)
    assert chosen is not None and chosen.SeriesInstanceUID == "1.2"
    assert routing["modalities"] == ["CR", "CT"]
