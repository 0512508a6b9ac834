"""Serving models from an MLflow registry: the alias's version is served, a moved alias is
picked up without a restart, and a version that cannot load never replaces the running one.

A real MLflow store (SQLite file) in a temporary folder; the versions hold BLAST-CT
networks with random weights saved as published state dicts are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from training.candidate import candidate_spec, write_candidate
from training.fit.engine import weights_file
from training.tracking import client, ensure_experiment, log_model_version
from triage.models.catalog import load_specs
from triage.models.deepmedic import DeepMedic
from triage.models.mlflow_registry import RegistryError, RegistrySource, RegistryWatcher
from triage.models.registry import ModelRegistry, RuntimeOptions
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

NAME = "blast-ct-v1"


def _base() -> ModelSpec:
    return next(s for s in load_specs(None, []) if s.name == NAME)


def _register(uri: str, tmp: Path, seed: int, *, corrupt: bool = False) -> tuple[str, str]:
    """Register a version holding one random DeepMedic; returns (version, weights sha256)."""
    torch.manual_seed(seed)
    folder = tmp / f"v{seed}"
    sha = weights_file(DeepMedic(), folder / "w.pt")
    spec = candidate_spec(_base(), version=f"1.0.0-ft.{seed}", weights=[(f"w{seed}.pt", sha)])
    write_candidate(spec, {f"w{seed}.pt": folder / "w.pt"}, folder / "candidate")
    if corrupt:  # the file no longer matches the sha256 its spec records
        (folder / "candidate" / "weights" / NAME / f"w{seed}.pt").write_bytes(b"broken")
    c = client(uri)
    run = c.create_run(ensure_experiment(uri))
    _, version = log_model_version(run.info.run_id, folder / "candidate")
    c.set_terminated(run.info.run_id)
    return version, sha


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _registry(tmp: Path) -> ModelRegistry:
    options = RuntimeOptions(store=ModelStore(tmp / "builtin-cache"), device="cpu", members=1)
    return ModelRegistry([_base()], options)


def test_alias_version_is_served_and_a_moved_alias_is_picked_up(uri: str, tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    source = RegistrySource(uri, alias="champion", cache_dir=tmp_path / "cache")
    watcher = RegistryWatcher(registry, source, poll_seconds=60)
    # Nothing registered: the built-in model stays.
    assert source.alias_version(NAME) is None
    assert watcher.check_once() == []
    assert registry.spec(NAME).version == "1.0.0"

    v1, sha1 = _register(uri, tmp_path, 1)
    v2, sha2 = _register(uri, tmp_path, 2)
    c = client(uri)
    assert watcher.check_once() == []  # registered, but no alias yet
    c.set_registered_model_alias(NAME, "champion", v1)
    assert watcher.check_once() == [NAME]
    model = registry.model(NAME)
    assert model.spec.version == f"1.0.0-ft.1+registry.{v1}"
    assert model.weights_sha256() == (sha1,)  # loaded (and verified) before the swap
    assert registry.inventory()[0]["source"] == "registry"
    assert watcher.serving() == {NAME: v1}
    assert watcher.check_once() == []  # unchanged alias: nothing to do

    c.set_registered_model_alias(NAME, "champion", v2)
    assert watcher.check_once() == [NAME]
    assert registry.model(NAME).weights_sha256() == (sha2,)
    assert registry.spec(NAME).version.endswith(f"+registry.{v2}")


def test_a_version_that_cannot_load_never_replaces_the_running_one(
    uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = _registry(tmp_path)
    source = RegistrySource(uri, alias="champion", cache_dir=tmp_path / "cache")
    watcher = RegistryWatcher(registry, source, poll_seconds=60)
    good, sha = _register(uri, tmp_path, 3)
    bad, _ = _register(uri, tmp_path, 4, corrupt=True)
    c = client(uri)
    c.set_registered_model_alias(NAME, "champion", good)
    watcher.check_once()
    c.set_registered_model_alias(NAME, "champion", bad)
    assert watcher.check_once() == []
    assert registry.model(NAME).weights_sha256() == (sha,)
    assert f"registry version {bad} not served" in caplog.text
    assert "sha256" in caplog.text


def test_an_unreadable_registry_keeps_the_running_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    registry = _registry(tmp_path)
    # A tracking server nobody listens on.
    source = RegistrySource("http://127.0.0.1:9", alias="champion", cache_dir=tmp_path / "c")
    with pytest.raises(RegistryError, match="model registry http://127.0.0.1:9"):
        source.alias_version(NAME)
    watcher = RegistryWatcher(registry, source, poll_seconds=60)
    assert watcher.check_once() == []
    assert registry.spec(NAME).version == "1.0.0"


def test_a_registered_spec_of_another_model_is_refused(uri: str, tmp_path: Path) -> None:
    version, _ = _register(uri, tmp_path, 5)
    c = client(uri)
    c.create_registered_model("other-model")
    mv = c.get_model_version(NAME, version)
    c.create_model_version("other-model", mv.source, run_id=mv.run_id)
    source = RegistrySource(uri, alias="champion", cache_dir=tmp_path / "cache")
    with pytest.raises(RegistryError, match="holds the spec of blast-ct-v1"):
        source.fetch("other-model", "1")


def test_replace_refuses_another_kind(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    other = dataclasses.replace(_base(), kind="xrv-densenet")
    with pytest.raises(ValueError, match="kind"):
        registry.replace(other, ModelStore(tmp_path / "x"))
