"""The DICOM Storage SCP (pynetdicom): C-ECHO and C-STORE for CT, CR, DX and secondary capture.

Handlers are small named functions that return DICOM status codes; they store and index,
and never decode pixels or run a model (the worker does that later).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from triage.db import Database
from triage.ingest.store import StoreStatus, ingest_instance

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

# Every transfer syntax pydicom knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000,
# RLE, ...): files are stored exactly as received, without transcoding.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [str(uid) for uid in AllTransferSyntaxes]


@dataclass
class StoreContext:
    db: Database
    store_dir: Path
    tmp_dir: Path
    quarantine_dir: Path


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: the verification service answers success."""
    return 0x0000


def handle_store(event: evt.Event, ctx: StoreContext) -> int:
    """C-STORE: store the instance as received, index it, answer with a DICOM status."""
    calling = str(event.assoc.requestor.ae_title).strip()
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception as exc:  # malformed command or data set: never crash the association
        log.warning("C-STORE from %s could not be read: %s", calling, type(exc).__name__)
        return int(StoreStatus.cannot_understand)
    return int(
        ingest_instance(
            data,
            db=ctx.db,
            store_dir=ctx.store_dir,
            tmp_dir=ctx.tmp_dir,
            quarantine_dir=ctx.quarantine_dir,
            source=f"dicom:{calling}",
        ).status
    )


def make_ae(ae_title: str, allowed_calling_aets: Sequence[str] = ()) -> AE:
    """The AE: the called AE title must match; when ``allowed_calling_aets`` is not empty,
    associations from other calling AE titles are rejected (A-ASSOCIATE-RJ)."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    ae.require_called_aet = True
    if allowed_calling_aets:
        ae.require_calling_aet = [a.strip() for a in allowed_calling_aets]
    ae.maximum_associations = 16
    return ae


def start_scp(
    *,
    host: str,
    port: int,
    ae_title: str,
    ctx: StoreContext,
    allowed_calling_aets: Sequence[str] = (),
) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return its server (call ``shutdown()``)."""
    ae = make_ae(ae_title, allowed_calling_aets)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
    ]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    assert server is not None  # block=False always returns the server
    log.info("DICOM SCP %s listening on %s:%d", ae_title, host, port)
    return server
