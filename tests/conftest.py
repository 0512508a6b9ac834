"""Shared test fixtures: where the real data lives, and skips when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from triage.analysis import Analyzer
    from triage.db import Database
    from triage.models.registry import Factory
    from triage.serve.launcher import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = (REPO_ROOT.parent / "shared").resolve()
CQ500_DIR = SHARED_DIR / "data" / "cq500-ct0"
XRAY_DIR = SHARED_DIR / "data" / "xray"
WEIGHTS_DIR = SHARED_DIR / "weights"


@pytest.fixture(scope="session")
def cq500_dir() -> Path:
    """The real 238-slice head CT series (skips when ../shared/data is absent)."""
    if not CQ500_DIR.is_dir():
        pytest.skip(f"real data not available: {CQ500_DIR} is absent")
    return CQ500_DIR


@pytest.fixture(scope="session")
def xray_dir() -> Path:
    """Real chest radiographs (skips when ../shared/data is absent)."""
    if not XRAY_DIR.is_dir():
        pytest.skip(f"real data not available: {XRAY_DIR} is absent")
    return XRAY_DIR


@pytest.fixture(scope="session")
def weights_mirror() -> Path:
    """A model-store mirror directory holding blast-ct-v1 (skips when absent)."""
    if not (WEIGHTS_DIR / "blast-ct-v1" / "model_1.pt").is_file():
        pytest.skip(f"pretrained weights not available under {WEIGHTS_DIR}")
    return WEIGHTS_DIR


CHEST_MODEL = "xrv-densenet121-res224-all"


def write_chest_weights(mirror: Path, seed: int = 0) -> str:
    """The chest model's network with random weights, saved the way the real file is (a whole
    pickled module, ``torch.save(model)``) under ``<mirror>/<model>/<file>``; returns its
    sha256."""
    import hashlib

    import torch
    import torchxrayvision as xrv

    from triage.models.catalog import builtin_spec

    spec = builtin_spec(CHEST_MODEL)
    torch.manual_seed(seed)
    net = xrv.models.DenseNet(weights=None)
    path = mirror / spec.name / spec.weights[0].filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_analyzer(
    cache_dir: Path,
    mirror: Path | None = None,
    *,
    factories: dict[str, str | Factory] | None = None,
    models: list[str] | None = None,
) -> Analyzer:
    """The installed models on CPU with a store that never downloads (``mirror`` or none);
    ``factories`` replaces the implementation of a spec kind (e.g. one that fails)."""
    from triage.analysis import Analyzer
    from triage.models.catalog import load_specs
    from triage.models.registry import FACTORIES, ModelRegistry, RuntimeOptions
    from triage.models.store import ModelStore

    store = ModelStore(cache_dir, mirror, allow_download=False)
    registry = ModelRegistry(
        load_specs(None, models),
        RuntimeOptions(store=store, device="cpu"),
        {**FACTORIES, **(factories or {})},
    )
    return Analyzer(registry)


def pydicom_file(name: str) -> Path:
    """A file shipped by pydicom or pydicom-data, found on disk (never downloaded)."""
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    for root in roots:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    pytest.skip(f"test file {name} is not installed (pydicom-data missing?)")


def run_cli(
    args: list[str], data_dir: Path, *, check: bool = False, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``triage ARGS`` in a child process on its own data directory (SQLite default)."""
    child_env = {**os.environ, "TRIAGE_DATA_DIR": str(data_dir), **env}
    child_env.pop("TRIAGE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "triage.cli", *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


@pytest.fixture(scope="session")
def storescu() -> str:
    from triage.demo.run import dcmtk_tool

    path = dcmtk_tool("storescu")
    if path is None:
        pytest.skip("DCMTK storescu is not installed (apt-get install dcmtk; .ci/run does)")
    return path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server and a client certificate made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
        )
    return {p.stem + p.suffix: p for p in d.iterdir()}


def database_backends() -> list[str]:
    """SQLite always; PostgreSQL too when TRIAGE_TEST_POSTGRES_URL names a server."""
    return ["sqlite"] + (["postgresql"] if os.environ.get("TRIAGE_TEST_POSTGRES_URL") else [])


@contextmanager
def new_postgresql_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on TRIAGE_TEST_POSTGRES_URL's server, dropped after
    (skips the test when no server is named)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server_url = os.environ.get("TRIAGE_TEST_POSTGRES_URL")
    if not server_url:
        pytest.skip("runs on PostgreSQL only (set TRIAGE_TEST_POSTGRES_URL)")
    server = make_url(server_url)
    name = f"triage_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=database_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'triage.db'}"
        return
    with new_postgresql_database() as url:
        yield url


@pytest.fixture()
def db(database_url: str) -> Iterator[Database]:
    """A migrated database on each configured backend."""
    from triage.db import Database

    database = Database(database_url)
    database.migrate()
    try:
        yield database
    finally:
        database.dispose()


@contextmanager
def running_server(data_dir: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    """``triage serve`` in a child process for the block; a failed start fails the test."""
    from triage.serve.launcher import ServerProcess

    server = ServerProcess(data_dir, env)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()
