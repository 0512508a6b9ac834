"""The model store: verified fetch from a mirror directory or URL, cache, clear errors."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from triage.models.haemorrhage import BLAST_CT_V1
from triage.models.spec import WeightArtifact
from triage.models.store import ModelStore, ModelWeightsError, sha256_file

SPEC = "blast-ct-v1"


def _closed_port_url(name: str = "model_1.pt") -> str:
    """A URL on 127.0.0.1 whose port nothing listens on (connection refused, no network)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _offline(artifact: WeightArtifact) -> WeightArtifact:
    return dataclasses.replace(artifact, url=_closed_port_url(artifact.filename))


def _tiny_artifact(mirror: Path, content: bytes = b"weights\x00" * 100) -> WeightArtifact:
    folder = mirror / SPEC
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.pt").write_bytes(content)
    return WeightArtifact(
        filename="tiny.pt",
        url=_closed_port_url("tiny.pt"),
        sha256=hashlib.sha256(content).hexdigest(),
    )


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".part")]


def test_spec_pins_twelve_members() -> None:
    assert len(BLAST_CT_V1.weights) == 12
    for n, artifact in enumerate(BLAST_CT_V1.weights, start=1):
        assert artifact.filename == f"model_{n}.pt"
        assert artifact.url.startswith("https://raw.githubusercontent.com/biomedia-mira/")
        assert "549168693c76638dfe6690164ec1aba1c0fdf625" in artifact.url
        assert artifact.url.endswith(f"/saved_models/model_{n}.pt")
        assert len(artifact.sha256) == 64 and int(artifact.sha256, 16) >= 0
    assert BLAST_CT_V1.artifact(9).sha256.startswith("a255de8d")
    with pytest.raises(ValueError):
        BLAST_CT_V1.artifact(13)


def test_fetch_from_mirror_directory_then_cache_hit(weights_mirror: Path, tmp_path: Path) -> None:
    artifact = _offline(BLAST_CT_V1.artifact(1))
    cache = tmp_path / "cache"
    path = ModelStore(cache, mirror=weights_mirror).fetch(SPEC, artifact)
    assert path == cache / SPEC / "model_1.pt"
    assert sha256_file(path) == artifact.sha256
    mtime = path.stat().st_mtime_ns
    # Cache hit: works with no mirror and no reachable URL, and does not rewrite the file.
    again = ModelStore(cache, mirror=None).fetch(SPEC, artifact)
    assert again == path and path.stat().st_mtime_ns == mtime
    assert _leftovers(cache) == []


def test_corrupt_mirror_file_is_rejected(weights_mirror: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / SPEC).mkdir(parents=True)
    data = bytearray((weights_mirror / SPEC / "model_1.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mirror / SPEC / "model_1.pt").write_bytes(bytes(data))
    artifact = _offline(BLAST_CT_V1.artifact(1))
    cache = tmp_path / "cache"
    with pytest.raises(ModelWeightsError) as info:
        ModelStore(cache, mirror=mirror).fetch(SPEC, artifact)
    message = str(info.value)
    assert "blast-ct-v1/model_1.pt" in message
    assert "sha256 mismatch" in message
    assert artifact.sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert "TRIAGE_MODEL_MIRROR" in message
    assert not (cache / SPEC / "model_1.pt").exists()
    assert _leftovers(cache) == []


def test_corrupt_cache_is_fetched_again(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    artifact = _tiny_artifact(mirror)
    cache = tmp_path / "cache"
    (cache / SPEC).mkdir(parents=True)
    (cache / SPEC / "tiny.pt").write_bytes(b"truncated")
    path = ModelStore(cache, mirror=mirror).fetch(SPEC, artifact)
    assert sha256_file(path) == artifact.sha256


def test_missing_everywhere(tmp_path: Path) -> None:
    mirror = tmp_path / "empty-mirror"
    mirror.mkdir()
    artifact = _offline(BLAST_CT_V1.artifact(3))
    with pytest.raises(ModelWeightsError) as info:
        ModelStore(tmp_path / "cache", mirror=mirror, timeout_s=5).fetch(SPEC, artifact)
    message = str(info.value)
    assert "blast-ct-v1/model_3.pt" in message
    assert f"mirror {mirror / SPEC / 'model_3.pt'}: not found" in message
    assert f"upstream {artifact.url}: download failed" in message
    assert "TRIAGE_MODEL_MIRROR" in message
    assert "Traceback" not in message


def test_no_sources(tmp_path: Path) -> None:
    artifact = BLAST_CT_V1.artifact(1)
    with pytest.raises(ModelWeightsError, match="no mirror configured"):
        ModelStore(tmp_path, mirror=None, allow_download=False).fetch(SPEC, artifact)


@pytest.fixture()
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on a free local port serving a mirror directory."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_from_http_mirror(http_mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, root = http_mirror
    artifact = _tiny_artifact(root)
    path = ModelStore(tmp_path / "cache", mirror=url, timeout_s=5).fetch(SPEC, artifact)
    assert path.read_bytes() == (root / SPEC / "tiny.pt").read_bytes()
    # A 404 from the mirror is reported as such.
    missing = dataclasses.replace(artifact, filename="absent.pt")
    with pytest.raises(ModelWeightsError, match="HTTP 404"):
        ModelStore(tmp_path / "cache", mirror=url, timeout_s=5).fetch(SPEC, missing)


def test_read_verified_returns_checked_bytes(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    artifact = _tiny_artifact(mirror)
    store = ModelStore(tmp_path / "cache", mirror=mirror)
    data, sha256 = store.read_verified(SPEC, artifact)
    assert hashlib.sha256(data).hexdigest() == artifact.sha256 == sha256
    shutil.rmtree(mirror)
    assert store.read_verified(SPEC, artifact) == (data, sha256)  # from the cache now
