"""``triage demo``: serve, send demo studies with a real DICOM client, show the worklist."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from triage.config import Settings
from triage.db import Database


@functools.cache
def dcmtk_tool(name: str) -> str | None:
    """Path of a DCMTK command-line tool, skipping same-named scripts (pynetdicom ships a
    ``storescu`` of its own) by checking that ``--version`` names DCMTK."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            out = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(candidate)
    return None


# storescu's option that proposes a compressed transfer syntax first, so that files are sent
# (and stored) as they are rather than converted; uncompressed files need none.
STORESCU_PROPOSE: dict[str, str] = {
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57": "-xs",  # JPEG lossless
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2": "-xb",  # explicit VR big endian
    "1.2.840.10008.1.2": "-xi",  # implicit VR little endian
}


def storescu_commands(
    storescu: str,
    paths: Sequence[Path],
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "DEMO",
) -> list[list[str]]:
    """storescu command lines for the files, one per transfer syntax, in first-seen order."""
    from pydicom import dcmread

    groups: dict[str, list[str]] = {}
    for p in paths:
        ts = str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSE.get(ts, "-xe"), []).append(str(p))
    base = [storescu, "-aet", calling_ae, "-aec", called_ae]
    return [[*base, opt, host, str(port), *files] for opt, files in groups.items()]


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools: ``TCP_NODELAY=1`` turns off Nagle's algorithm,
    which DCMTK leaves on by default; with it on, every C-STORE waits for a delayed ACK
    (about 40 ms on Linux)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def send_dicom(
    paths: Sequence[Path], *, host: str, port: int, called_ae: str, calling_ae: str = "DEMO"
) -> str:
    """Send files over DICOM C-STORE. Uses DCMTK's storescu when installed, else pynetdicom.

    Returns:
        The name of the client used.
    """
    storescu = dcmtk_tool("storescu")
    if storescu:
        for cmd in storescu_commands(
            storescu, paths, host=host, port=port, called_ae=called_ae, calling_ae=calling_ae
        ):
            subprocess.run(cmd, check=True, capture_output=True, env=dcmtk_env())
        return "storescu"
    send_with_pynetdicom(paths, host=host, port=port, called_ae=called_ae, calling_ae=calling_ae)
    return "pynetdicom"


def send_with_pynetdicom(
    paths: Sequence[Path], *, host: str, port: int, called_ae: str, calling_ae: str = "DEMO"
) -> None:
    """C-STORE with pynetdicom, proposing each file's own SOP class and transfer syntax,
    so that compressed files are sent as they are (the fallback when DCMTK is absent)."""
    from pydicom import dcmread
    from pynetdicom import AE

    contexts: dict[tuple[str, str], None] = {}
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        contexts[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    if len(contexts) > 128:
        raise RuntimeError(f"{len(contexts)} presentation contexts needed; at most 128 fit")
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"association with {called_ae}@{host}:{port} was not established")
    try:
        for p in paths:
            status = assoc.send_c_store(p)
            if getattr(status, "Status", None) != 0:
                raise RuntimeError(f"C-STORE of {p.name} failed")
    finally:
        assoc.release()


def make_demo_studies(out_dir: Path) -> list[tuple[str, list[Path]]]:
    """Synthetic head CTs (normal, haemorrhage) and a real radiograph from pydicom-data."""
    from triage.demo.phantom import PhantomSpec, write_head_ct_series
    from triage.demo.xray import write_demo_radiograph

    if out_dir.exists():
        shutil.rmtree(out_dir)
    studies = [
        (
            "head CT, normal (synthetic)",
            write_head_ct_series(
                out_dir / "ct-normal",
                PhantomSpec(haemorrhage=False, seed=1),
                patient_name="PHANTOM^NORMAL",
            ),
        ),
        ("chest X-ray (pydicom-data)", write_demo_radiograph(out_dir / "xray")),
        (
            "head CT, haemorrhage (synthetic)",
            write_head_ct_series(
                out_dir / "ct-bleed",
                PhantomSpec(haemorrhage=True, seed=2),
                patient_name="PHANTOM^BLEED",
            ),
        ),
    ]
    return studies


class DemoError(Exception):
    """The demo ran but did not show what it is for: the AI analysed none of the studies."""


def demo_problem(doc: dict[str, Any], timeout_s: float) -> str | None:
    """Why the demo failed, from the worklist document after the wait (None: it worked,
    at least one study was analysed ``ok`` or ``partial``)."""
    items = doc["items"]
    if not items:
        return "no demo study reached the worklist"
    if any(i["ai_status"] in ("ok", "partial") for i in items):
        return None
    pending = [i for i in items if i["ai_status"] == "pending"]
    if pending:
        return (
            f"the AI did not finish {len(pending)} of {len(items)} demo studies within"
            f" {timeout_s:.0f} s"
        )
    reasons = list(dict.fromkeys(i["ai_error"] for i in items if i.get("ai_error")))
    statuses = ", ".join(sorted({i["ai_status"] for i in items}))
    why = "; ".join(reasons) if reasons else f"AI status {statuses}"
    return f"the AI analysed none of the {len(items)} demo studies: {why}"


DEMO_USER = "demo"


def demo_account(db: Database) -> str:
    """The demo's admin account ``demo`` with a new random password (returned, to print):
    made at the first run, its password replaced at each later one (recorded in the audit
    trail either way)."""
    from triage.audit.chain import AuditEvent, append
    from triage.auth.accounts import create_account, get_account, set_password
    from triage.auth.roles import Role

    password = secrets.token_urlsafe(12)
    if get_account(db, DEMO_USER) is None:
        create_account(db, DEMO_USER, Role.admin, password=password, display_name="Demo reader")
        action = "account_create"
    else:
        set_password(db, DEMO_USER, password)
        action = "account_password"
    append(
        db,
        AuditEvent(
            action=action,
            actor="triage-demo",
            target_kind="account",
            target=DEMO_USER,
            source_address="local",
        ),
    )
    return password


def run_demo(
    settings: Settings,
    *,
    console: Console,
    keep_serving: bool,
    print_worklist: Callable[[dict[str, Any]], None],
    timeout_s: float = 900.0,
) -> None:
    """Serve, send the demo studies, wait for the AI and print the worklist.

    Raises:
        DemoError: no study was analysed (e.g. the model weights are missing); the worklist
            has been printed, and the server is stopped.
    """
    from triage.serve.server import TriageService
    from triage.worklist.service import worklist

    service = TriageService(settings)
    password = demo_account(service.db)
    service.start_background()
    service.start_http_thread()
    url = f"http://{settings.http_host}:{settings.http_port}/"
    console.print(
        f"[bold]triage[/] is serving: page {url}  DICOM {settings.ae_title}@"
        f"{settings.dicom_host}:{settings.dicom_port}",
        highlight=False,
    )
    sign_in = f"Sign in as [bold]{DEMO_USER}[/] with the password [bold]{password}[/]"
    console.print(f"{sign_in} (an admin account, its password new at each run).", highlight=False)
    try:
        studies = make_demo_studies(settings.data_dir / "demo-studies")
        host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "") else settings.dicom_host
        for label, paths in studies:
            client = send_dicom(
                paths, host=host, port=settings.dicom_port, called_ae=settings.ae_title
            )
            console.print(f"sent {label}: {len(paths)} instance(s) with {client}")
        t0 = time.monotonic()
        with console.status("waiting for the AI to read the studies…"):
            while time.monotonic() - t0 < timeout_s:
                doc = worklist(service.db)
                if doc["items"] and all(i["ai_status"] != "pending" for i in doc["items"]):
                    break
                time.sleep(1.0)
        doc = worklist(service.db)
        problem = demo_problem(doc, timeout_s)
        if not any(i["ai_status"] == "pending" for i in doc["items"]):
            console.print(f"AI finished in {time.monotonic() - t0:.0f} s")
        print_worklist(doc)
        if problem is not None:
            raise DemoError(problem)
        if keep_serving:
            console.print(
                f"Open {url} to see the worklist. {sign_in}. Ctrl-C stops.",
                highlight=False,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
