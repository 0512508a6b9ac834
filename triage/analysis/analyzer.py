"""Analysis of one study: route its series to the models, run each, collect the findings.

One code path serves the background worker (``triage serve``) and ``triage predict``.
Routing (which model reads which series) is ``triage.preprocess.routing``, driven by the
acceptance rules in each installed model's spec. Every model that accepts a series of the
study runs, each failing open on its own: one model's failure (missing weights, a series it
cannot read, a bug) is recorded with its reason and never hides another model's findings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.errors import InvalidDicomError

from triage.analysis.files import SeriesFiles
from triage.config import Settings
from triage.domain import AIStatus, Finding
from triage.models.catalog import load_specs
from triage.models.registry import ModelRegistry, RuntimeOptions
from triage.models.store import ModelStore, ModelWeightsError
from triage.preprocess.errors import IncompleteSeriesError, PreprocessError
from triage.preprocess.routing import RoutingDecision, route_study
from triage.preprocess.series import SeriesInfo, read_series_info
from triage.results import Overlay

log = logging.getLogger(__name__)

__all__ = ["Analyzer", "ModelRun", "StudyAnalysis", "route_series"]

#: Errors a model run ends with that say what is wrong with the input or the set-up; any
#: other exception is a bug, logged with its traceback and reported as an internal error.
_EXPECTED_ERRORS = (PreprocessError, ModelWeightsError, InvalidDicomError, ValueError, OSError)


@dataclass
class ModelRun:
    """How one model's run on one series ended.

    Attributes:
        model: the model's name.
        version: its version.
        SeriesInstanceUID: the series it read.
        status: ``ok``, ``failed`` or ``incomplete_series``.
        error: why it did not end ``ok`` (no patient data).
        timing_s: seconds per stage.
    """

    model: str
    version: str
    SeriesInstanceUID: str
    status: AIStatus
    error: str | None = None
    timing_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "SeriesInstanceUID": self.SeriesInstanceUID,
            "status": self.status.value,
            "error": self.error,
            "timing_s": dict(self.timing_s),
        }


@dataclass
class StudyAnalysis:
    """The outcome of analysing one study.

    Attributes:
        StudyInstanceUID: the study.
        ai_status: ``ok`` (every model that applies ran), ``partial`` (some ran, some
            failed), ``failed``, ``incomplete_series`` or ``no_applicable_model``.
        findings: every model's findings.
        error: why models failed, ``"<model>: <reason>"`` joined by ``"; "``.
        routing: the router's decision (each model's entry carries its run's outcome).
        overlays: finding code -> overlay.
        runs: one per model that ran.
    """

    StudyInstanceUID: str
    ai_status: AIStatus
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)
    overlays: dict[str, Overlay] = field(default_factory=dict)
    runs: list[ModelRun] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "StudyInstanceUID": self.StudyInstanceUID,
            "ai_status": self.ai_status.value,
            "error": self.error,
            "routing": self.routing,
            "runs": [r.to_json() for r in self.runs],
            "findings": [f.to_json() for f in self.findings],
        }


def _study_status(runs: Sequence[ModelRun]) -> AIStatus:
    statuses = {r.status for r in runs}
    if statuses == {AIStatus.ok}:
        return AIStatus.ok
    if AIStatus.ok in statuses:
        return AIStatus.partial
    if statuses == {AIStatus.incomplete_series}:
        return AIStatus.incomplete_series
    return AIStatus.failed


class Analyzer:
    """Runs the installed models on studies; each model is built once and reused."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @classmethod
    def from_settings(cls, settings: Settings) -> Analyzer:
        """The installed models (shipped specs, the site's folder, ``TRIAGE_MODELS``) with
        the site's store, device, ensemble size and thresholds.

        Raises:
            SpecError: a spec file is invalid or ``TRIAGE_MODELS`` names an unknown model.
        """
        store = ModelStore(
            cache_dir=settings.resolved_model_cache_dir,
            mirror=settings.model_mirror,
            pins=settings.weight_sha256,
        )
        options = RuntimeOptions(
            store=store,
            device=settings.device,
            precision=settings.precision,
            members=settings.ensemble_members,
            thresholds=settings.finding_thresholds,
        )
        specs = load_specs(settings.model_specs_dir, settings.models)
        return cls(ModelRegistry(specs, options))

    def warm_up(self) -> None:
        """Build every installed model now (imports its libraries; weights still load on
        first use), so that the first study does not pay for it."""
        for spec in self.registry.specs:
            try:
                self.registry.model(spec.name)
            except Exception:  # a model that cannot be built fails open on its studies
                log.exception("model %s could not be built", spec.name)

    def analyze(self, study_uid: str, series: Sequence[SeriesFiles]) -> StudyAnalysis:
        """Analyse one study. Never raises: failures become a status and an error."""
        routing: dict[str, Any] = {}
        try:
            decision, files = route_series(series, self.registry)
            routing = decision.to_json()
        except Exception as exc:  # fail open: the study stays on the worklist
            log.exception("routing failed unexpectedly")
            error = f"internal error ({type(exc).__name__})"
            return StudyAnalysis(study_uid, AIStatus.failed, error=error, routing=routing)
        for r in decision.routes:
            log.info("routing %s: %s", r.model, r.reason)
        if not decision.runs:
            if decision.incomplete:
                # A model would read this study, but its series is too short (a partial
                # transfer, a few slices): say so rather than "no applicable model".
                why = decision.incomplete[0].reason
                return StudyAnalysis(
                    study_uid, AIStatus.incomplete_series, error=why, routing=routing
                )
            return StudyAnalysis(study_uid, AIStatus.no_applicable_model, routing=routing)
        analysis = StudyAnalysis(study_uid, AIStatus.ok, routing=routing)
        for route in decision.runs:
            assert route.series is not None
            chosen = files[route.series.SeriesInstanceUID]
            run, output_findings, overlays = self._run_model(route.model, chosen)
            analysis.runs.append(run)
            analysis.findings.extend(output_findings)
            analysis.overlays.update(overlays)
        for entry in routing.get("models", []):
            entry["version"] = self.registry.spec(entry["model"]).version
            for run in analysis.runs:
                if run.model == entry.get("model"):
                    entry["version"] = run.version
                    entry["status"] = run.status.value
                    entry["error"] = run.error
                    entry["timing_s"] = dict(run.timing_s)
        analysis.ai_status = _study_status(analysis.runs)
        errors = [f"{r.model}: {r.error}" for r in analysis.runs if r.error]
        analysis.error = "; ".join(errors)[:2000] or None
        return analysis

    def _run_model(
        self, name: str, chosen: SeriesFiles
    ) -> tuple[ModelRun, list[Finding], dict[str, Overlay]]:
        spec = self.registry.spec(name)
        run = ModelRun(spec.name, spec.version, chosen.SeriesInstanceUID, AIStatus.ok)
        try:
            model = self.registry.model(name)
            # The version that runs (a registry may have replaced it since routing).
            run.version = model.spec.version
            output = model.run(chosen.paths, chosen.SeriesInstanceUID)
        except IncompleteSeriesError as exc:
            log.warning("%s: incomplete series: %s", name, type(exc).__name__)
            run.status, run.error = AIStatus.incomplete_series, str(exc)[:1000]
            return run, [], {}
        except _EXPECTED_ERRORS as exc:
            log.warning("%s failed: %s", name, type(exc).__name__)
            run.status, run.error = AIStatus.failed, str(exc)[:1000]
            return run, [], {}
        except Exception as exc:  # fail open: the other models' findings still count
            log.exception("%s failed unexpectedly", name)
            run.status, run.error = AIStatus.failed, f"internal error ({type(exc).__name__})"
            return run, [], {}
        run.timing_s = output.timing_s
        return run, output.findings, output.overlays


def route_series(
    series: Sequence[SeriesFiles], registry: ModelRegistry
) -> tuple[RoutingDecision, dict[str, SeriesFiles]]:
    """Summarise each series from its headers and let the router pick each model's series.

    Returns:
        The decision and the files of each series by SeriesInstanceUID.
    """
    infos: list[SeriesInfo] = []
    files: dict[str, SeriesFiles] = {}
    for se in series:
        try:
            info = read_series_info(se.paths)
        except ValueError:
            continue  # no readable file: nothing a model could read
        infos.append(info)
        files[info.SeriesInstanceUID] = se
    models = [(spec.name, spec.accepts) for spec in registry.specs]
    return route_study(infos, models), files
