"""Analysis of one study: route its series to the models that apply, preprocess, infer.

One code path serves the background worker (``triage serve``) and ``triage predict``.
The router here is the issue-2 version: a head CT goes to the haemorrhage model; issue 4
replaces it with declarative series rules carried by each model's spec.
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
from triage.models.store import ModelWeightsError
from triage.preprocess.ct import PreprocessError, prepare_head_ct
from triage.results import Overlay

log = logging.getLogger(__name__)

# Words that mark a head/brain study, in the spellings senders use (free text included).
HEAD_WORDS: tuple[str, ...] = (
    "HEAD",
    "BRAIN",
    "SKULL",
    "CRANI",
    "CEREBR",
    "KOPF",
    "SCHADEL",
    "SCHAEDEL",
    "SCHÄDEL",
    "HIRN",
    "CRANE",
    "CERVEAU",
    "CABEZA",
    "ENCEF",
    "NEURO",
)
ROUTING_KEYWORDS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")


@dataclass
class SeriesFiles:
    """The files of one series, as stored."""

    SeriesInstanceUID: str
    paths: list[Path]
    header: dict[str, str] = field(default_factory=dict)


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


# Body parts that are not the head: a series naming one of these is never sent to a head model.
OTHER_BODY_WORDS: tuple[str, ...] = (
    "CHEST",
    "THORAX",
    "LUNG",
    "ABD",
    "PELVI",
    "SPINE",
    "NECK",
    "CARDIAC",
    "HEART",
    "KNEE",
    "HAND",
    "FOOT",
    "ANGIO",
    "BODY",
    "THORAX",
    "BAUCH",
)
# A reconstruction field of view this small only fits a head (a body CT uses 350-500 mm).
HEAD_MAX_FOV_MM = 260.0


def read_header(path: Path) -> dict[str, str]:
    """The routing-relevant attributes of one file (pixels not read)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", *ROUTING_KEYWORDS)
    header = {k: str(ds.get(k, "") or "") for k in keys}
    fov = ds.get("ReconstructionDiameter")
    if not fov and ds.get("PixelSpacing") and ds.get("Columns"):
        fov = float(ds.PixelSpacing[1]) * int(ds.Columns)
    header["field_of_view_mm"] = f"{float(fov):.0f}" if fov else ""
    return header


def head_reason(header: dict[str, str]) -> str | None:
    """Why this series is a head, or None when it is not (or cannot be told)."""
    text = " ".join(header.get(k, "") for k in ROUTING_KEYWORDS).upper()
    if any(word in text for word in HEAD_WORDS):
        return "its body part or description names the head"
    if any(word in text for word in OTHER_BODY_WORDS):
        return None
    fov = header.get("field_of_view_mm")
    if fov and float(fov) <= HEAD_MAX_FOV_MM:
        return f"no body part given; its {fov} mm field of view fits only a head"
    return None


def route(series: Sequence[SeriesFiles]) -> tuple[SeriesFiles | None, dict[str, Any]]:
    """Pick the series the haemorrhage model runs on, with the reason."""
    reasons = {
        se.SeriesInstanceUID: head_reason(se.header)
        for se in series
        if se.header.get("Modality") == "CT"
    }
    candidates = [se for se in series if reasons.get(se.SeriesInstanceUID)]
    modalities = sorted({se.header.get("Modality", "") for se in series} - {""})
    if not candidates:
        if "CT" in modalities:
            reason = "CT study that is not recognisably of the head (body part, description)"
        else:
            reason = f"no model for modality {'/'.join(modalities) or 'unknown'}"
        return None, {"model": None, "reason": reason, "modalities": modalities}
    chosen = max(candidates, key=lambda se: len(se.paths))
    return chosen, {
        "model": "blast-ct-v1",
        "SeriesInstanceUID": chosen.SeriesInstanceUID,
        "reason": f"head CT ({reasons[chosen.SeriesInstanceUID]}); the series with the most "
        f"images of {len(candidates)} head CT series",
        "modalities": modalities,
    }


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
            for se in series:
                if not se.header and se.paths:
                    se.header = read_header(se.paths[0])
            chosen, routing = route(series)
            if chosen is None:
                return StudyAnalysis(study_uid, AIStatus.no_applicable_model, routing=routing)
            return self._run_haemorrhage(study_uid, chosen, routing)
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
        result = model.predict(head.hu, head.head_mask)
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
            series[key] = SeriesFiles(header["SeriesInstanceUID"], [], header)
        series[key].paths.append(f)
    studies: dict[str, list[SeriesFiles]] = defaultdict(list)
    for (study_uid, _), se in series.items():
        studies[study_uid].append(se)
    return dict(studies)
