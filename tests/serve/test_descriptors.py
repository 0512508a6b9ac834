"""Descriptors: the DICOM listener says when an association gets a descriptor select()
cannot take; log lines under a flood are rate-limited."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from triage.db import Database
from triage.demo.run import dcmtk_env, dcmtk_tool
from triage.ingest.scp import ScpOptions, start_scp
from triage.ingest.store import Ingestor
from triage.serve.connections import RateLimitedLog
from triage.serve.descriptors import (
    SELECT_LIMIT,
    DicomDescriptorGuard,
    free_select_descriptors,
    raise_open_file_limit,
)
from triage.serve.launcher import free_port


@pytest.fixture()
def echoscu() -> str:
    path = dcmtk_tool("echoscu")
    if path is None:
        pytest.skip("DCMTK echoscu is not installed (apt-get install dcmtk; .ci/run does)")
    return path


def echo(echoscu: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [echoscu, "-to", "10", "-aet", "TESTSCU", "-aec", "TRIAGE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dcmtk_env(),
    )


@contextmanager
def low_descriptors_taken() -> Iterator[list[int]]:
    """Opens /dev/null until every descriptor below 1024 is in use (closed afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SELECT_LIMIT + 64:
        if hard != resource.RLIM_INFINITY and hard < SELECT_LIMIT + 64:
            pytest.skip(f"the open-file limit ({hard}) is too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (SELECT_LIMIT + 64, hard))
    taken: list[int] = []
    try:
        while not taken or taken[-1] < SELECT_LIMIT:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        yield taken
    finally:
        for fd in taken:
            os.close(fd)


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    result = raise_open_file_limit()
    assert result is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert result[1] == soft
    assert hard == resource.RLIM_INFINITY or soft == hard


def test_association_on_a_descriptor_past_select_is_logged_in_one_line(
    db: Database,
    tmp_path: Path,
    echoscu: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingestor = Ingestor(
        db=db, store_dir=tmp_path / "s", tmp_dir=tmp_path / "i", quarantine_dir=tmp_path / "q"
    )
    port = free_port()
    scp = start_scp(ScpOptions(host="127.0.0.1", port=port, ae_title="TRIAGE"), ingestor)
    guard = DicomDescriptorGuard(scp)
    try:
        assert echo(echoscu, port).returncode == 0
        caplog.set_level(logging.ERROR, logger="triage.serve.descriptors")
        with low_descriptors_taken():
            assert free_select_descriptors() == 0
            refused = echo(echoscu, port)
        assert refused.returncode != 0
        assert guard.unserved == 1
        lines = [r for r in caplog.records if r.name == "triage.serve.descriptors"]
        assert len(lines) == 1
        assert "cannot serve a DICOM association from 127.0.0.1" in lines[0].getMessage()
        assert lines[0].exc_info is None  # one line, no traceback
        # Descriptors free again: associations are served again.
        assert echo(echoscu, port).returncode == 0, "not served after descriptors came back"
    finally:
        scp.shutdown()


def test_rate_limited_log_logs_a_flood_once(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.rate_limited")
    caplog.set_level(logging.INFO, logger="tests.rate_limited")
    flood = RateLimitedLog(logger, interval_seconds=3600)
    for i in range(500):
        flood.occurred(logging.WARNING, "refused connection %d", i)
    assert flood.total == 500
    assert [r.getMessage() for r in caplog.records] == ["refused connection 0"]
    caplog.clear()
    every = RateLimitedLog(logger, interval_seconds=0)
    every.occurred(logging.INFO, "a")
    every.occurred(logging.INFO, "b")
    assert [r.getMessage() for r in caplog.records] == ["a", "b"]
