"""HTTP connection limits of the real server: idle connections cannot stop DICOM ingest,
slow clients are closed, and client disconnects do not fill the log with tracebacks.

Loopback only; every load is bounded in count and in time and ends by itself.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_server
from tests.e2e.conftest import send
from triage.demo.xray import write_demo_radiograph
from triage.serve.descriptors import SELECT_LIMIT
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IDLE_CONNECTIONS = 1100
MAX_CONNECTIONS = 256  # the default of TRIAGE_HTTP_MAX_CONNECTIONS


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a client that crashes does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_server(sock: socket.socket, deadline: float) -> tuple[bool, bytes]:
    """Wait (until ``deadline``) for the server to close ``sock``; what it sent before."""
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def open_descriptors(server: ServerProcess) -> int | None:
    assert server.proc is not None
    try:
        return len(list(Path(f"/proc/{server.proc.pid}/fd").iterdir()))
    except OSError:
        return None


def wait_for_log(server: ServerProcess, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.2)
    pytest.fail(f"{text!r} not logged:\n{server.log()[-4000:]}")


@pytest.fixture()
def enough_descriptors() -> None:
    """This test process holds the idle connections: it needs that many descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CONNECTIONS + 200
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the open-file limit ({hard}) is below {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@pytest.fixture()
def flooded_server(tmp_path: Path) -> Iterator[ServerProcess]:
    # A header timeout longer than the test: only the connection cap protects here.
    env = {"TRIAGE_SERIES_QUIET_SECONDS": "1", "TRIAGE_HTTP_HEADER_TIMEOUT_SECONDS": "600"}
    with running_server(tmp_path / "data", env) as srv:
        yield srv


def test_idle_http_connections_do_not_stop_dicom_ingest(
    flooded_server: ServerProcess, storescu: str, tmp_path: Path, enough_descriptors: None
) -> None:
    server = flooded_server
    radiograph = write_demo_radiograph(tmp_path / "xray")
    socks: list[socket.socket] = []
    refused_at_connect = 0
    try:
        deadline = time.monotonic() + 120
        while len(socks) + refused_at_connect < IDLE_CONNECTIONS:
            assert time.monotonic() < deadline, "connecting took too long"
            try:
                socks.append(connect(server))
            except OSError:
                refused_at_connect += 1

        # The server answers those past its cap with 503 and closes them.
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        closed: list[bytes] = []
        still_open = len(socks)
        wait_until = time.monotonic() + 60
        while still_open > MAX_CONNECTIONS and time.monotonic() < wait_until:
            for key, _ in sel.select(timeout=1):
                sock: Any = key.fileobj
                sel.unregister(sock)
                was_closed, data = closed_by_server(sock, time.monotonic() + 5)
                if was_closed:
                    closed.append(data)
                    still_open -= 1
        sel.close()
        refused = refused_at_connect + len(closed)
        assert refused >= IDLE_CONNECTIONS - MAX_CONNECTIONS, (refused, still_open)
        assert still_open <= MAX_CONNECTIONS
        assert any(d.startswith(b"HTTP/1.1 503") for d in closed)

        # The DICOM sockets of the server stay below select()'s limit ...
        fds = open_descriptors(server)
        if fds is not None:
            assert fds < SELECT_LIMIT - 100, fds

        # ... and a study sent now (while the idle connections are held) is stored.
        send(storescu, server, radiograph)
    finally:
        for s in socks:
            reset(s)

    # Analysed (the chest model has no weights here: failed is fine, pending forever is not).
    deadline = time.monotonic() + 180
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            resp = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers, timeout=10)
            if resp.status_code == 200:
                items = resp.json()["items"]
                if items and all(i["ai_status"] != "pending" for i in items):
                    break
        time.sleep(0.5)
    assert len(items) == 1, f"{items}\n{server.log()[-4000:]}"
    assert items[0]["ai_status"] != "pending", server.log()[-4000:]
    assert httpx.get(f"{server.http_url}/api/health", timeout=30).status_code == 200

    log = server.log()
    assert "refused an HTTP connection" in log
    # One line for the flood, not one per connection; no traceback for the resets.
    assert log.count("refused an HTTP connection") <= 2
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "TRIAGE_SERIES_QUIET_SECONDS": "60",
        "TRIAGE_HTTP_HEADER_TIMEOUT_SECONDS": "2",
        "TRIAGE_HTTP_BODY_TIMEOUT_SECONDS": "2",
        "TRIAGE_HTTP_KEEPALIVE_SECONDS": "1",
    }
    with running_server(tmp_path_factory.mktemp("strict"), env) as srv:
        yield srv


def test_header_trickled_a_byte_a_second_is_closed(strict_server: ServerProcess) -> None:
    request = b"GET /api/worklist HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    sock = connect(strict_server)
    sent = 0
    deadline = time.monotonic() + 30  # the timeout is 2 s
    received = b""
    try:
        closed = False
        while not closed and sent < len(request) and time.monotonic() < deadline:
            sock.sendall(request[sent : sent + 1])
            sent += 1
            # A second between bytes: the time the server has to close the connection.
            closed, data = closed_by_server(sock, time.monotonic() + 1)
            received += data
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    finally:
        reset(sock)
    assert closed, "the server kept a connection trickling its header"
    assert sent < len(request)
    assert received == b"" or received.startswith(b"HTTP/1.1 408")
    wait_for_log(strict_server, "no complete request header within 2 s")


def test_idle_connection_without_a_request_is_closed(strict_server: ServerProcess) -> None:
    sock = connect(strict_server)
    try:
        closed, data = closed_by_server(sock, time.monotonic() + 30)
    finally:
        reset(sock)
    assert closed
    assert data.startswith(b"HTTP/1.1 408")


def test_idle_keep_alive_connection_is_closed(strict_server: ServerProcess) -> None:
    sock = connect(strict_server)
    try:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        closed, data = closed_by_server(sock, time.monotonic() + 30)
    finally:
        reset(sock)
    assert closed
    assert data.startswith(b"HTTP/1.1 200")  # answered, then closed when idle
    assert data.count(b"HTTP/1.1") == 1


def test_stalled_request_body_is_closed_in_two_log_lines(strict_server: ServerProcess) -> None:
    # Signed in: without credentials the request is refused before its body is read.
    token = f"Authorization: Bearer {strict_server.token}\r\n".encode()
    sock = connect(strict_server)
    try:
        sock.sendall(
            b"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + token
            + b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        closed, _ = closed_by_server(sock, time.monotonic() + 30)
    finally:
        reset(sock)
    assert closed
    wait_for_log(strict_server, "request body stopped for 2 s")
    # The STOW-RS handler was reading the body: it ends with one line, not a traceback.
    wait_for_log(strict_server, "went away during POST /dicomweb/studies")
    assert "Traceback" not in strict_server.log()
