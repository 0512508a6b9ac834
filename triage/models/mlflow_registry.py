"""Models served from an MLflow model registry, by alias, and reloaded when the alias moves.

A registered model carries the same name as the installed spec it replaces (``blast-ct-v1``)
and is logged by ``triage-train`` as an MLflow pyfunc model whose artifacts are the model's
spec (``spec.json``, the same document as ``triage/models/specs/*.json``, with the weights'
sha256 and the operating thresholds chosen on validation data) and its weight files
(``weights/<name>/<file>``). Serving reads those two artifacts and builds the model with the
same factory as the built-in one (:mod:`triage.models.registry`); it never unpickles the
pyfunc wrapper. Every weight file is checked against the sha256 in the spec before use.

:class:`RegistryWatcher` asks the registry which version holds the alias (``champion`` by
default) every ``poll_seconds``; when it moved, the new version is downloaded, built and its
weights loaded, and only then swapped in (:meth:`ModelRegistry.replace`), so a version that
cannot load never replaces the running one. Findings record the version that produced them:
``<spec version>+registry.<N>``.

``mlflow`` is imported only here, and only when a registry is configured
(``TRIAGE_MODEL_REGISTRY_URI``); without one the built-in pinned weights are served.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.models.spec import ModelSpec, SpecError
from triage.models.store import ModelStore, ModelWeightsError

if TYPE_CHECKING:
    from triage.models.registry import ModelRegistry

__all__ = [
    "SPEC_ARTIFACT",
    "WEIGHTS_ARTIFACT",
    "RegisteredVersion",
    "RegistryError",
    "RegistrySource",
    "RegistryWatcher",
    "registry_version_label",
]

log = logging.getLogger(__name__)

#: File name of the spec among a registered model's artifacts.
SPEC_ARTIFACT = "spec.json"
#: Folder of the weight files among a registered model's artifacts (``<name>/<file>``).
WEIGHTS_ARTIFACT = "weights"
_COMPLETE = ".complete"


class RegistryError(RuntimeError):
    """The registry cannot be reached or a registered version is not a usable model."""


def registry_version_label(spec_version: str, registry_version: str) -> str:
    """The version findings record for a model served from the registry."""
    return f"{spec_version}+registry.{registry_version}"


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version, downloaded and ready to build.

    Attributes:
        name: registered model name (= the spec's name).
        version: the registry's version number (a string, as MLflow gives it).
        spec: its spec, with ``version`` stamped by :func:`registry_version_label`.
        store: a weight store reading the version's own files (sha256 from its spec).
        path: where its artifacts were downloaded.
    """

    name: str
    version: str
    spec: ModelSpec
    store: ModelStore
    path: Path


def _mlflow_client(uri: str) -> Any:
    # No progress bars in the service's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from mlflow import MlflowClient
    except ImportError as exc:  # the serving install without the train extra
        raise RegistryError(
            "TRIAGE_MODEL_REGISTRY_URI is set but mlflow is not installed"
            " (pip install 'triage[train]')"
        ) from exc
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}


class RegistrySource:
    """Reads registered model versions from an MLflow registry.

    Args:
        uri: MLflow tracking/registry URI (``sqlite:///…/mlflow.db``, ``http://host:5000``).
        alias: the alias served (``champion``).
        cache_dir: where downloaded versions are kept (``<cache>/<name>/<version>/``).
    """

    def __init__(self, uri: str, *, alias: str, cache_dir: Path) -> None:
        self.uri = uri
        self.alias = alias
        self.cache_dir = Path(cache_dir)
        self._client = _mlflow_client(uri)

    def alias_version(self, name: str) -> str | None:
        """The version number the alias points at, or None when the model or alias does not
        exist in the registry.

        Raises:
            RegistryError: the registry cannot be read.
        """
        try:
            mv = self._client.get_model_version_by_alias(name, self.alias)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise RegistryError(
                f"model registry {self._where()}: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
        return str(mv.version)

    def fetch(self, name: str, version: str) -> RegisteredVersion:
        """Download (once) and read one registered version.

        Raises:
            RegistryError: the download fails, or the artifacts hold no valid spec of this
                model.
        """
        target = self.cache_dir / name / version
        if not (target / _COMPLETE).exists():
            partial = target.with_name(f"{version}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            try:
                from mlflow.artifacts import download_artifacts

                download_artifacts(
                    artifact_uri=self._client.get_model_version_download_uri(name, version),
                    dst_path=str(partial),
                    tracking_uri=self.uri,
                )
            except Exception as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise RegistryError(
                    f"model {name} version {version}: download from {self._where()} failed"
                    f" ({type(exc).__name__}: {str(exc)[:200]})"
                ) from exc
            (partial / _COMPLETE).write_text("", "utf-8")
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        artifacts = _artifacts_dir(target)
        try:
            doc = json.loads((artifacts / SPEC_ARTIFACT).read_text("utf-8"))
            spec = ModelSpec.from_json(doc, source=f"registry {name} v{version}")
        except (OSError, ValueError, SpecError) as exc:
            raise RegistryError(f"model {name} version {version}: no valid {SPEC_ARTIFACT}") from (
                exc
            )
        if spec.name != name:
            raise RegistryError(
                f"registered model {name} version {version} holds the spec of {spec.name}"
            )
        unpinned = [w.filename for w in spec.weights if not w.sha256]
        if unpinned:
            raise RegistryError(
                f"model {name} version {version}: weights without sha256 in its spec: {unpinned}"
            )
        spec = dataclasses.replace(spec, version=registry_version_label(spec.version, version))
        store = ModelStore(
            cache_dir=target / "verified",
            mirror=artifacts / WEIGHTS_ARTIFACT,
            allow_download=False,
        )
        return RegisteredVersion(name, version, spec, store, target)

    def _where(self) -> str:
        # The URI without credentials a tracking server URL might carry.
        scheme, _, rest = self.uri.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}" if rest else self.uri


def _artifacts_dir(root: Path) -> Path:
    """The folder holding spec.json in a downloaded pyfunc model (``artifacts/``)."""
    for candidate in (root / "artifacts", root):
        if (candidate / SPEC_ARTIFACT).exists():
            return candidate
    found = sorted(root.rglob(SPEC_ARTIFACT))
    return found[0].parent if found else root / "artifacts"


class RegistryWatcher:
    """Keeps each installed model on the registry's alias, checking every ``poll_seconds``.

    Args:
        registry: the running models.
        source: the MLflow registry.
        poll_seconds: seconds between checks (a promotion is served within this time plus
            the download and load).
    """

    def __init__(
        self, registry: ModelRegistry, source: RegistrySource, *, poll_seconds: float
    ) -> None:
        self.registry = registry
        self.source = source
        self.poll_seconds = poll_seconds
        self._serving: dict[str, str] = {}
        self._failed: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serving(self) -> dict[str, str]:
        """Model name -> the registry version served (models served built-in are absent)."""
        return dict(self._serving)

    def check_once(self) -> list[str]:
        """Move every model whose alias changed to its new version; return their names.

        Never raises: a registry that cannot be read, or a version that cannot be loaded,
        is logged and the running version kept.
        """
        changed: list[str] = []
        for spec in self.registry.specs:
            name = spec.name
            try:
                version = self.source.alias_version(name)
            except RegistryError as exc:
                self._warn_once(name, str(exc))
                continue
            if version is None or version == self._serving.get(name):
                continue
            if self._failed.get(name) == f"v{version}":
                continue  # this version failed to load already; wait for another
            try:
                registered = self.source.fetch(name, version)
                self.registry.replace(registered.spec, registered.store)
            except (RegistryError, ModelWeightsError, SpecError, OSError, ValueError) as exc:
                log.error(
                    "model %s: registry version %s not served (%s); the running version stays",
                    name,
                    version,
                    exc,
                )
                self._failed[name] = f"v{version}"
                continue
            self._serving[name] = version
            self._failed.pop(name, None)
            changed.append(name)
            log.info("model %s: now serving registry version %s (%s)", name, version, spec.name)
        return changed

    def _warn_once(self, name: str, message: str) -> None:
        if self._failed.get(name) != message:
            log.warning("model %s: %s; the running version stays", name, message)
            self._failed[name] = message

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name="triage-model-registry", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check_once()
            except Exception:  # never let the watcher die silently
                log.exception("model registry check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
