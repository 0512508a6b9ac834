"""A stand-in model for tests of worker processes: its analysis waits at a gate the test
opens, so that a test can stop or kill a worker in the middle of an analysis without
guessing how long one takes.

The spec (:func:`write_spec`) goes into a folder for ``TRIAGE_MODEL_SPECS_DIR`` with
``TRIAGE_MODELS=["gated-test"]``; its ``params.gate_dir`` is the gate. Each run of the model
writes ``entered-<pid>-<n>`` into the gate folder when its prediction starts, then waits
until a file named ``open`` is there, and reports one finding (not flagged).

Child processes run ``triage`` through :data:`TRIAGE`, which registers the model's kind with
the registry before the command starts (the product knows no test kinds).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from triage.domain import Finding, ModelRef
from triage.models.base import FindingModel, ModelOutput
from triage.models.registry import RuntimeOptions
from triage.models.spec import ModelSpec

NAME = "gated-test"
KIND = "gated-test"
FINDING = "gated_test_finding"
GATE_TIMEOUT_S = 300.0  # a test that never opens the gate fails the study, not the worker

#: ``triage`` in a child process, with this model's kind registered (cwd: the repository).
TRIAGE = [sys.executable, "-c", "from tests.jobs.gated_model import main; main()"]

_runs = itertools.count()


def write_spec(folder: Path, gate_dir: Path) -> Path:
    """The model's spec file in ``folder``; returns the folder (TRIAGE_MODEL_SPECS_DIR)."""
    folder.mkdir(parents=True, exist_ok=True)
    gate_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "name": NAME,
        "version": "1.0.0",
        "kind": KIND,
        "task": "classification",
        "accepts": {
            "modalities": ["CR", "DX"],
            "body_regions": ["CHEST"],
            "views": [],
            "series_rule": {"modalities": ["CR", "DX"], "min_images": 1},
        },
        "input": {
            "intensity": "presentation",
            "value_range": [0.0, 1.0],
            "spacing_mm": None,
            "shape": None,
            "description": "TESTS ONLY: reads no pixels; waits at a gate the test opens.",
        },
        "outputs": [FINDING],
        "findings": [
            {
                "code": FINDING,
                "label": "Gated test finding",
                "outputs": [FINDING],
                "threshold": 0.5,
                "unit": "score",
                "escalate_to": None,
            }
        ],
        "weights": [],
        "licence": "Apache-2.0",
        "citation": "",
        "source": "tests.jobs.gated_model (tests only, no weights)",
        "card": "tests/jobs/gated_model.py",
        "params": {"gate_dir": str(gate_dir)},
    }
    (folder / f"{NAME}.json").write_text(json.dumps(doc), encoding="utf-8")
    return folder


def entered(gate_dir: Path) -> list[int]:
    """Process ids of the runs that reached the gate so far (one entry per run)."""
    return [int(p.name.split("-")[1]) for p in gate_dir.glob("entered-*")]


def open_gate(gate_dir: Path) -> None:
    (gate_dir / "open").touch()


class GatedModel(FindingModel[int, None]):
    """Waits at the gate in ``predict``; one finding, not flagged."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.gate_dir = Path(str(spec.params["gate_dir"]))

    def prepare(self, paths: Sequence[Path]) -> int:
        return len(paths)

    def predict(self, prepared: int) -> None:
        (self.gate_dir / f"entered-{os.getpid()}-{next(_runs)}").touch()
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not (self.gate_dir / "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.05)

    def interpret(self, prepared: int, raw: None, series_uid: str) -> ModelOutput:
        finding = Finding(FINDING, False, 0.1, {}, ModelRef(self.spec.name, self.spec.version))
        return ModelOutput(findings=[finding])

    def weights_sha256(self) -> tuple[str, ...]:
        return ()


def build(spec: ModelSpec, options: RuntimeOptions) -> GatedModel:
    return GatedModel(spec)


def main() -> None:
    """``triage`` with this model's kind known to the registry (see :data:`TRIAGE`)."""
    from triage.cli import app
    from triage.models.registry import FACTORIES

    FACTORIES[KIND] = f"{__name__}:build"
    app(prog_name="triage")
