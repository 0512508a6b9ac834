"""MLflow: where runs and registered models are kept, and logging a model version.

By default the tracking and registry store is a SQLite file under the data directory
(``<data_dir>/mlflow/mlflow.db``, artifacts beside it in ``<data_dir>/mlflow/artifacts``);
``--registry-uri`` (or ``TRIAGE_MODEL_REGISTRY_URI``, the setting serving reads) points at
another store or a tracking server. Every model version is logged as an MLflow pyfunc model
(:class:`triage.models.mlflow_pyfunc.FindingModelPyfunc`) with a signature, its spec and its
weight files as artifacts, and registered under the spec's name.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from triage.config import Settings
from triage.models.mlflow_registry import SPEC_ARTIFACT, WEIGHTS_ARTIFACT

log = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT",
    "client",
    "default_uri",
    "ensure_experiment",
    "log_metrics",
    "log_model_version",
]

#: The experiment training and evaluation runs go to (unless told otherwise).
EXPERIMENT = "triage"


def default_uri(settings: Settings) -> str:
    """The registry serving reads when set, else the SQLite store under the data
    directory."""
    if settings.model_registry_uri:
        return settings.model_registry_uri
    folder = settings.data_dir / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file (else the server decides)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` (tracking and registry), also made the default of the
    ``mlflow`` module for this process."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str = EXPERIMENT) -> str:
    """The experiment's id, created (with its artifacts beside a SQLite store) if needed."""
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(c.create_experiment(name, artifact_location=_artifact_root(uri)))


def log_metrics(c: Any, run_id: str, metrics: Mapping[str, float], *, prefix: str = "") -> None:
    """Log the finite metrics on a run (an undefined metric is better absent than NaN)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    clean = [
        Metric(f"{prefix}{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and math.isfinite(float(v))
    ]
    if clean:
        c.log_batch(run_id, metrics=clean)


def log_model_version(run_id: str, candidate: Path, *, register: bool = True) -> tuple[str, str]:
    """Log the candidate folder (:mod:`training.candidate`) as the run's MLflow model and
    register it under the spec's name.

    Returns:
        (model URI, registered version; ``""`` when not registered).
    """
    import mlflow

    from triage.models.mlflow_pyfunc import SIGNATURE, FindingModelPyfunc

    spec_doc = json.loads((candidate / SPEC_ARTIFACT).read_text("utf-8"))
    name = str(spec_doc["name"])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(spec_doc, "model_spec.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FindingModelPyfunc(),
            artifacts={
                "spec": str(candidate / SPEC_ARTIFACT),
                "weights": str(candidate / WEIGHTS_ARTIFACT),
            },
            signature=SIGNATURE,
            registered_model_name=name if register else None,
            pip_requirements=["triage[train]"],
        )
    version = str(info.registered_model_version or "") if register else ""
    if version:
        c = client(mlflow.get_tracking_uri())
        c.set_model_version_tag(name, version, "spec_version", str(spec_doc["version"]))
        c.set_model_version_tag(name, version, "run_id", run_id)
    return str(info.model_uri), version
