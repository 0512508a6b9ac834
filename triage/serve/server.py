"""``triage serve``: one process holding the DICOM SCP, the worker and the HTTP server."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from functools import partial

import uvicorn
from pynetdicom.transport import ThreadedAssociationServer

from triage.analysis import Analyzer
from triage.auth.accounts import count_admins
from triage.auth.ldap import LdapSettings
from triage.auth.oidc import OidcSettings, Provider
from triage.config import Settings
from triage.db import Database
from triage.dicomout.send import ExportConfig, ResultSender
from triage.events.publisher import Publisher
from triage.events.webhook import WebhookConfig, WebhookSender
from triage.ingest.scp import ScpOptions, start_scp
from triage.ingest.store import Ingestor, remove_stale_parts
from triage.jobs.worker import Worker
from triage.models.mlflow_registry import RegistrySource, RegistryWatcher
from triage.serve import security
from triage.serve.app import create_app
from triage.serve.auth import AuthConfig
from triage.serve.connections import ConnectionLimits, limited_protocol
from triage.serve.descriptors import DicomDescriptorGuard, raise_open_file_limit
from triage.serve.health import ComponentStatus, DicomProbe, HealthChecks, external_workers
from triage.worklist.priority import load_policy

log = logging.getLogger(__name__)


class TriageService:
    """Everything ``triage serve`` runs, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # First: a directory misconfiguration stops the start before anything is loaded.
        self.ldap = LdapSettings.from_settings(settings)
        oidc_settings = OidcSettings.from_settings(settings)
        self.oidc = Provider(oidc_settings) if oidc_settings else None
        limits = raise_open_file_limit()
        if limits is not None and limits[1] > limits[0]:
            log.info("open-file limit raised from %d to %d", *limits)
        settings.ensure_dirs()
        self.db = Database(settings.resolved_database_url)
        self.db.migrate()
        if count_admins(self.db) == 0:
            log.warning(
                "no enabled admin account: accounts and tokens can be managed only with the"
                " CLI until one is made (`triage accounts add NAME --role admin"
                " --password-stdin`)"
            )
        policy = load_policy(settings.policy_file)
        # The models and the worker threads, unless `triage worker` processes analyse
        # (TRIAGE_EMBEDDED_WORKER=false): then this process loads no model.
        self.analyzer: Analyzer | None = None
        self.model_watcher: RegistryWatcher | None = None
        self.worker: Worker | None = None
        if settings.embedded_worker:
            self.analyzer = Analyzer.from_settings(settings)
            self.analyzer.warm_up()
            # Models served from an MLflow registry by alias (else the built-in weights).
            if settings.model_registry_uri:
                source = RegistrySource(
                    settings.model_registry_uri,
                    alias=settings.model_registry_alias,
                    cache_dir=settings.resolved_model_cache_dir / "registry",
                )
                self.model_watcher = RegistryWatcher(
                    self.analyzer.registry,
                    source,
                    poll_seconds=settings.model_registry_poll_seconds,
                )
                # The first study is analysed by the alias's version when the registry answers.
                self.model_watcher.check_once()
            self.worker = Worker.from_settings(settings, self.db, self.analyzer, policy=policy)
        # Events are queued for the webhook only when one is configured.
        webhook_kinds = frozenset(settings.webhook_kinds) if settings.webhook_url else frozenset()
        self.ingestor = Ingestor.from_settings(settings, self.db)
        stale = remove_stale_parts(settings.incoming_dir)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted write", stale)
        self.health = HealthChecks(
            db=self.db,
            disk_paths=[settings.incoming_dir, settings.store_dir, settings.results_dir],
            min_free_bytes=settings.min_free_bytes,
            # The Worker keeps its threads private; only their liveness is read here.
            worker_threads=self.worker.threads if self.worker is not None else list,
            # Analysis in `triage worker` processes: the job queue as the database shows it.
            worker=None if self.worker is not None else partial(external_workers, self.db),
            models=self._models_status,
        )
        hosts = security.allowed_hosts(settings.http_allowed_hosts, settings.http_host)
        if not settings.http_allowed_hosts and settings.http_host in security.WILDCARD_ADDRESSES:
            log.warning(
                "the web server listens on %s but answers only to %s: set"
                " TRIAGE_HTTP_ALLOWED_HOSTS to the names clients use",
                settings.http_host,
                ", ".join(hosts),
            )
        self.app = create_app(
            self.db,
            ingestor=self.ingestor,
            max_upload_bytes=settings.max_upload_bytes,
            stow_memory_bytes=settings.stow_memory_bytes,
            policy=policy,
            lease_seconds=settings.claim_lease_seconds,
            health_check=self.health,
            allowed_hosts=hosts,
            viewer_url_template=settings.viewer_url_template,
            viewer_cache_bytes=settings.viewer_cache_bytes,
            auth=AuthConfig(
                session_idle=timedelta(minutes=settings.session_idle_minutes),
                session_max_age=timedelta(hours=settings.session_max_hours),
                ldap=self.ldap,
                oidc=self.oidc,
                oidc_redirect_url=settings.oidc_redirect_url,
            ),
        )
        self.publisher = Publisher(
            self.db,
            policy=policy,
            interval_seconds=settings.events_publish_seconds,
            webhook_kinds=webhook_kinds,
            accession_system=settings.fhir_accession_system,
            retention=timedelta(hours=settings.events_retention_hours),
        )
        self.webhook: WebhookSender | None = None
        if settings.webhook_url:
            secret = settings.webhook_secret
            self.webhook = WebhookSender(
                self.db,
                WebhookConfig(
                    url=settings.webhook_url,
                    secret=secret.get_secret_value() if secret else None,
                    max_attempts=settings.webhook_max_attempts,
                    backoff_seconds=settings.webhook_backoff_seconds,
                    max_backoff_seconds=settings.webhook_backoff_max_seconds,
                    timeout_seconds=settings.webhook_timeout_seconds,
                    patient_identifiers=settings.webhook_patient_identifiers,
                ),
            )
        # DICOM results (SEG, SR) to the configured PACS destinations, retries persisted.
        self.result_sender: ResultSender | None = None
        if settings.result_destinations:
            self.result_sender = ResultSender(
                self.db,
                settings.result_destinations,
                ExportConfig(
                    calling_ae_title=settings.ae_title,
                    max_attempts=settings.result_export_max_attempts,
                    backoff_seconds=settings.result_export_backoff_seconds,
                    max_backoff_seconds=settings.result_export_backoff_max_seconds,
                    timeout_seconds=settings.result_export_timeout_seconds,
                    poll_seconds=settings.result_export_poll_seconds,
                ),
            )
        # Read by the SSE route (/api/events): poll and keep-alive intervals, FHIR options,
        # and whether the HTTP server is shutting down (open streams then end).
        self.app.state.events_poll_seconds = settings.events_poll_seconds
        self.app.state.events_keepalive_seconds = settings.events_keepalive_seconds
        self.app.state.fhir_accession_system = settings.fhir_accession_system
        self.app.state.events_closing = self._http_exiting
        self._scp: ThreadedAssociationServer | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._http_servers: list[uvicorn.Server] = []

    def _http_exiting(self) -> bool:
        """True once the HTTP server has been told to stop (SSE streams then end)."""
        return any(server.should_exit for server in self._http_servers)

    def _models_status(self) -> ComponentStatus:
        """The version of each model served, and whether it comes from the registry."""
        if self.analyzer is None:
            return ComponentStatus(
                True, "none loaded here: `triage worker` processes analyse (TRIAGE_EMBEDDED_WORKER)"
            )
        served = self.model_watcher.serving() if self.model_watcher is not None else {}
        parts = []
        for spec in self.analyzer.registry.specs:
            where = (
                f"registry v{served[spec.name]} @{self.settings.model_registry_alias}"
                if spec.name in served
                else "built-in"
            )
            parts.append(f"{spec.name} {spec.version} ({where})")
        return ComponentStatus(True, "; ".join(parts))

    def start_background(self) -> None:
        """Start the SCP, the worker, the event publisher, the webhook sender and the result
        sender (the HTTP server is started by the caller)."""
        options = ScpOptions.from_settings(self.settings)
        before = set(threading.enumerate())
        self._scp = start_scp(options, self.ingestor)
        # start_scp runs the accept loop on a new thread named "dicom-scp".
        thread = next(
            (t for t in threading.enumerate() if t.name == "dicom-scp" and t not in before), None
        )
        self.health.dicom = DicomProbe(
            self._scp, thread, options, guard=DicomDescriptorGuard(self._scp)
        )
        if self.worker is not None:
            self.worker.start()
        if self.model_watcher is not None:
            self.model_watcher.start()
        self.publisher.start()
        if self.webhook is not None:
            self.webhook.start()
        if self.result_sender is not None:
            self.result_sender.start()

    def _uvicorn(self) -> uvicorn.Server:
        s = self.settings
        limits = ConnectionLimits(
            max_connections=s.http_max_connections,
            header_timeout_seconds=s.http_header_timeout_seconds,
            body_timeout_seconds=s.http_body_timeout_seconds,
        )
        config = uvicorn.Config(
            self.app,
            host=s.http_host,
            port=s.http_port,
            log_level="warning",
            access_log=False,
            ssl_certfile=s.https_cert,
            ssl_keyfile=s.https_key,
            # Connections past the cap are refused (503) by the protocol class; the
            # kernel's queue of connections not yet accepted holds no more than that.
            http=limited_protocol(limits),
            backlog=s.http_max_connections,
            timeout_keep_alive=s.http_keepalive_seconds,
        )
        server = uvicorn.Server(config)
        self._http_servers.append(server)
        return server

    def serve_forever(self) -> None:
        """Run until interrupted (Ctrl-C / SIGTERM)."""
        self.start_background()
        try:
            self._uvicorn().run()
        finally:
            self.stop()

    def start_http_thread(self) -> None:
        self._http = self._uvicorn()
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 20
        while not self._http.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(5)
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None
        if self.worker is not None:
            self.worker.stop()
        if self.model_watcher is not None:
            self.model_watcher.stop()
        self.publisher.stop()
        if self.webhook is not None:
            self.webhook.stop()
        if self.result_sender is not None:
            self.result_sender.stop()
        self.db.dispose()
