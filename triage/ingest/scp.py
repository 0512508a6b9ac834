"""The DICOM Storage SCP (pynetdicom): C-ECHO, and C-STORE for every storage SOP class.

Handlers are small named functions that return DICOM status codes; they store and index
through :class:`triage.ingest.store.Ingestor`, and never decode pixels or run a model (the
worker does that later). Access control: called AE title, optional calling-AE and peer-address
allow-lists, association and PDU limits, optional TLS.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from triage.config import Settings
from triage.ingest.store import Ingestor, StoreStatus

log = logging.getLogger(__name__)

# Identifier data sets (query keys: patient names, IDs) must never reach the log.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

# Every transfer syntax pydicom knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000,
# RLE, ...): files are stored exactly as received, without transcoding.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [str(uid) for uid in AllTransferSyntaxes]

# Every storage SOP class is accepted: studies outside the models' scope (MR, US, SR, ...)
# are stored and listed as ``no_applicable_model``, never refused at the door.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: the verification service answers success."""
    return 0x0000


def handle_rejected(event: evt.Event) -> None:
    """Log a rejected association (AE titles and the address, no patient data)."""
    requestor = event.assoc.requestor
    log.warning(
        "rejected a DICOM association from %s (calling AE %r, called AE %r)",
        requestor.address,
        str(requestor.ae_title).strip(),
        str(event.assoc.acceptor.ae_title).strip() if event.assoc.acceptor else "",
    )


def handle_store(event: evt.Event, ingestor: Ingestor) -> int:
    """C-STORE: store the instance as received, index it, answer with a DICOM status."""
    calling = str(event.assoc.requestor.ae_title).strip()
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception as exc:  # malformed command or data set: never crash the association
        log.warning("C-STORE from %s could not be read: %s", calling, type(exc).__name__)
        return int(StoreStatus.cannot_understand)
    request = event.request
    sop_class = getattr(request, "AffectedSOPClassUID", None)
    sop_instance = getattr(request, "AffectedSOPInstanceUID", None)
    return int(
        ingestor.ingest(
            data,
            source=f"dicom:{calling}",
            expected_sop_class=str(sop_class) if sop_class else None,
            expected_sop_instance=str(sop_instance) if sop_instance else None,
        ).status
    )


@dataclass(frozen=True)
class ScpOptions:
    """Network settings of the listener (see ``triage.config.Settings``)."""

    host: str
    port: int
    ae_title: str
    allowed_calling_aets: Sequence[str] = ()
    allowed_peer_addresses: Sequence[str] = ()
    max_associations: int = 16
    max_pdu_bytes: int = 262144
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ScpOptions:
        return cls(
            host=settings.dicom_host,
            port=settings.dicom_port,
            ae_title=settings.ae_title,
            allowed_calling_aets=tuple(settings.allowed_calling_aets),
            allowed_peer_addresses=tuple(settings.allowed_peer_addresses),
            max_associations=settings.max_associations,
            max_pdu_bytes=settings.max_pdu_bytes,
            tls_cert=settings.dicom_tls_cert,
            tls_key=settings.dicom_tls_key,
            tls_ca=settings.dicom_tls_ca,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context, or None for plain TCP."""
        if self.tls_cert is None and self.tls_key is None:
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("DICOM TLS needs both TRIAGE_DICOM_TLS_CERT and TRIAGE_DICOM_TLS_KEY")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=self.tls_cert, keyfile=self.tls_key)
        if self.tls_ca is not None:
            context.load_verify_locations(cafile=self.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def parse_networks(values: Sequence[str]) -> list[IPv4Network | IPv6Network]:
    """Addresses and CIDR networks from settings; a bad entry is an error naming it."""
    networks: list[IPv4Network | IPv6Network] = []
    for value in values:
        try:
            networks.append(ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"TRIAGE_ALLOWED_PEER_ADDRESSES: {value!r} is not an address") from exc
    return networks


class _PeerFilteringServer(ThreadedAssociationServer):
    """The threaded association server, closing connections from addresses not allowed."""

    allowed_networks: list[IPv4Network | IPv6Network] = []

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            address = ip_address(host)
        except ValueError:
            return False
        if any(address in net for net in self.allowed_networks):
            return True
        log.warning("refused a DICOM connection from %s (not in allowed peer addresses)", host)
        return False


def make_ae(options: ScpOptions) -> AE:
    """The AE: the called AE title must match; when ``allowed_calling_aets`` is not empty,
    associations from other calling AE titles are rejected (A-ASSOCIATE-RJ)."""
    ae = AE(ae_title=options.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    ae.require_called_aet = True
    if options.allowed_calling_aets:
        ae.require_calling_aet = [a.strip() for a in options.allowed_calling_aets]
    ae.maximum_associations = options.max_associations
    ae.maximum_pdu_size = options.max_pdu_bytes
    return ae


def start_scp(options: ScpOptions, ingestor: Ingestor) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return its server (call ``shutdown()``)."""
    ae = make_ae(options)
    networks = parse_networks(options.allowed_peer_addresses)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingestor]),
        (evt.EVT_REJECTED, handle_rejected),
    ]
    server_class = type(
        "PeerFilteringServer", (_PeerFilteringServer,), {"allowed_networks": networks}
    )
    server = ae.make_server(
        (options.host, options.port),
        ssl_context=options.ssl_context(),
        evt_handlers=handlers,
        server_class=server_class,
    )
    # As AE.start_server does (it has no way to pass a server class): the AE keeps its
    # servers, and AssociationServer.shutdown() removes itself from that list.
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
    thread.start()
    log.info(
        "DICOM SCP %s listening on %s:%d%s",
        options.ae_title,
        options.host,
        options.port,
        " (TLS)" if server.ssl_context else "",
    )
    open_to = accepts_anyone(options)
    if open_to:
        log.warning("the DICOM listener accepts %s", open_to)
    return server


def accepts_anyone(options: ScpOptions) -> str | None:
    """What the listener lets in without a check, in words, or None when both the calling
    AE titles and the peer addresses are restricted."""
    loose = []
    if not options.allowed_calling_aets:
        loose.append("any calling AE title (set TRIAGE_ALLOWED_CALLING_AETS)")
    if not options.allowed_peer_addresses and options.host not in ("127.0.0.1", "::1", "localhost"):
        loose.append("any peer address (set TRIAGE_ALLOWED_PEER_ADDRESSES)")
    return " and ".join(loose) if loose else None
