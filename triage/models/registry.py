"""The model registry: model names to factories, models built once and reused.

Which models are installed is data (:mod:`triage.models.catalog`); how a spec becomes a
running :class:`~triage.models.base.FindingModel` is a factory chosen by the spec's ``kind``.
Factories are named as ``"module:function"`` and imported on first use, so listing the
models (``triage models``) and routing need no torch.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from triage.models.base import FindingModel
from triage.models.spec import ModelSpec, SpecError
from triage.models.store import ModelStore

__all__ = ["FACTORIES", "ModelRegistry", "RuntimeOptions"]

Factory = Callable[[ModelSpec, "RuntimeOptions"], FindingModel[Any, Any]]

#: Spec ``kind`` -> ``"module:function"`` building the model.
FACTORIES: dict[str, str] = {
    "blast-ct": "triage.models.haemorrhage:build",
    "xrv-densenet": "triage.models.chest:build",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How models run at this site.

    Attributes:
        store: where weight files come from.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (see :func:`triage.models.device.default_precision`), ``fp32``,
            ``bf16`` or ``fp16``.
        members: ensemble size for ensembles (None: the model's default for the device).
        thresholds: finding code -> the site's flag threshold (in the finding's unit).
    """

    store: ModelStore
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    members: int | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)


def _resolve(target: str | Factory) -> Factory:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    factory: Factory = getattr(importlib.import_module(module), name)
    return factory


class ModelRegistry:
    """The installed models, built on first use (thread-safe) and then reused.

    Args:
        specs: the installed specs (see :func:`triage.models.catalog.load_specs`).
        options: how they run.
        factories: spec kind -> factory or ``"module:function"``; defaults to
            :data:`FACTORIES`.

    Raises:
        SpecError: a spec names a kind no factory builds, or two specs share a name.
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        options: RuntimeOptions,
        factories: Mapping[str, str | Factory] | None = None,
    ) -> None:
        self._factories = dict(FACTORIES if factories is None else factories)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SpecError(f"two installed models share a name: {names}")
        for spec in specs:
            if spec.kind not in self._factories:
                raise SpecError(
                    f"model {spec.name}: no implementation of kind {spec.kind!r} "
                    f"(known: {sorted(self._factories)})"
                )
        self._specs = {s.name: s for s in specs}
        self.options = options
        self._models: dict[str, FindingModel[Any, Any]] = {}
        self._lock = threading.Lock()

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        return tuple(self._specs.values())

    def spec(self, name: str) -> ModelSpec:
        return self._specs[name]

    def inventory(self) -> list[dict[str, Any]]:
        """Every installed model for ``triage models``: what it accepts, its findings and
        thresholds (the site's where set), its weights' state, where and how it would run."""
        out = []
        for spec in self.specs:
            weights = [self.options.store.state(spec.name, a) for a in spec.weights]
            states = [w["state"] for w in weights]
            runtime = self.model(spec.name).describe()
            out.append(
                {
                    "name": spec.name,
                    "version": spec.version,
                    "kind": spec.kind,
                    "task": spec.task,
                    "accepts": spec.accepts.describe(),
                    "series_rule": spec.accepts.series_rule.to_json(),
                    "input": asdict(spec.input),
                    "findings": [
                        {
                            "code": f.code,
                            "label": f.label,
                            "outputs": list(f.outputs),
                            "threshold": float(self.options.thresholds.get(f.code, f.threshold)),
                            "spec_threshold": f.threshold,
                            "unit": f.unit,
                            "escalate_to": f.escalate_to,
                        }
                        for f in spec.findings
                    ],
                    "weights_state": (
                        states[0]
                        if len(set(states)) == 1
                        else ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
                    ),
                    "weights": weights,
                    "runtime": runtime,
                    "licence": spec.licence,
                    "card": spec.card,
                }
            )
        return out

    def model(self, name: str) -> FindingModel[Any, Any]:
        """The running model ``name``, built on first use."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                spec = self._specs[name]
                model = _resolve(self._factories[spec.kind])(spec, self.options)
                self._models[name] = model
            return model
