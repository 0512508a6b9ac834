"""``triage worker``: the assembly and analysis loop alone, in a process of its own.

No DICOM or web listener: the process reads the jobs table and the stored files that the
``triage serve`` processes write (one database, one shared file store), analyses, and
records. SIGTERM (or Ctrl-C) stops claiming, lets the study being analysed finish for a
grace period, then gives it back to the queue so that another worker takes it at once; a
second signal gives it back without waiting. A worker killed outright (SIGKILL, a lost
machine) stops renewing its lease, and another worker queues the job again when it lapses.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from triage.analysis import Analyzer
from triage.config import Settings
from triage.db import Database
from triage.jobs.worker import Worker

log = logging.getLogger(__name__)


class WorkerSetupError(ValueError):
    """A setting the worker cannot start with (the message names it)."""


class WorkerProcess:
    """The models, the registry watcher (when a model registry is configured) and a
    :class:`Worker`, started and stopped together.

    Args:
        settings: the settings (``TRIAGE_*``).
        db: the database, migrated.
        worker_id: this worker's id in the jobs table (default ``host:pid``).

    Raises:
        WorkerSetupError: an invalid model configuration, device, model registry or
            policy file.
    """

    def __init__(self, settings: Settings, db: Database, *, worker_id: str | None = None):
        from triage.models.device import resolve_device
        from triage.models.mlflow_registry import RegistryError, RegistrySource, RegistryWatcher
        from triage.models.spec import SpecError
        from triage.worklist.priority import load_policy

        self.settings = settings
        try:
            self.device = str(resolve_device(settings.device))
        except ValueError as exc:
            raise WorkerSetupError(f"TRIAGE_DEVICE / --device: {exc}") from None
        try:
            self.analyzer = Analyzer.from_settings(settings)
        except SpecError as exc:
            raise WorkerSetupError(f"model configuration: {exc}") from None
        try:
            policy = load_policy(settings.policy_file)
        except (OSError, ValueError) as exc:
            raise WorkerSetupError(
                f"cannot read the policy file {settings.policy_file} (TRIAGE_POLICY_FILE): {exc}"
            ) from None
        self.model_watcher: RegistryWatcher | None = None
        if settings.model_registry_uri:
            try:
                source = RegistrySource(
                    settings.model_registry_uri,
                    alias=settings.model_registry_alias,
                    cache_dir=settings.resolved_model_cache_dir / "registry",
                )
            except RegistryError as exc:
                raise WorkerSetupError(f"model registry: {exc}") from None
            self.model_watcher = RegistryWatcher(
                self.analyzer.registry, source, poll_seconds=settings.model_registry_poll_seconds
            )
        self.worker = Worker.from_settings(
            settings, db, self.analyzer, policy=policy, worker_id=worker_id
        )
        self._stop = threading.Event()
        self._hurry = threading.Event()

    def request_stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Stop claiming (a signal handler): the first call lets the current study finish
        within the grace period, a second gives it back at once."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    def run(self, *, grace_seconds: float) -> int:
        """Run until SIGTERM or SIGINT; the exit status (0, or 1 when a worker thread died).

        Args:
            grace_seconds: how long a study being analysed at the stop may take to finish
                before it is given back to the queue.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        self.analyzer.warm_up()
        if self.model_watcher is not None:
            # The first study is analysed by the alias's version when the registry answers.
            self.model_watcher.check_once()
            self.model_watcher.start()
        self.worker.start()
        status = 0
        while not self._stop.wait(1.0):
            stopped = [t.name for t in self.worker.threads() if not t.is_alive()]
            if stopped:
                log.error("worker thread(s) stopped: %s", ", ".join(stopped))
                status = 1
                break
        log.info("stopping: no new job is claimed")
        self.worker.stop_claiming()
        deadline = time.monotonic() + grace_seconds
        while self.worker.busy and time.monotonic() < deadline and not self._hurry.is_set():
            self._hurry.wait(0.1)
        # A study still running now is given back to the queue.
        self.worker.stop(timeout=0.0 if self.worker.busy or self._hurry.is_set() else 5.0)
        if self.model_watcher is not None:
            self.model_watcher.stop()
        self.worker.db.dispose()
        return status
