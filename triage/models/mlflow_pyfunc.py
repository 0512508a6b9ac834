"""A registered model version as an MLflow pyfunc model, for use outside ``triage serve``.

``triage-train`` logs each model version with this wrapper, its spec and its weight files
as artifacts, and a signature: the input is a table of series folders (``series_dir``: a
folder holding one DICOM series), the output one row per finding. ``mlflow.pyfunc.
load_model("models:/blast-ct-v1@champion").predict(df)`` then runs the model exactly as
serving does (the same factory, preprocessing and interpretation). Serving itself reads
only the spec and weight artifacts (:mod:`triage.models.mlflow_registry`).

Imports mlflow: imported only by training and by users loading a pyfunc model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

__all__ = ["SIGNATURE", "FindingModelPyfunc"]

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "series_dir")]),
    outputs=Schema(
        [
            ColSpec("string", "series_dir"),
            ColSpec("string", "finding"),
            ColSpec("double", "score"),
            ColSpec("boolean", "flagged"),
            ColSpec("string", "model"),
            ColSpec("string", "version"),
            ColSpec("string", "error"),
        ]
    ),
)


class FindingModelPyfunc(PythonModel):  # type: ignore[misc]
    """Runs a triage model spec on series folders (artifacts ``spec`` and ``weights``)."""

    def load_context(self, context: Any) -> None:
        from triage.models.registry import ModelRegistry, RuntimeOptions

        spec_path = Path(context.artifacts["spec"])
        spec = ModelSpec.from_json(json.loads(spec_path.read_text("utf-8")), source="pyfunc")
        store = ModelStore(
            spec_path.parent / "verified", mirror=context.artifacts["weights"], allow_download=False
        )
        self._model = ModelRegistry([spec], RuntimeOptions(store=store)).model(spec.name)

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        import pandas as pd

        from triage.preprocess.errors import PreprocessError

        rows: list[dict[str, Any]] = []
        spec = self._model.spec
        for folder in model_input["series_dir"]:
            paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
            try:
                output = self._model.run(paths, series_uid="")
            except (PreprocessError, ValueError, OSError) as exc:
                rows.append(
                    {
                        "series_dir": folder,
                        "finding": "",
                        "score": float("nan"),
                        "flagged": False,
                        "model": spec.name,
                        "version": spec.version,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                continue
            for f in output.findings:
                rows.append(
                    {
                        "series_dir": folder,
                        "finding": f.finding,
                        "score": float(f.score),
                        "flagged": bool(f.flag),
                        "model": spec.name,
                        "version": spec.version,
                        "error": "",
                    }
                )
        return pd.DataFrame(rows, columns=[c.name for c in SIGNATURE.outputs.inputs])
