"""Model specifications: what a model accepts, its input contract, its outputs and findings,
and its weights.

A spec is data: each installed model has a JSON file (``triage/models/specs/*.json``, or a
site's own folder, see :mod:`triage.models.catalog`) parsed into a :class:`ModelSpec`. The
router picks series by ``accepts``, the model checks its input against ``input``, the
findings it raises and their thresholds and target priority classes are ``findings``, and the
model store resolves each :class:`WeightArtifact`. This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from triage.preprocess.series import SeriesRule

__all__ = [
    "FindingSpec",
    "InputContract",
    "ModelAcceptance",
    "ModelSpec",
    "SpecError",
    "WeightArtifact",
]


class SpecError(ValueError):
    """A model spec file is invalid (the message names the file and the field)."""


@dataclass(frozen=True)
class WeightArtifact:
    """One weight file.

    Attributes:
        filename: file name inside the model's store folder (``<spec name>/<filename>``).
        url: upstream download URL (commit-addressed where upstream offers one).
        sha256: expected SHA-256 (lower-case hex) when upstream publishes or we pinned it;
            None when no published hash exists: the store then records the hash of the first
            verified download and refuses any later file with another (trust on first use),
            unless the site pins one in ``TRIAGE_WEIGHT_SHA256``.
    """

    filename: str
    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class ModelAcceptance:
    """What a model reads: modalities, body regions, views (radiographs) and a series rule.

    The router (``triage.preprocess.routing``) reads these fields; it does not import this
    module.
    """

    modalities: tuple[str, ...]
    body_regions: tuple[str, ...]
    series_rule: SeriesRule = field(default_factory=SeriesRule)
    views: tuple[str, ...] = ()

    def describe(self) -> str:
        views = f" {'/'.join(self.views)}" if self.views else ""
        return f"{'/'.join(self.modalities)} {'/'.join(self.body_regions)}{views}"


@dataclass(frozen=True)
class InputContract:
    """The array a model's network takes, checked before every run.

    Attributes:
        intensity: the intensity convention: ``"HU"`` (Hounsfield units) or
            ``"presentation"`` (a radiograph's displayed grey scale, bright = dense).
        value_range: (low, high) of the values the network sees: for HU models the window
            clipped and mapped onto the network's range, for radiographs the range of the
            normalised image.
        spacing_mm: voxel or pixel spacing the input must have, (z, y, x) or (row, column);
            None when any spacing is accepted.
        shape: the input's fixed shape without batch (e.g. ``(1, 224, 224)``); None when it
            varies (a CT volume cropped to the head).
        description: one line on the convention, for the model card and ``triage models``.
    """

    intensity: Literal["HU", "presentation"]
    value_range: tuple[float, float]
    spacing_mm: tuple[float, ...] | None = None
    shape: tuple[int, ...] | None = None
    description: str = ""


@dataclass(frozen=True)
class FindingSpec:
    """One study-level finding a model raises.

    Attributes:
        code: the finding's code (``intracranial_haemorrhage``, ``pneumothorax``); the rest
            of the product learns finding names from here.
        label: its name for people.
        outputs: the output channels it is computed from.
        threshold: flag at or above this value (of ``unit``).
        unit: what the threshold measures (``ml`` of segmented volume, ``score``).
        escalate_to: the priority class a flagged finding lifts the study to
            (``critical``...); None: reported to the reader, never raises priority.
    """

    code: str
    label: str
    outputs: tuple[str, ...]
    threshold: float
    unit: str = "score"
    escalate_to: str | None = None

    @property
    def critical(self) -> bool:
        return self.escalate_to == "critical"


@dataclass(frozen=True)
class ModelSpec:
    """A model: name, version, weights, what it accepts, its contract and its findings.

    Attributes:
        name: registry name, also the store folder (e.g. ``blast-ct-v1``).
        version: version of this model (weights + pre/post-processing).
        kind: the implementation that runs it (a key of the registry's factories).
        task: ``segmentation`` or ``classification``.
        accepts: what it reads (see :class:`ModelAcceptance`).
        input: its input contract.
        outputs: output channel names, in output-index order.
        findings: the findings it raises, with thresholds and target priority classes.
        weights: weight files (ensemble members in member order 1..N).
        licence: SPDX licence identifier of the weights.
        citation: publication to cite.
        source: where the weights come from.
        card: path of the model card in the repository.
        member_order: ensemble members (1-based) in order of preference; asking for n members
            uses the first n. Empty means 1, 2, ..., N.
        params: implementation settings of ``kind`` (e.g. calibrated operating points).
    """

    name: str
    version: str
    kind: str
    task: Literal["segmentation", "classification"]
    accepts: ModelAcceptance
    input: InputContract
    outputs: tuple[str, ...]
    findings: tuple[FindingSpec, ...]
    weights: tuple[WeightArtifact, ...]
    licence: str
    citation: str
    source: str
    card: str = ""
    member_order: tuple[int, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def artifact(self, member: int) -> WeightArtifact:
        """The weight file of ensemble member ``member`` (1-based)."""
        if not 1 <= member <= len(self.weights):
            raise ValueError(f"{self.name} has members 1..{len(self.weights)}, not {member}")
        return self.weights[member - 1]

    def first_members(self, n: int) -> tuple[int, ...]:
        """The ``n`` preferred ensemble members (1-based numbers)."""
        if not 1 <= n <= len(self.weights):
            raise ValueError(f"members must be in 1..{len(self.weights)}, got {n}")
        order = self.member_order or tuple(range(1, len(self.weights) + 1))
        return order[:n]

    def finding(self, code: str) -> FindingSpec:
        """The finding ``code`` of this model."""
        for f in self.findings:
            if f.code == code:
                return f
        raise KeyError(f"{self.name} raises no finding {code!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the spec file's content; for registries and provenance)."""
        result: dict[str, Any] = json.loads(json.dumps(asdict(self)))  # tuples become lists
        return result

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, source: str = "spec") -> ModelSpec:
        """Parse and validate a spec document.

        Raises:
            SpecError: a field is missing or has the wrong type, an output named by a
                finding does not exist, or the ensemble order names unknown members.
        """
        try:
            spec = _ADAPTER.validate_python(dict(doc))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise SpecError(f"{source}: {problems}") from None
        for f in spec.findings:
            unknown = [o for o in f.outputs if o not in spec.outputs]
            if unknown:
                raise SpecError(f"{source}: finding {f.code} reads unknown outputs {unknown}")
        bad = [m for m in spec.member_order if not 1 <= m <= len(spec.weights)]
        if bad:
            raise SpecError(f"{source}: member_order names members {bad} that do not exist")
        codes = [f.code for f in spec.findings]
        if len(set(codes)) != len(codes):
            raise SpecError(f"{source}: a finding code appears twice")
        return spec


_ADAPTER: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)
