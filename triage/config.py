"""The one settings object. Nothing else in ``triage`` reads the environment."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ResultDestination(BaseModel):
    """A DICOM node (a PACS, a viewer's store) that receives the AI's DICOM results by
    C-STORE; ``TRIAGE_RESULT_DESTINATIONS`` is a JSON list of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(min_length=1, max_length=16, description="Its called AE title.")
    host: str = Field(min_length=1, max_length=253, description="Its host name or address.")
    port: int = Field(ge=1, le=65535, description="Its DICOM port.")
    tls: bool = Field(default=False, description="DICOM over TLS (the certificate checked).")
    ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle its TLS certificate is checked against; None: the system's CAs.",
    )
    cert_file: Path | None = Field(
        default=None, description="PEM client certificate for mutual TLS (with key_file)."
    )
    key_file: Path | None = Field(default=None, description="PEM key of cert_file.")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        # PS3.5 AE: 16 characters of the default repertoire, no backslash or control
        # characters, not only spaces.
        if not value.strip() or any(c == "\\" or not " " <= c <= "~" for c in value):
            raise ValueError("an AE title is 1 to 16 printable ASCII characters, no backslash")
        return value.strip()

    @property
    def name(self) -> str:
        """How the destination is named in the export records: ``AE@host:port``."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class Settings(BaseSettings):
    """All runtime settings, from ``TRIAGE_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("triage-data"), description="Root of the file store.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: SQLite file <data_dir>/triage.db.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    dicom_host: str = Field(
        default="127.0.0.1",
        description="Interface of the DICOM listener: loopback until a site opens it (set the"
        " address the PACS reaches, or 0.0.0.0 for every interface).",
    )
    dicom_port: int = 11112
    ae_title: str = "TRIAGE"
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate (JSON list); empty allows any.",
    )
    allowed_peer_addresses: list[str] = Field(
        default_factory=list,
        description="IP addresses or networks (CIDR) allowed to connect to the DICOM port"
        " (JSON list); empty allows any.",
    )
    max_associations: int = Field(
        default=16, ge=1, description="Concurrent DICOM associations; more are rejected."
    )
    max_pdu_bytes: int = Field(
        default=262144,
        ge=0,
        description="Largest P-DATA PDU the DICOM listener accepts (0: no limit).",
    )
    dicom_tls_cert: Path | None = Field(
        default=None, description="PEM certificate: DICOM over TLS when set (with the key)."
    )
    dicom_tls_key: Path | None = Field(default=None, description="PEM private key for TLS.")
    dicom_tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle: when set, DICOM TLS peers must present a certificate"
        " signed by it (mutual TLS).",
    )
    https_cert: Path | None = Field(
        default=None, description="PEM certificate: the HTTP API is served over HTTPS when set."
    )
    https_key: Path | None = Field(default=None, description="PEM private key for HTTPS.")
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the web server answers to (JSON list; the Host header of other"
        " requests gets 400, against DNS rebinding); empty: localhost, 127.0.0.1, ::1 and"
        ' http_host unless it is a wildcard address; ["*"] turns the check off.',
    )
    http_max_connections: int = Field(
        default=256,
        ge=1,
        description="Open HTTP connections at most; more are answered 503 and closed at once"
        " (keeps the process's descriptors below the 1024 that the DICOM listener can use).",
    )
    http_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A connection that has not sent a whole request header this long after"
        " it opened (or after its first byte, on a kept-alive connection) is closed.",
    )
    http_body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A connection is closed when a request body stops arriving for this long.",
    )
    http_keepalive_seconds: int = Field(
        default=5, ge=1, description="An idle kept-alive HTTP connection is closed after this."
    )
    max_pixel_bytes: int = Field(
        default=4 * 1024**3,
        gt=0,
        description="Refuse instances whose Rows x Columns x frames x samples x bits exceeds"
        " this (checked from the header, before pixel data is read).",
    )
    max_upload_bytes: int = Field(
        default=1024**3,
        gt=0,
        description="Largest STOW-RS request body accepted (streamed to a file in the data"
        " directory as it arrives, not held in memory).",
    )
    stow_memory_bytes: int = Field(
        default=512 * 1024**2,
        gt=0,
        description="STOW-RS parts being checked and stored hold at most this many bytes in"
        " memory together, over all concurrent requests; the others wait their turn (a"
        " part larger than this runs alone).",
    )
    viewer_cache_bytes: int = Field(
        default=512 * 1024**2,
        ge=0,
        description="The image viewer keeps at most this many bytes of decoded slices (as"
        " served, compressed) and overlays mapped onto the source images in memory, least"
        " recently used dropped first; 0 keeps nothing.",
    )
    min_free_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description="Below this much free disk, input is refused with 0xA700 (senders retry).",
    )
    duplicate_policy: Literal["keep_first", "replace", "reject"] = Field(
        default="keep_first",
        description="A different instance under a known SOPInstanceUID: keep the first"
        " (the new copy goes to quarantine), replace it (and analyse again), or reject it.",
    )
    max_element_bytes: int = Field(
        default=256 * 1024**2,
        gt=0,
        description="Refuse instances with any one element value other than pixel data (a"
        " private blob, an encapsulated document) over this many bytes (checked from the"
        " element's header, before its value is read).",
    )
    max_inflated_bytes: int = Field(
        default=256 * 1024**2,
        gt=0,
        description="Refuse Deflated Explicit VR Little Endian instances whose data set"
        " inflates to more than this many bytes (inflated in steps, never past it).",
    )
    model_mirror: str | None = Field(
        default=None,
        description="Directory or URL prefix holding <model>/<file> weight files (offline use).",
    )
    model_cache_dir: Path | None = Field(
        default=None, description="Where verified weights are cached; default <data_dir>/models."
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Where models run: auto (a CUDA GPU when there is one), cpu, cuda or"
        " cuda:N (the GPU of that index, e.g. one per `triage worker`).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Compute precision of the segmentation models; auto: bf16 on a CUDA GPU"
        " and on a CPU that computes bf16 natively (AVX512-BF16 or AMX), else fp32.",
    )
    ensemble_members: int | None = Field(
        default=None,
        ge=1,
        le=12,
        description="Ensemble size of ensemble models; default 1 on CPU, all (12) on CUDA.",
    )
    policy_file: Path | None = Field(
        default=None,
        description="TOML or JSON file configuring the worklist priority policy"
        " (service-level times, aging, AI escalation); default: the built-in policy.",
    )
    claim_lease_seconds: float = Field(
        default=900.0,
        ge=30,
        le=86400,
        description="How long a reader's claim on a study lasts without renewal (30 s to"
        " 24 h, the range the API accepts).",
    )
    series_quiet_seconds: float = Field(default=2.0, gt=0)
    study_max_wait_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A study still receiving after this long is analysed with what arrived"
        " (and again when it goes quiet).",
    )
    worker_poll_seconds: float = Field(default=0.5, gt=0)
    embedded_worker: bool = Field(
        default=True,
        description="`triage serve` assembles and analyses studies itself (worker threads);"
        " false: it only receives and serves, and `triage worker` processes analyse.",
    )
    job_lease_seconds: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="A worker's claim on an analysis job lapses this long after its last"
        " renewal (renewed every third of it while it runs); the job of a worker that died"
        " is then taken by another.",
    )
    job_max_attempts: int = Field(
        default=3,
        ge=1,
        description="Claims of one analysis job whose worker stopped each time before it is"
        " failed (a study that crashes workers cannot crash them all in turn).",
    )
    models: list[str] = Field(
        default_factory=list,
        description="Names of the installed models to run (`triage models`); empty: all.",
    )
    model_specs_dir: Path | None = Field(
        default=None,
        description="A folder of the site's own model spec files (*.json); a spec named like a"
        " shipped one replaces it.",
    )
    weight_sha256: dict[str, str] = Field(
        default_factory=dict,
        description='The site\'s sha256 pins, {"<model>/<file>": "<sha256>"}, for weight files'
        " whose spec publishes none (e.g. the chest X-ray model's).",
    )
    model_registry_uri: str | None = Field(
        default=None,
        description="MLflow model registry to serve models from (sqlite:///<path>/mlflow.db,"
        " http://mlflow:5000): an installed model whose registered model of the same name has"
        " the alias is served in that version; unset: the built-in pinned weights.",
    )
    model_registry_alias: str = Field(
        default="champion",
        min_length=1,
        max_length=256,
        description="The registry alias served (moved by `triage-train promote`).",
    )
    model_registry_poll_seconds: float = Field(
        default=30.0,
        ge=0.5,
        le=3600,
        description="Seconds between checks of the registry alias (a promotion is served"
        " within this time plus the download and load).",
    )
    finding_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description='Flag thresholds per finding, {"intracranial_haemorrhage": 1.0} (ml for'
        " volumes, calibrated score for classifiers); default: each model spec's.",
    )
    events_publish_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often the worklist is compared to emit worklist_changed/task events.",
    )
    events_poll_seconds: float = Field(
        default=0.5, gt=0, description="How often an SSE stream (/api/events) reads new events."
    )
    events_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="An SSE comment is sent after this long without events."
    )
    events_retention_hours: float = Field(
        default=168.0,
        gt=0,
        description="Events older than this are deleted (those the webhook still owes kept).",
    )
    fhir_accession_system: str | None = Field(
        default=None,
        description="FHIR identifier system of accession numbers in Task.identifier.",
    )
    webhook_url: str | None = Field(
        default=None,
        description="POST events of webhook_kinds to this URL (None: no webhook).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="When set, X-Triage-Signature: sha256=<HMAC-SHA256 of the body>.",
    )
    webhook_kinds: list[str] = Field(
        default_factory=lambda: ["critical_finding"],
        description="Event kinds sent to the webhook (JSON list).",
    )
    webhook_patient_identifiers: bool = Field(
        default=False,
        description="Whether webhook bodies carry accession numbers (critical_finding"
        " payloads, FHIR Task identifiers); off: the StudyInstanceUID only.",
    )
    webhook_max_attempts: int = Field(
        default=8, ge=1, description="Attempts before a webhook event is marked failed."
    )
    webhook_backoff_seconds: float = Field(
        default=2.0,
        gt=0,
        description="First retry wait; doubled per failed attempt, at most"
        " webhook_backoff_max_seconds.",
    )
    webhook_backoff_max_seconds: float = Field(default=600.0, gt=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    result_destinations: list[ResultDestination] = Field(
        default_factory=list,
        description="DICOM nodes that receive every new DICOM result (SEG, SR) by C-STORE"
        ' (JSON list of {"ae_title", "host", "port", "tls": false, "ca_file", "cert_file",'
        ' "key_file"}); empty: results are kept and downloadable only.',
    )
    result_export_max_attempts: int = Field(
        default=10, ge=1, description="Attempts before a result's export is marked failed."
    )
    result_export_backoff_seconds: float = Field(
        default=30.0,
        gt=0,
        description="First retry wait of a failed export; doubled per failed attempt, at most"
        " result_export_backoff_max_seconds.",
    )
    result_export_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    result_export_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Connect, association and each C-STORE response time out after this.",
    )
    result_export_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often the sender looks for exports that are due."
    )
    atna_syslog: str | None = Field(
        default=None,
        description="Send every audit record as a DICOM PS3.15 A.5 audit message (IHE ATNA"
        " ITI-20) to this syslog destination: udp://host[:514], tcp://host:port (RFC 5425"
        " framing without TLS) or tls://host[:6514]; None: no syslog (the database audit"
        " chain is kept either way).",
    )
    atna_source_id: str | None = Field(
        default=None,
        description="AuditSourceID of the audit messages; default triage@<host name>.",
    )
    atna_enterprise_site_id: str | None = Field(
        default=None, description="AuditEnterpriseSiteID of the audit messages (optional)."
    )
    atna_tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle the tls:// audit repository's certificate is checked"
        " against; default: the system's trusted CAs.",
    )
    atna_tls_cert: Path | None = Field(
        default=None,
        description="PEM client certificate for tls:// (ATNA node authentication, with the key).",
    )
    atna_tls_key: Path | None = Field(default=None, description="PEM key of atna_tls_cert.")
    atna_queue_size: int = Field(
        default=1000,
        ge=1,
        description="Audit messages waiting to be sent at most; more are dropped (counted and"
        " logged), never waited for.",
    )
    atna_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Connect and send timeout towards the syslog destination; after a failure"
        " messages are dropped for as long, then it is tried again.",
    )
    ldap_url: str | None = Field(
        default=None,
        description="The hospital directory (LDAP, Active Directory): ldap://host[:port] or"
        " ldaps://host[:port]; None: no sign-in through the directory.",
    )
    ldap_bind_dn: str | None = Field(
        default=None,
        description="DN of the service account that searches the directory for users; None:"
        " searches are anonymous.",
    )
    ldap_bind_password: SecretStr | None = Field(
        default=None, description="Password of the service account (ldap_bind_dn)."
    )
    ldap_user_base: str | None = Field(
        default=None,
        description="Where users are searched (subtree), e.g. ou=people,dc=hospital,dc=local;"
        " needed when ldap_url is set.",
    )
    ldap_user_filter: str = Field(
        default="(&(objectClass=person)(uid={username}))",
        description="Filter finding one user; {username} is replaced by the escaped username"
        " (Active Directory: (&(objectClass=user)(sAMAccountName={username}))).",
    )
    ldap_group_base: str | None = Field(
        default=None,
        description="Where groupOfNames/groupOfUniqueNames groups listing the user as member"
        " are searched (subtree), besides the user's memberOf; None: memberOf only.",
    )
    ldap_group_roles: dict[str, Literal["admin", "radiologist", "integration"]] = Field(
        default_factory=dict,
        description='Group DN -> role, {"cn=radiologists,ou=groups,dc=hospital,dc=local":'
        ' "radiologist"} (JSON); a user gets the highest role of their groups (admin >'
        " radiologist > integration); a user in none of them cannot sign in.",
    )
    ldap_starttls: bool = Field(
        default=False,
        description="Upgrade ldap:// connections with StartTLS before anything is sent.",
    )
    ldap_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle the directory's certificate is checked against (ldaps:// or"
        " StartTLS); None: the system's CAs.",
    )
    ldap_timeout_seconds: int = Field(
        default=5,
        ge=1,
        le=300,
        description="Connecting to the directory, and each of its answers, times out after"
        " this many seconds (the sign-in is then refused as directory unavailable).",
    )

    oidc_issuer: str | None = Field(
        default=None,
        description="The OpenID Connect provider (its issuer URL, https://); None: no single"
        " sign-on. Needs oidc_client_id and oidc_group_roles.",
    )
    oidc_client_id: str | None = Field(default=None, description="This server's client id.")
    oidc_client_secret: SecretStr | None = Field(
        default=None, description="The client secret (client_secret_basic); None: public client."
    )
    oidc_scopes: list[str] = Field(
        default_factory=lambda: ["openid", "profile", "email"],
        description="Scopes asked for (JSON list); add the one that carries groups if the"
        " provider needs it.",
    )
    oidc_username_claim: str = Field(
        default="preferred_username", description="The claim that is the username."
    )
    oidc_groups_claim: str = Field(default="groups", description="The claim listing groups.")
    oidc_group_roles: dict[str, Literal["admin", "radiologist", "integration"]] = Field(
        default_factory=dict,
        description='Group -> role, {"radiologists": "radiologist"} (JSON); the highest'
        " wins; a user in none of them cannot sign in.",
    )
    oidc_display_name: str = Field(
        default="single sign-on", description="The provider's name on the sign-in button."
    )
    oidc_redirect_url: str | None = Field(
        default=None,
        description="The redirect URI registered at the provider; None: this server's"
        " /api/auth/oidc/callback as the browser reaches it.",
    )
    oidc_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle for the provider's certificate."
    )
    oidc_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="Each request to the provider times out after this."
    )
    viewer_url_template: str | None = Field(
        default=None,
        description="The study in the site's PACS viewer, for the page's 'Open in viewer' link:"
        " an http(s) URL with {StudyInstanceUID} and/or {AccessionNumber}, e.g."
        " https://pacs.example.org/viewer?StudyInstanceUIDs={StudyInstanceUID}.",
    )

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("https://", "http://")) or not any(
            p in value for p in ("{StudyInstanceUID}", "{AccessionNumber}")
        ):
            raise ValueError("an http(s) URL with {StudyInstanceUID} or {AccessionNumber} in it")
        return value

    session_idle_minutes: float = Field(
        default=60.0,
        gt=0,
        le=24 * 60,
        description="A page session ends after this many minutes without a request (the page"
        " polls while open, so this counts from when it was closed or the computer slept).",
    )
    session_max_hours: float = Field(
        default=12.0,
        gt=0,
        le=7 * 24,
        description="A page session ends this many hours after sign-in, however active.",
    )

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or (self.data_dir / "models")

    def ensure_dirs(self) -> None:
        for d in (
            self.data_dir,
            self.store_dir,
            self.incoming_dir,
            self.quarantine_dir,
            self.results_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
