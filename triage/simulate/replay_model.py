"""SIMULATION ONLY: the "model" a server runs while ``triage simulate --replay`` replays a day.

A replay sends every simulated study to a running server as a real DICOM instance. The
simulator has already drawn whether the AI flags the study (and its score and severity);
the replay writes that result into the instance, in a private block, and this model reads
it back, so that the server's real worklist code escalates the study exactly as it would a
real model's finding (``intracranial_haemorrhage`` -> ``critical`` by the policy's rules).

The block (written by :func:`write_result`, read by :func:`read_result`): private group
``0x0071``, private creator ``"TRIAGE SIMULATION REPLAY"``:

==========  ====  ==================================================================
element     VR    value
==========  ====  ==================================================================
``xx01``    LO    finding code (``intracranial_haemorrhage``)
``xx02``    CS    ``Y`` (flagged) or ``N``
``xx03``    DS    score in [0, 1]
``xx04``    CS    severity (``high``, ``standard``), absent when not graded
==========  ====  ==================================================================

The replay's instances carry ``ProtocolName`` :data:`PROTOCOL` (studies of a modality the
simulated AI covers) or :data:`PROTOCOL_NOT_COVERED`; the spec's series rule accepts only
the first, so the server records "no applicable model" for the others, as the simulation
gives them no AI result.

The spec (:func:`spec_document`) is not one of the shipped specs: a site installs it only on
a server started for a replay (``triage simulate --replay-setup`` writes it into a spec
folder for ``TRIAGE_MODEL_SPECS_DIR`` and sets ``TRIAGE_MODELS`` to this model alone). It has
no weights and reads no pixels; its findings are what the simulation drew, never a reading
of an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from triage.domain import Finding, ModelRef
from triage.models.base import FindingModel, ModelOutput
from triage.models.catalog import critical_findings
from triage.models.registry import RuntimeOptions
from triage.models.spec import ModelSpec
from triage.preprocess.errors import InputContractError

__all__ = [
    "KIND",
    "MODALITIES",
    "MODEL_NAME",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "PROTOCOL",
    "PROTOCOL_NOT_COVERED",
    "ReplayFindingModel",
    "SimulatedResult",
    "build",
    "read_result",
    "spec_document",
    "write_result",
]

MODEL_NAME = "simulation-replay"
"""The model's name (``TRIAGE_MODELS``, findings' ``model.name``)."""

KIND = "simulation-replay"
"""The spec's kind (the registry's factory key)."""

PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "TRIAGE SIMULATION REPLAY"
_CODE, _FLAG, _SCORE, _SEVERITY = 0x01, 0x02, 0x03, 0x04

PROTOCOL = "TRIAGE SIMULATION REPLAY"
"""ProtocolName of a replayed study the simulated AI covers (the spec accepts these)."""

PROTOCOL_NOT_COVERED = "TRIAGE SIMULATION REPLAY NO AI"
"""ProtocolName of a replayed study of a modality no simulated model covers."""

MODALITIES: tuple[str, ...] = ("CR", "DX", "CT", "MR", "US", "NM", "PT", "XA", "MG", "RF", "OT")
"""DICOM modalities a replay sends (a simulated modality's first word, else ``OT``)."""

REGIONS: tuple[str, ...] = (
    "HEAD",
    "NECK",
    "CHEST",
    "ABDOMEN",
    "PELVIS",
    "SPINE",
    "EXTREMITY",
    "BREAST",
)
"""Body regions the spec accepts (every region the router knows)."""


@dataclass(frozen=True)
class SimulatedResult:
    """The simulated AI result of one study, as the replay writes it into the instance.

    Attributes:
        finding: the finding code.
        flag: whether the simulated AI flags it.
        score: its score in [0, 1].
        severity: ``high`` / ``standard`` or None (not graded).
    """

    finding: str
    flag: bool
    score: float
    severity: str | None = None


def write_result(ds: Dataset, result: SimulatedResult) -> None:
    """Write ``result`` into ``ds``'s private block (see the module doc)."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(_CODE, "LO", result.finding)
    block.add_new(_FLAG, "CS", "Y" if result.flag else "N")
    block.add_new(_SCORE, "DS", f"{result.score:.6g}")
    if result.severity is not None:
        block.add_new(_SEVERITY, "CS", result.severity.upper())


def read_result(ds: Dataset) -> SimulatedResult | None:
    """The simulated result written into ``ds``, or None when it carries no replay block.

    Raises:
        InputContractError: the block is there but a value is missing or malformed.
    """
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    try:
        code = str(block[_CODE].value).strip()
        flag_text = str(block[_FLAG].value).strip().upper()
        score = float(block[_SCORE].value)
    except (KeyError, TypeError, ValueError):
        raise InputContractError(
            "the simulation replay block lacks the finding, flag or score"
        ) from None
    if flag_text not in ("Y", "N") or not 0.0 <= score <= 1.0 or not code:
        raise InputContractError("the simulation replay block holds an invalid flag or score")
    severity = None
    if _SEVERITY in block:
        severity = str(block[_SEVERITY].value).strip().lower() or None
    return SimulatedResult(code, flag_text == "Y", score, severity)


def spec_document() -> dict[str, Any]:
    """The replay model's spec as a JSON document (what the set-up writes to a spec folder).

    Its findings are the installed models' critical findings (intracranial haemorrhage,
    pneumothorax) with the same ``escalate_to``, so the policy escalates a replayed flag as
    it would the real model's.
    """
    codes = list(critical_findings())
    return {
        "name": MODEL_NAME,
        "version": "1.0.0",
        "kind": KIND,
        "task": "classification",
        "accepts": {
            "modalities": list(MODALITIES),
            "body_regions": list(REGIONS),
            "views": [],
            "series_rule": {
                "modalities": list(MODALITIES),
                "exclude_image_type": [],
                "exclude_secondary_capture": False,
                "min_images": 1,
                "conditions": {"ProtocolName": f"^{PROTOCOL}$"},
            },
        },
        "input": {
            "intensity": "presentation",
            "value_range": [0.0, 1.0],
            "spacing_mm": None,
            "shape": None,
            "description": "SIMULATION ONLY: reads no pixels; reports the finding that"
            " `triage simulate --replay` drew and wrote into the instance (private group"
            " 0071, creator 'TRIAGE SIMULATION REPLAY'). Install only on a server started"
            " for a replay.",
        },
        "outputs": codes,
        "findings": [
            {
                "code": code,
                "label": f"{code.replace('_', ' ').capitalize()} (simulated)",
                "outputs": [code],
                "threshold": 0.5,
                "unit": "score",
                "escalate_to": "critical",
            }
            for code in codes
        ],
        "weights": [],
        "licence": "Apache-2.0",
        "citation": "",
        "source": "triage.simulate.replay_model (simulation only, no weights)",
        "card": "docs/simulation.md",
    }


class ReplayFindingModel(FindingModel[SimulatedResult | None, None]):
    """Reports the finding the simulator drew for the study (SIMULATION ONLY).

    ``prepare`` reads the header of the series' first file (never its pixels); a file without
    the replay block, or with a finding this spec does not list, breaks the input contract
    (the study is ``failed`` with that reason, as any model failing on its input).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def prepare(self, paths: Sequence[Path]) -> SimulatedResult | None:
        if not paths:
            raise InputContractError("the series has no file")
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        result = read_result(ds)
        if result is None:
            raise InputContractError(
                "not a replayed study: no simulation replay block (this model is for"
                " `triage simulate --replay` only)"
            )
        known = [f.code for f in self.spec.findings]
        if result.finding not in known:
            raise InputContractError(
                f"the replay block names the finding {result.finding!r}, not one of {known}"
            )
        return result

    def predict(self, prepared: SimulatedResult | None) -> None:
        return None

    def interpret(
        self, prepared: SimulatedResult | None, raw: None, series_uid: str
    ) -> ModelOutput:
        assert prepared is not None
        finding = Finding(
            prepared.finding,
            prepared.flag,
            prepared.score,
            {},
            ModelRef(self.spec.name, self.spec.version),
            details={"simulated": True},
            severity=prepared.severity,
        )
        return ModelOutput(findings=[finding])

    def weights_sha256(self) -> tuple[str, ...]:
        return ()

    def describe(self) -> dict[str, Any]:
        return {"device": "none", "note": "simulation only: reads the replay's header block"}


def build(spec: ModelSpec, options: RuntimeOptions) -> ReplayFindingModel:
    """The registry's factory for ``kind = "simulation-replay"`` (thresholds do not apply:
    the flag is the one the simulation drew)."""
    return ReplayFindingModel(spec)
