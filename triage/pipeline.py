"""Analysis of one study: route its series to the models that apply, preprocess, infer.

One code path serves the background worker (``triage serve``) and ``triage predict``.
Routing (which model reads which series) is ``triage.preprocess.routing``, driven by the
acceptance and series rule in each installed model's spec.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from triage.config import Settings
from triage.domain import AIStatus, Finding
from triage.models.spec import INSTALLED_MODELS
from triage.models.store import ModelWeightsError
from triage.preprocess.ct import IncompleteSeriesError, PreprocessError, prepare_head_ct
from triage.preprocess.routing import RoutingDecision, route_study
from triage.preprocess.series import SeriesInfo, read_series_info
from triage.results import Overlay

log = logging.getLogger(__name__)


@dataclass
class SeriesFiles:
    """The files of one series, as stored."""

    SeriesInstanceUID: str
    paths: list[Path]


@dataclass
class StudyAnalysis:
    StudyInstanceUID: str
    ai_status: AIStatus
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)
    overlays: dict[str, Overlay] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "StudyInstanceUID": self.StudyInstanceUID,
            "ai_status": self.ai_status.value,
            "error": self.error,
            "routing": self.routing,
            "findings": [f.to_json() for f in self.findings],
        }


def read_header(path: Path) -> dict[str, str]:
    """The attributes that group a file into its study and series (pixels not read)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {k: str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID")}


class Analyzer:
    """Runs the models on studies; models are loaded once, on first use, and reused."""

    def __init__(
        self,
        *,
        model_cache_dir: Path,
        model_mirror: str | None,
        device: str = "auto",
        members: int | None = None,
        threshold_ml: float | None = None,
    ) -> None:
        self._cache_dir = model_cache_dir
        self._mirror = model_mirror
        self._device = device
        self._members = members
        self._threshold_ml = threshold_ml
        self._model: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Analyzer:
        return cls(
            model_cache_dir=settings.resolved_model_cache_dir,
            model_mirror=settings.model_mirror,
            device=settings.device,
            members=settings.ensemble_members,
            threshold_ml=settings.ich_threshold_ml,
        )

    def haemorrhage_model(self) -> Any:
        with self._lock:
            if self._model is None:
                from triage.models.haemorrhage import HaemorrhageModel
                from triage.models.spec import BLAST_CT_V1
                from triage.models.store import ModelStore

                self._model = HaemorrhageModel(
                    ModelStore(cache_dir=self._cache_dir, mirror=self._mirror),
                    spec=BLAST_CT_V1,
                    members=self._members,  # None: 1 on CPU, 12 on CUDA
                    device=self._device,
                )
            return self._model

    def analyze(self, study_uid: str, series: Sequence[SeriesFiles]) -> StudyAnalysis:
        """Analyse one study. Never raises: failures become ``ai_status=failed``."""
        routing: dict[str, Any] = {}
        try:
            decision, files = route_series(series)
            routing = decision.to_json()
            for r in decision.routes:
                log.info("routing %s: %s", r.model, r.reason)
            if not decision.runs and decision.incomplete:
                # A model would read this study, but its series is too short (a partial
                # transfer, a few slices): say so rather than "no applicable model".
                why = decision.incomplete[0].reason
                return StudyAnalysis(
                    study_uid, AIStatus.incomplete_series, error=why, routing=routing
                )
            if not decision.runs:
                return StudyAnalysis(study_uid, AIStatus.no_applicable_model, routing=routing)
            run = decision.runs[0]  # one model today: the haemorrhage model
            assert run.series is not None
            chosen = files[run.series.SeriesInstanceUID]
            return self._run_haemorrhage(study_uid, chosen, routing)
        except IncompleteSeriesError as exc:
            log.warning("incomplete series: %s", type(exc).__name__)
            return StudyAnalysis(
                study_uid, AIStatus.incomplete_series, error=str(exc)[:500], routing=routing
            )
        except (PreprocessError, ModelWeightsError, InvalidDicomError, ValueError, OSError) as exc:
            log.warning("analysis failed: %s", type(exc).__name__)
            return StudyAnalysis(study_uid, AIStatus.failed, error=str(exc)[:500], routing=routing)
        except Exception as exc:  # fail open: the study stays on the worklist
            log.exception("analysis failed unexpectedly")
            error = f"internal error ({type(exc).__name__})"
            return StudyAnalysis(study_uid, AIStatus.failed, error=error, routing=routing)

    def _run_haemorrhage(
        self, study_uid: str, chosen: SeriesFiles, routing: dict[str, Any]
    ) -> StudyAnalysis:
        from triage.models.haemorrhage import to_finding

        model = self.haemorrhage_model()
        t0 = time.perf_counter()
        head = prepare_head_ct(chosen.paths)
        t1 = time.perf_counter()
        result = model.predict(head.hu, head.head_mask, head.spacing_mm)
        t2 = time.perf_counter()
        finding = to_finding(result, threshold_ml=self._threshold_ml)
        finding.details.update(
            {
                "SeriesInstanceUID": chosen.SeriesInstanceUID,
                "preprocess_s": round(t1 - t0, 2),
                "inference_s": round(t2 - t1, 2),
            }
        )
        overlay = Overlay(
            labels=result.labels.astype(np.uint8),
            hu=np.clip(head.hu, -1024, 3071).astype(np.int16),
            classes=("IPH", "EAH", "oedema", "IVH"),
            crop_start=head.crop_start,
            SeriesInstanceUID=chosen.SeriesInstanceUID,
        )
        return StudyAnalysis(
            study_uid,
            AIStatus.ok,
            findings=[finding],
            routing=routing,
            overlays={finding.finding: overlay},
        )


def route_series(
    series: Sequence[SeriesFiles],
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
    models = [(spec.name, spec.accepts) for spec in INSTALLED_MODELS]
    return route_study(infos, models), files


def group_files(paths: Iterable[Path]) -> dict[str, list[SeriesFiles]]:
    """Group DICOM files (folders expanded recursively) by study and series.

    Files that are not DICOM are skipped; returns {StudyInstanceUID: [SeriesFiles, ...]}.
    """
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            files.append(p)
    series: dict[tuple[str, str], SeriesFiles] = {}
    for f in files:
        try:
            header = read_header(f)
        except (InvalidDicomError, OSError, ValueError, KeyError):
            log.info("skipping a file that is not DICOM")
            continue
        key = (header["StudyInstanceUID"], header["SeriesInstanceUID"])
        if key not in series:
            series[key] = SeriesFiles(header["SeriesInstanceUID"], [])
        series[key].paths.append(f)
    studies: dict[str, list[SeriesFiles]] = defaultdict(list)
    for (study_uid, _), se in series.items():
        studies[study_uid].append(se)
    return dict(studies)
