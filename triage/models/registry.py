"""The model registry: model names to factories, models built once and reused.

Which models are installed is data (:mod:`triage.models.catalog`); how a spec becomes a
running :class:`~triage.models.base.FindingModel` is a factory chosen by the spec's ``kind``.
Factories are named as ``"module:function"`` and imported on first use, so listing the
models (``triage models``) and routing need no torch.
"""

from __future__ import annotations

import dataclasses
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
    # SIMULATION ONLY (`triage simulate --replay`); no shipped spec has this kind.
    "simulation-replay": "triage.simulate.replay_model:build",
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
        # Models served from a model registry read their own weight files.
        self._stores: dict[str, ModelStore] = {}
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
            store = self._stores.get(spec.name, self.options.store)
            weights = [store.state(spec.name, a) for a in spec.weights]
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
                    "source": "registry" if spec.name in self._stores else "built-in",
                }
            )
        return out

    def model(self, name: str) -> FindingModel[Any, Any]:
        """The running model ``name``, built on first use."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                spec = self._specs[name]
                model = self._build(spec, self._stores.get(name))
                self._models[name] = model
            return model

    def _build(self, spec: ModelSpec, store: ModelStore | None) -> FindingModel[Any, Any]:
        options = self.options if store is None else dataclasses.replace(self.options, store=store)
        return _resolve(self._factories[spec.kind])(spec, options)

    def replace(self, spec: ModelSpec, store: ModelStore) -> FindingModel[Any, Any]:
        """Serve another version of an installed model from now on (a model registry's).

        The new version is built and its weights loaded before it replaces the running one,
        so a version that cannot load never does; a study being analysed finishes with the
        version it started with.

        Args:
            spec: the new version's spec (same name and kind as the installed model).
            store: where its weight files are read (verified by the spec's sha256).

        Raises:
            SpecError: no installed model has this name, or the kind differs.
            ModelWeightsError: its weights cannot be loaded.
        """
        current = self._specs.get(spec.name)
        if current is None:
            raise SpecError(f"no installed model is named {spec.name}")
        if spec.kind != current.kind:
            raise SpecError(f"model {spec.name}: kind {spec.kind!r} replaces {current.kind!r}")
        model = self._build(spec, store)
        model.load()
        with self._lock:
            self._specs[spec.name] = spec
            self._stores[spec.name] = store
            self._models[spec.name] = model
        return model
