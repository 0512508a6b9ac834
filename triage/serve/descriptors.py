"""File descriptors of ``triage serve``: the open-file limit, and the DICOM listener's need
for descriptors below 1024.

pynetdicom waits on each association's socket with ``select()``, which cannot take a
descriptor of 1024 or more (FD_SETSIZE): such an association is dropped at once, silently.
And when the process is out of descriptors altogether, the listener's ``accept()`` fails,
also silently. The HTTP connection cap (``TRIAGE_HTTP_MAX_CONNECTIONS``) keeps the process
well below 1024 descriptors; :class:`DicomDescriptorGuard` makes it said in the log when an
association cannot be served all the same.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from triage.serve.connections import RateLimitedLog

log = logging.getLogger(__name__)

SELECT_LIMIT = 1024  # FD_SETSIZE: select() takes descriptors 0..1023 only


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit.

    Returns:
        (old soft limit, new soft limit), or None where there is no such limit (Windows)
        or it could not be changed.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or (soft >= target):
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return None
    return soft, target


def free_select_descriptors() -> int | None:
    """How many descriptors below 1024 are free (None where /proc/self/fd is not there)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    used = sum(1 for n in names if n.isdigit() and int(n) < SELECT_LIMIT)
    return SELECT_LIMIT - used


class DicomDescriptorGuard:
    """Makes the DICOM listener say when it cannot serve an association for lack of
    descriptors (one log line, no traceback; at most one a minute under a flood).

    ``start_scp`` builds the server with its own class, so the guard wraps the server's
    ``get_request`` (accept) and ``verify_request`` on that instance.

    Args:
        server: the running association server.
    """

    def __init__(self, server: ThreadedAssociationServer) -> None:
        self._accept = server.get_request
        self._verify = server.verify_request
        server.get_request = self._get_request  # type: ignore[method-assign]
        server.verify_request = self._verify_request  # type: ignore[method-assign]
        self.unserved = 0
        self.last_unserved: float | None = None  # time.monotonic()
        # One listener, one rate limit: a line at most a minute for this listener.
        self._log = RateLimitedLog(log)

    def _count(self) -> None:
        self.unserved += 1
        self.last_unserved = time.monotonic()

    def _get_request(self) -> tuple[socket.socket, Any]:
        try:
            return self._accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._count()
                self._log.occurred(
                    logging.ERROR,
                    "a DICOM association cannot be served: the process is out of file"
                    " descriptors (%s); too many open HTTP connections or files",
                    os.strerror(exc.errno),
                )
                # The listening socket stays readable: pause instead of spinning on accept.
                time.sleep(0.1)
            raise

    def _verify_request(self, request: Any, client_address: Any) -> bool:
        if not self._verify(request, client_address):
            return False
        fd = request.fileno()
        if fd >= SELECT_LIMIT:
            self._count()
            host = client_address[0] if isinstance(client_address, tuple) else client_address
            self._log.occurred(
                logging.ERROR,
                "cannot serve a DICOM association from %s: its socket is descriptor %d and"
                " the DICOM listener (select()) takes only descriptors below %d; open HTTP"
                " connections or files hold the rest (TRIAGE_HTTP_MAX_CONNECTIONS)",
                host,
                fd,
                SELECT_LIMIT,
            )
            return False
        return True
