"""Stand-in models for tests that need a model to fail, or its finding without its network
(registered through the registry's ``factories``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from triage.domain import Finding, ModelRef
from triage.models.base import FindingModel, ModelOutput
from triage.models.registry import RuntimeOptions
from triage.models.spec import ModelSpec


class Exploding(FindingModel[None, None]):
    """A model whose every run raises (a bug, a driver crash): it must not hide the others."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def prepare(self, paths: Sequence[Path]) -> None:
        raise RuntimeError("boom")

    def predict(self, prepared: None) -> None:  # pragma: no cover - never reached
        return None

    def interpret(self, prepared: None, raw: None, series_uid: str) -> ModelOutput:
        raise AssertionError("never reached")  # pragma: no cover

    def weights_sha256(self) -> tuple[str, ...]:
        return ()


class FixedHaemorrhage(FindingModel[None, None]):
    """Stands in for BLAST-CT where a test needs its finding, not its network."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def prepare(self, paths: Sequence[Path]) -> None:
        return None

    def predict(self, prepared: None) -> None:
        return None

    def interpret(self, prepared: None, raw: None, series_uid: str) -> ModelOutput:
        finding = Finding(
            "intracranial_haemorrhage",
            True,
            0.9,
            {"IPH": 40.0},
            ModelRef("x", "x"),
            severity="high",
        )
        return ModelOutput(findings=[finding])

    def weights_sha256(self) -> tuple[str, ...]:
        return ("0" * 64,)


def exploding(spec: ModelSpec, options: RuntimeOptions) -> Exploding:
    return Exploding(spec)


def fixed_haemorrhage(spec: ModelSpec, options: RuntimeOptions) -> FixedHaemorrhage:
    return FixedHaemorrhage(spec)
