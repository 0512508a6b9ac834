"""Debian's Orthanc (a PACS) as a child process on free loopback ports, with its own
configuration and storage folder: the peer of the ingest bench and of the results export
tests, and a PACS to try the export with.

The configuration file is given as Orthanc's positional argument (``--config`` of Orthanc
1.10 writes a sample configuration instead), so /etc/orthanc is not read. No plugins, no
authentication, loopback only; C-STORE accepted from any calling AE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from triage.serve.launcher import free_port, stop_child

__all__ = [
    "DEFAULT_EXECUTABLE",
    "OrthancProcess",
    "find_orthanc",
    "orthanc_config",
    "orthanc_server",
]

DEFAULT_EXECUTABLE = "/usr/sbin/Orthanc"


def find_orthanc() -> str | None:
    """The Orthanc executable (on PATH, or Debian's), or None when it is not installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    if Path(DEFAULT_EXECUTABLE).is_file() and os.access(DEFAULT_EXECUTABLE, os.X_OK):
        return DEFAULT_EXECUTABLE
    return None


def orthanc_config(
    storage: Path, dicom_port: int, http_port: int, ae_title: str = "ORTHANC"
) -> dict[str, object]:
    """Orthanc's configuration: loopback, no plugins, everything else at its defaults
    (notably ``SyncStorageArea`` true and the SQLite index)."""
    return {
        "Name": "triage-peer",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "Plugins": [],
        "DicomAlwaysAllowStore": True,
        "DicomThreadsCount": 4,
        "KeepAlive": True,
        "ConcurrentJobs": 2,
    }


class OrthancProcess:
    """An Orthanc child process whose storage lives in ``root``; it can be stopped and
    started again on the same ports and storage (what it stored is kept).

    Args:
        executable: the Orthanc program.
        root: a folder of its own (configuration, storage, log).
        env: its environment (default: this process's).
        ae_title: its AE title.
        extra_config: settings added to :func:`orthanc_config`'s (e.g. DICOM TLS).
    """

    def __init__(
        self,
        executable: str,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        ae_title: str = "ORTHANC",
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.executable = executable
        self.root = root
        self.env = dict(env) if env is not None else dict(os.environ)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = root / "orthanc.log"
        self.config_path = root / "orthanc.json"
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = orthanc_config(storage, self.dicom_port, self.http_port, ae_title)
        config.update(extra_config or {})
        self.config_path.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> OrthancProcess:
        """Start it and wait until ``/system`` answers."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.executable, str(self.config_path)], stdout=log, stderr=log, env=self.env
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.http_url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not come up:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 30 s)."""
        if self.proc is not None:
            stop_child(self.proc, grace_s=30)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> Any:
        """A REST resource of it, as JSON (e.g. ``/instances``, ``/series/<id>``)."""
        answer = httpx.get(f"{self.http_url}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def orthanc_server(
    executable: str,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    **options: Any,
) -> Iterator[OrthancProcess]:
    """A fresh Orthanc with empty storage in a new folder under ``workdir`` (removed after);
    ``options`` go to :class:`OrthancProcess`."""
    root = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
    server = OrthancProcess(executable, root, env=env, **options)
    try:
        yield server.start(timeout_s)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
