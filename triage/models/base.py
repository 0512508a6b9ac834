"""The interface every finding model implements, and what a run of one returns.

A model is a :class:`FindingModel`: it has a spec (:mod:`triage.models.spec`); it
``prepare``s the files of the series the router chose for it (through ``triage.preprocess``),
``predict``s on the prepared input, and ``interpret``s its raw output as study-level findings
and overlays. :meth:`FindingModel.run` chains the three, times them and stamps every finding
with the model's name, version and the sha256 of the weight files that produced it.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from triage.domain import Finding, ModelRef
from triage.models.spec import ModelSpec
from triage.results import Overlay

__all__ = ["FindingModel", "ModelOutput"]

PreparedT = TypeVar("PreparedT")
RawT = TypeVar("RawT")


@dataclass
class ModelOutput:
    """What one model found in one series.

    Attributes:
        findings: study-level findings, one per finding of the spec.
        overlays: finding code -> the overlay that shows it.
        timing_s: seconds per stage (``prepare``, ``predict``, ``interpret``).
    """

    findings: list[Finding]
    overlays: dict[str, Overlay] = field(default_factory=dict)
    timing_s: dict[str, float] = field(default_factory=dict)


class FindingModel(abc.ABC, Generic[PreparedT, RawT]):
    """A model that reads one series and raises study-level findings.

    Subclasses set :attr:`spec` and implement the three stages; the registry builds them
    from their spec (see :mod:`triage.models.registry`).
    """

    spec: ModelSpec

    @abc.abstractmethod
    def prepare(self, paths: Sequence[Path]) -> PreparedT:
        """Turn the series' files into the model's input (through ``triage.preprocess``).

        Raises:
            PreprocessError: the series cannot be read (``IncompleteSeriesError`` when it is
                too short, ``InputContractError`` when the result breaks the contract).
        """

    @abc.abstractmethod
    def predict(self, prepared: PreparedT) -> RawT:
        """Run the network(s) on the prepared input.

        Raises:
            InputContractError: the input breaks the model's contract.
            ModelWeightsError: the weights are missing or not the expected files.
        """

    @abc.abstractmethod
    def interpret(self, prepared: PreparedT, raw: RawT, series_uid: str) -> ModelOutput:
        """Findings (one per finding of the spec) and overlays from the raw output."""

    @abc.abstractmethod
    def weights_sha256(self) -> tuple[str, ...]:
        """SHA-256 of each weight file the last :meth:`predict` used (run order)."""

    def load(self) -> float:
        """Load the weights now (else on the first prediction); return the seconds spent."""
        return 0.0

    @property
    def model_ref(self) -> ModelRef:
        """Name, version and weights of this model, for findings and DICOM outputs."""
        return ModelRef(self.spec.name, self.spec.version, self.weights_sha256())

    def run(self, paths: Sequence[Path], series_uid: str) -> ModelOutput:
        """Prepare, predict and interpret one series; every finding records this model."""
        t0 = time.perf_counter()
        prepared = self.prepare(paths)
        t1 = time.perf_counter()
        raw = self.predict(prepared)
        t2 = time.perf_counter()
        output = self.interpret(prepared, raw, series_uid)
        t3 = time.perf_counter()
        ref = self.model_ref
        output.findings = [
            dataclasses.replace(
                f,
                model=ref,
                details={**f.details, "SeriesInstanceUID": series_uid},
            )
            for f in output.findings
        ]
        output.timing_s = {
            "prepare": round(t1 - t0, 3),
            "predict": round(t2 - t1, 3),
            "interpret": round(t3 - t2, 3),
        }
        return output

    def describe(self) -> dict[str, Any]:
        """Runtime facts for ``triage models`` (device, precision...)."""
        return {}
