"""Analysis of a study: route its series to every model that accepts one, run each model
(failing open on its own), and collect the findings (see docs/ARCHITECTURE.md)."""

from triage.analysis.analyzer import Analyzer, ModelRun, StudyAnalysis
from triage.analysis.files import SeriesFiles, group_files

__all__ = ["Analyzer", "ModelRun", "SeriesFiles", "StudyAnalysis", "group_files"]
