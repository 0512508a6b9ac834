"""A candidate model version on disk: its spec and weight files, as serving will read them.

Layout (the same inside the MLflow model's artifacts, see
:mod:`triage.models.mlflow_registry`)::

    <candidate>/spec.json                 the model spec (sha256 of every weight file,
                                          thresholds chosen on validation data)
    <candidate>/weights/<name>/<file>     the weight files
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from triage.models.mlflow_registry import SPEC_ARTIFACT, WEIGHTS_ARTIFACT
from triage.models.spec import FindingSpec, ModelSpec, WeightArtifact
from triage.models.store import ModelStore, sha256_file

__all__ = ["candidate_spec", "read_candidate", "write_candidate"]


def candidate_spec(
    base: ModelSpec,
    *,
    version: str,
    weights: Sequence[tuple[str, str]],
    thresholds: Mapping[str, float] | None = None,
    provenance: Mapping[str, object] | None = None,
) -> ModelSpec:
    """A new version of ``base``: same name, kind, acceptance and contract; its own weight
    files (``(filename, sha256)``, in member order), thresholds per finding code where
    given, and where it came from under ``params["training"]``."""
    findings: list[FindingSpec] = []
    for f in base.findings:
        t = (thresholds or {}).get(f.code)
        findings.append(f if t is None else dataclasses.replace(f, threshold=float(t)))
    params = dict(base.params)
    if provenance:
        params["training"] = dict(provenance)
    return dataclasses.replace(
        base,
        version=version,
        findings=tuple(findings),
        weights=tuple(WeightArtifact(filename=n, url="", sha256=s) for n, s in weights),
        member_order=(),
        params=params,
    )


def write_candidate(spec: ModelSpec, files: Mapping[str, Path], out: Path) -> Path:
    """Write ``spec.json`` and copy the weight files (``filename -> path``) into ``out``.

    Raises:
        ValueError: a file's sha256 is not the one the spec records, or one is missing.
    """
    folder = out / WEIGHTS_ARTIFACT / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    for artifact in spec.weights:
        source = files.get(artifact.filename)
        if source is None:
            raise ValueError(f"no file given for {artifact.filename}")
        if sha256_file(source) != artifact.sha256:
            raise ValueError(f"{artifact.filename}: sha256 differs from the spec's")
        if source.resolve() != (folder / artifact.filename).resolve():
            shutil.copyfile(source, folder / artifact.filename)
    (out / SPEC_ARTIFACT).write_text(json.dumps(spec.to_json(), indent=2) + "\n", "utf-8")
    return out


def read_candidate(out: Path) -> tuple[ModelSpec, ModelStore]:
    """The spec and a store reading the candidate's own weight files (verified by sha256)."""
    doc = json.loads((out / SPEC_ARTIFACT).read_text("utf-8"))
    spec = ModelSpec.from_json(doc, source=str(out / SPEC_ARTIFACT))
    store = ModelStore(out / "verified", mirror=out / WEIGHTS_ARTIFACT, allow_download=False)
    return spec, store
