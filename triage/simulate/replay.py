"""Replay a simulated day through the real HTTP API of a running server.

``triage simulate --replay URL --tokens FILE --speed N`` draws the same day as the simulator
(:func:`triage.simulate.model.generate_studies`: arrivals, order priorities, locations, the
AI's results, read times) and plays it, ``N`` times faster than real time, against a
``triage serve`` that was started for it (:mod:`triage.simulate.replay_setup`,
``--replay-setup``):

* **Arrivals.** Senders (:data:`SENDERS` threads, in arrival order) post each study, at its
  simulated arrival, as a real DICOM instance through STOW-RS (``POST /dicomweb/studies``)
  with the ingest token. The instance carries the order priority
  (``RequestedProcedurePriority``), the patient location (``CurrentPatientLocation``, a
  text the server's ingest reads as ``emergency`` or ``inpatient``) and, for a modality
  the simulated AI covers, the drawn AI result in a private block that the replay model
  (:mod:`triage.simulate.replay_model`) reports as its finding. The server's worker
  analyses it like any study, so the finding arrives after the server's own assembly and
  analysis delay.
* **Readers.** One HTTP client per simulated radiologist (one account each: the server's
  reader is the account behind the token): ``POST /api/worklist/next``; on a study, "read"
  for its simulated read time (scaled), ``POST /api/studies/{uid}/complete``, again; on
  204, wait for the next arrival (the senders wake idle readers, as a worklist page is
  woken by the event stream; a fallback poll every second). A roster
  (``radiologists_by_hour``) puts reader ``k`` on duty while ``k < readers_at(hour)``.
* **Deadlines.** The server's policy runs in real minutes, so the replay needs the
  simulated policy with every service-level time divided by ``N``
  (:func:`~triage.simulate.replay_setup.scaled_policy`); the replay refuses to start when
  the server's policy digest (``policy_config`` of ``GET /api/worklist``) is another.
* **Waits.** A study's wait is measured by the clients: from the moment its STOW-RS request
  was sent to the moment a reader's ``/next`` answer returned it, in simulated minutes
  (real seconds x ``N`` / 60). :mod:`triage.simulate.replay_report` sets them next to the
  simulated FIFO and policy orderings of the same day.

Nothing here reads the server's database: what is compared is what the API gave the
readers. Only the set-up (:func:`triage.simulate.replay_setup.prepare_replay`) writes to
the server's data folder (the replay's accounts and tokens), before the server starts.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from triage.simulate.config import SimulationConfig
from triage.simulate.model import RunResult, SimStudy, generate_studies, run_day
from triage.simulate.replay_model import (
    MODALITIES,
    MODEL_NAME,
    PROTOCOL,
    PROTOCOL_NOT_COVERED,
    SimulatedResult,
    write_result,
)
from triage.simulate.replay_setup import (
    LOCATION_TEXT,
    ReplayError,
    ReplayTokens,
    check_config,
    check_speed,
    reader_count,
    scaled_policy,
    server_timing,
)

__all__ = [
    "ReplayError",
    "ReplayResult",
    "ServerFacts",
    "StudyTrace",
    "StudyUids",
    "preflight",
    "run_replay",
    "study_instance",
]

SENDERS = 4
"""Threads sending the studies: a study is sent at its arrival time even while up to three
earlier ones are still being stored (one sender falls behind when storing takes longer than
the gap between arrivals)."""

IDLE_POLL_SECONDS = 1.0
"""An idle reader asks ``/next`` again after this long even when no arrival woke it."""

STOW_BOUNDARY = "triage-replay-boundary"

_SOP_CLASS = {
    "CT": CTImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "MR": MRImageStorage,
}

# Words of a simulated modality's name -> BodyPartExamined (PS3.16 Annex L terms).
_BODY_PART_WORDS: dict[str, str] = {
    "HEAD": "HEAD",
    "BRAIN": "HEAD",
    "NECK": "NECK",
    "CHEST": "CHEST",
    "THORAX": "CHEST",
    "LUNG": "CHEST",
    "ABDOMEN": "ABDOMEN",
    "ABDO": "ABDOMEN",
    "PELVIS": "PELVIS",
    "SPINE": "SPINE",
    "BREAST": "BREAST",
    "EXTREMITY": "EXTREMITY",
    "KNEE": "KNEE",
    "HAND": "HAND",
}
_DEFAULT_BODY_PART = {"CR": "CHEST", "DX": "CHEST", "MR": "HEAD", "MG": "BREAST"}


# -- the studies as DICOM ------------------------------------------------------------------


def dicom_modality(name: str) -> str:
    """The DICOM Modality of a simulated modality name ("CT head" -> CT; unknown -> OT)."""
    first = (name.split() or ["OT"])[0].upper()
    return first if first in MODALITIES else "OT"


def body_part(name: str) -> str:
    """BodyPartExamined of a simulated modality name ("CT head" -> HEAD)."""
    for word in name.upper().replace("-", " ").replace("_", " ").split()[1:]:
        if word in _BODY_PART_WORDS:
            return _BODY_PART_WORDS[word]
    return _DEFAULT_BODY_PART.get(dicom_modality(name), "WHOLEBODY")


@dataclass(frozen=True)
class StudyUids:
    study: UID
    series: UID
    instance: UID

    @classmethod
    def new(cls) -> StudyUids:
        return cls(generate_uid(), generate_uid(), generate_uid())


def study_instance(study: SimStudy, finding_code: str, uids: StudyUids) -> bytes:
    """One replayed study as a DICOM Part 10 file (Explicit VR Little Endian).

    An 8 x 8 image of the modality's storage class (Secondary Capture for modalities
    without one here) carrying what the server reads of a study: order priority
    (``RequestedProcedurePriority``), location (``CurrentPatientLocation``), modality and
    body part, and, when the simulated AI covers the modality, the drawn result in the
    replay model's private block (``ProtocolName`` tells the replay model which).
    No real patient: the identifiers say SIM and the study's index.
    """
    modality = dicom_modality(study.modality)
    meta = FileMetaDataset()
    sop_class = _SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uids.instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uids.instance
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.Modality = modality
    ds.PatientID = f"SIM{study.index:06d}"
    ds.PatientName = "SIMULATION^REPLAY"
    ds.AccessionNumber = f"SIM{study.index:06d}"
    ds.StudyDescription = f"SIMULATION REPLAY {study.modality}"[:64]
    ds.SeriesDescription = study.modality[:64]
    ds.ProtocolName = PROTOCOL if study.ai_covered else PROTOCOL_NOT_COVERED
    ds.BodyPartExamined = body_part(study.modality)
    ds.RequestedProcedurePriority = study.order_priority.strip().upper()[:16]
    if study.location is not None:
        ds.CurrentPatientLocation = LOCATION_TEXT[study.location]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = 8
    ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(8 * 8 * 2)
    if study.ai_covered:
        write_result(ds, SimulatedResult(finding_code, study.ai_flag, _score(study.ai_flag)))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _score(flag: bool) -> float:
    # The simulator's AI reports 1.0 when it flags and 0.0 otherwise (model._finding).
    return 1.0 if flag else 0.0


def stow_body(part: bytes) -> tuple[bytes, str]:
    """A one-part STOW-RS body and its Content-Type."""
    delim = f"--{STOW_BOUNDARY}".encode()
    body = (
        delim + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" + delim + b"--\r\n"
    )
    return body, f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'


# -- talking to the server -----------------------------------------------------------------


def _client(url: str, token: str | None, timeout: float = 30.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)


def _request(
    client: httpx.Client, method: str, path: str, what: str, **kwargs: Any
) -> httpx.Response:
    """One request; a transport failure becomes a one-line :class:`ReplayError`."""
    try:
        return client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ReplayError(
            f"{what}: no answer from the server at {client.base_url}"
            f" ({type(exc).__name__}: {exc or 'no detail'})"
        ) from None


def _answer(response: httpx.Response) -> str:
    """The server's answer in a few words (status and its JSON ``detail``)."""
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            detail = f": {body['detail']}"
    except ValueError:
        pass
    return f"{response.status_code}{detail}"[:200]


@dataclass(frozen=True)
class ServerFacts:
    """What the pre-flight checks learnt."""

    readers: tuple[str, ...]  # the account behind each reader token
    ingest_account: str
    policy_digest: str
    models: str  # the health document's models line


def _whoami(client: httpx.Client, what: str, needs: Sequence[str]) -> str:
    answer = _request(client, "GET", "/api/auth/me", what)
    if answer.status_code == 401:
        raise ReplayError(f"{what}: the server does not accept the token (401)")
    if answer.status_code != 200:
        raise ReplayError(f"{what}: /api/auth/me answered {_answer(answer)}")
    try:
        me = answer.json()
    except ValueError:
        me = None
    if not isinstance(me, dict):
        raise ReplayError(f"{what}: /api/auth/me did not answer a triage document")
    missing = [p for p in needs if p not in me.get("permissions", [])]
    if missing:
        raise ReplayError(
            f"{what}: the account {me.get('username')} ({me.get('role')}) lacks the"
            f" permission {', '.join(missing)}"
        )
    return str(me.get("username"))


def preflight(
    url: str, tokens: ReplayTokens, config: SimulationConfig, speed: float
) -> ServerFacts:
    """Check the server before anything is sent.

    The server answers; it runs the replay model and no other (a real model could flag a
    replayed image); the ingest token may store and each reader token may claim, each reader
    a different account; the server's policy is the simulation's scaled by ``speed``; and
    its worklist is empty (another study would be read by the replay's readers).

    Raises:
        ReplayError: one line naming the first problem and its fix.
    """
    setup_hint = f"`triage simulate --replay-setup DIR --speed {speed:g}` (same --config)"
    needed = reader_count(config)
    if len(tokens.readers) < needed:
        raise ReplayError(
            f"the day needs {needed} readers (radiologists in the settings) and the tokens"
            f" file has {len(tokens.readers)} reader token(s)"
        )
    with _client(url, None, timeout=10.0) as anonymous:
        health = _request(anonymous, "GET", "/api/health", f"cannot reach {url}")
    try:
        report = health.json()
    except ValueError:
        report = None
    if health.status_code not in (200, 503) or not isinstance(report, dict):
        raise ReplayError(f"{url} is not a triage server (/api/health answered {_answer(health)})")
    if health.status_code == 503:
        failing = ", ".join(str(x) for x in report.get("failing") or []) or "a component"
        raise ReplayError(f"the server at {url} is unhealthy ({failing}): see /api/health")
    components = report.get("components") or {}
    # The served models are listed when this process analyses (not with `triage worker`
    # processes: then their own settings decide, and they cannot be checked from here).
    models = ""
    if isinstance(components, dict) and isinstance(components.get("models"), dict):
        models = str(components["models"].get("detail") or "")
        if MODEL_NAME not in models:
            raise ReplayError(
                f"the server does not run the replay model {MODEL_NAME} (it runs:"
                f" {models or 'none'}); start it with the settings of {setup_hint}"
            )
    others = [m.strip() for m in models.split(";") if m.strip() and MODEL_NAME not in m]
    if others:
        raise ReplayError(
            f"the server runs other models besides {MODEL_NAME} ({'; '.join(others)}), which"
            f" could flag the replay's images: start it with TRIAGE_MODELS='[\"{MODEL_NAME}\"]'"
        )
    with _client(url, tokens.ingest) as client:
        ingest_account = _whoami(client, "the ingest token", ["ingest"])
    names: list[str] = []
    for k, token in enumerate(tokens.readers[:needed]):
        with _client(url, token) as client:
            name = _whoami(client, f"reader token {k + 1}", ["claim", "view_patients"])
        if name in names:
            raise ReplayError(
                f"reader tokens {names.index(name) + 1} and {k + 1} belong to the same account"
                f" {name}: the server's reader is the account, so each reader needs its own"
            )
        names.append(name)
    expected = scaled_policy(config.policy, speed).digest()
    with _client(url, tokens.readers[0]) as client:
        answer = _request(client, "GET", "/api/worklist", "the worklist", params={"limit": 1})
        if answer.status_code != 200:
            raise ReplayError(f"GET /api/worklist answered {_answer(answer)}")
        doc = answer.json()
    digest = str(doc.get("policy_config"))
    if digest != expected:
        raise ReplayError(
            f"the server's policy is {digest}, not this replay's policy scaled by --speed"
            f" {speed:g} ({expected}): start the server with TRIAGE_POLICY_FILE from {setup_hint}"
        )
    waiting = int(doc.get("total") or len(doc.get("items") or []))
    if waiting:
        raise ReplayError(
            f"the server's worklist has {waiting} unread or claimed studies (or more): a replay"
            " needs an empty worklist (start the server on a fresh data folder)"
        )
    return ServerFacts(tuple(names), ingest_account, digest, models)


# -- the replay ----------------------------------------------------------------------------


@dataclass
class StudyTrace:
    """What the clients saw of one study (times in real seconds after the replay's start)."""

    index: int
    uid: str
    sent: float | None = None
    stored: float | None = None
    claimed: float | None = None
    completed: float | None = None
    reader: str | None = None
    claims: int = 0
    completions: int = 0
    ai_status_at_claim: str | None = None
    class_at_claim: str | None = None
    tier_at_claim: str | None = None
    flagged_at_claim: bool | None = None
    next_seconds: float | None = None  # round trip of the /next call that claimed it
    complete_seconds: float | None = None  # round trip of its /complete call
    # From GET /api/studies/{uid} after the day (None when not checked).
    final_ai_status: str | None = None
    final_flag: bool | None = None
    final_read_state: str | None = None
    completed_by: str | None = None


@dataclass
class ReplayResult:
    """One replayed day: the simulated day, what the clients saw and the checks."""

    config: SimulationConfig
    seed: int
    speed: float
    url: str
    studies: list[SimStudy]
    traces: list[StudyTrace]
    simulated: RunResult
    facts: ServerFacts
    seconds: float
    lease_seconds: int
    server_timing: tuple[float, float]

    def sim_minutes(self, real_seconds: float) -> float:
        return real_seconds * self.speed / 60.0


class _Day:
    """State shared by the senders and the readers."""

    def __init__(self, studies: Sequence[SimStudy], speed: float, config: SimulationConfig):
        self.studies = list(studies)
        self.speed = speed
        self.config = config
        self.cond = threading.Condition()
        self.arrivals = 0
        self.completed = 0
        self.next_study = 0  # the next study a sender takes
        self.stop = threading.Event()
        self.all_read = threading.Event()
        self.error: str | None = None
        self.t0 = 0.0
        self.by_uid: dict[str, int] = {}
        self.traces: list[StudyTrace] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def real(self, minutes: float) -> float:
        return minutes * 60.0 / self.speed

    def fail(self, message: str) -> None:
        with self.cond:
            if self.error is None:
                self.error = message
            self.stop.set()
            self.cond.notify_all()

    def on_duty(self, reader: int) -> bool:
        hour = int(self.now() * self.speed / 3600.0) % 24
        return reader < self.config.readers_at(hour)

    def seconds_to_next_hour(self) -> float:
        sim_seconds = self.now() * self.speed
        return max(0.01, (3600.0 - sim_seconds % 3600.0) / self.speed)


def _send(day: _Day, client: httpx.Client, bodies: Sequence[tuple[bytes, str]]) -> None:
    """One of the senders: take the next study in arrival order, wait for its arrival time,
    store it (STOW-RS), wake the idle readers; until every study is sent."""
    while True:
        with day.cond:
            if day.next_study >= len(day.studies) or day.stop.is_set():
                break
            index = day.next_study
            day.next_study += 1
        study, trace = day.studies[index], day.traces[index]
        body, media_type = bodies[index]
        delay = day.real(study.arrival) - day.now()
        if delay > 0 and day.stop.wait(delay):
            break
        trace.sent = day.now()
        try:
            answer = client.post(
                "/dicomweb/studies", content=body, headers={"Content-Type": media_type}
            )
        except httpx.HTTPError as exc:
            day.fail(f"sending study {index}: no answer from the server ({type(exc).__name__})")
            break
        if answer.status_code != 200:
            day.fail(
                f"the server did not store replayed study {index} (STOW-RS answered"
                f" {answer.status_code}; the reason is in GET /api/quarantine)"
            )
            break
        trace.stored = day.now()
        with day.cond:
            day.arrivals += 1
            day.cond.notify_all()


def _flagged(item: dict[str, Any], finding: str) -> bool:
    return any(f.get("finding") == finding and f.get("flag") for f in item.get("findings") or [])


def _read(day: _Day, k: int, client: httpx.Client, name: str, lease_seconds: int) -> None:
    """Reader ``k``: next, read, complete, until every study is read (or the day fails)."""
    finding = day.config.finding_code
    while not day.stop.is_set() and not day.all_read.is_set():
        if not day.on_duty(k):
            with day.cond:
                day.cond.wait(min(IDLE_POLL_SECONDS, day.seconds_to_next_hour()))
            continue
        with day.cond:
            seen = day.arrivals
        asked = day.now()
        try:
            answer = client.post("/api/worklist/next", json={"lease_seconds": lease_seconds})
        except httpx.HTTPError as exc:
            day.fail(f"reader {name}: no answer to /api/worklist/next ({type(exc).__name__})")
            return
        if answer.status_code == 204:
            with day.cond:
                if day.arrivals == seen and not day.all_read.is_set() and not day.stop.is_set():
                    day.cond.wait(min(IDLE_POLL_SECONDS, day.seconds_to_next_hour()))
            continue
        if answer.status_code != 200:
            day.fail(f"reader {name}: /api/worklist/next answered {_answer(answer)}")
            return
        claimed_at = day.now()
        item = answer.json()
        uid = str(item.get("StudyInstanceUID"))
        index = day.by_uid.get(uid)
        if index is None:
            try:
                client.post(f"/api/studies/{uid}/release")
            except httpx.HTTPError:
                pass  # the claim expires with its lease
            day.fail(
                "a reader was given a study that is not part of this replay: the server"
                " receives other studies; replay on a server of its own"
            )
            return
        trace = day.traces[index]
        with day.cond:
            trace.claims += 1
            if trace.claimed is None:
                trace.claimed = claimed_at
                trace.reader = name
                trace.ai_status_at_claim = item.get("ai_status")
                trace.class_at_claim = item.get("priority_class")
                trace.tier_at_claim = item.get("tier")
                trace.flagged_at_claim = _flagged(item, finding)
                trace.next_seconds = claimed_at - asked
        if day.stop.wait(day.real(day.studies[index].read_minutes)):
            return
        finishing = day.now()
        try:
            done = client.post(f"/api/studies/{uid}/complete")
        except httpx.HTTPError as exc:
            day.fail(f"reader {name}: no answer to complete ({type(exc).__name__})")
            return
        if done.status_code != 200:
            day.fail(f"reader {name}: complete answered {_answer(done)}")
            return
        with day.cond:
            trace.completions += 1
            trace.completed = day.now()
            trace.complete_seconds = trace.completed - finishing
            day.completed += 1
            if day.completed >= len(day.studies):
                day.all_read.set()
            day.cond.notify_all()


def _check_studies(
    url: str, tokens: Sequence[str], traces: Sequence[StudyTrace], finding: str, wait_s: float
) -> None:
    """Fill each trace's final state from ``GET /api/studies/{uid}``; studies whose analysis
    is still pending are asked again until ``wait_s`` has passed."""

    def check(token: str, part: Sequence[StudyTrace]) -> None:
        with _client(url, token) as client:
            pending = list(part)
            deadline = time.monotonic() + wait_s
            while pending:
                later = []
                for trace in pending:
                    answer = _request(client, "GET", f"/api/studies/{trace.uid}", "study check")
                    if answer.status_code != 200:
                        raise ReplayError(f"GET /api/studies/... answered {_answer(answer)}")
                    doc = answer.json()
                    trace.final_ai_status = doc.get("ai_status")
                    trace.final_flag = _flagged(doc, finding)
                    trace.final_read_state = doc.get("read_state")
                    trace.completed_by = doc.get("completed_by")
                    if trace.final_ai_status == "pending":
                        later.append(trace)
                if not later or time.monotonic() > deadline:
                    return
                pending = later
                time.sleep(0.2)  # the server's worker is still analysing: ask again

    workers = max(1, min(4, len(tokens)))
    parts = [list(traces[k::workers]) for k in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(check, tokens[k], parts[k]) for k in range(workers)]:
            future.result()


def run_replay(
    url: str,
    tokens: ReplayTokens,
    config: SimulationConfig,
    speed: float,
    *,
    progress: Callable[[str], None] | None = None,
) -> ReplayResult:
    """Replay ``config``'s day (seed ``config.seed``) against the server at ``url``.

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``).
        tokens: the ingest token and one token per reader.
        config: the simulation settings (the server must run their policy scaled by
            ``speed``).
        speed: simulated minutes per real minute.
        progress: called with a line of text at the start and the end of the day.

    Raises:
        ReplayError: a pre-flight check failed, or the server refused a request during the
            day (the message names it), or the day did not finish in time.
    """
    check_speed(speed)
    check_config(config)
    say = progress or (lambda _line: None)
    facts = preflight(url, tokens, config, speed)
    seed = config.seed
    studies = generate_studies(config, seed)
    simulated = run_day(config, seed, keep_logs=True)
    n_readers = reader_count(config)
    uids = [StudyUids.new() for _ in studies]
    bodies = [
        stow_body(study_instance(s, config.finding_code, u))
        for s, u in zip(studies, uids, strict=True)
    ]
    day = _Day(studies, speed, config)
    day.traces = [StudyTrace(s.index, u.study) for s, u in zip(studies, uids, strict=True)]
    day.by_uid = {u.study: s.index for s, u in zip(studies, uids, strict=True)}
    longest = max(s.read_minutes for s in studies)
    lease_seconds = int(min(86400, max(30.0, 2.0 * day.real(longest) + 30.0)))
    end_minutes = max(log.end for log in simulated.logs.values())
    budget = 2.0 * day.real(end_minutes) + 60.0
    say(
        f"replaying {len(studies)} studies (seed {seed}) to {url} at {speed:g}x with"
        f" {n_readers} readers: the simulated day ends after {end_minutes:.0f} min, about"
        f" {day.real(end_minutes):.0f} s here"
    )
    senders = [_client(url, tokens.ingest) for _ in range(SENDERS)]
    readers = [_client(url, token) for token in tokens.readers[:n_readers]]
    threads = [
        threading.Thread(target=_send, args=(day, sender, bodies), name=f"replay-sender-{k + 1}")
        for k, sender in enumerate(senders)
    ]
    threads += [
        threading.Thread(
            target=_read,
            args=(day, k, readers[k], facts.readers[k], lease_seconds),
            name=f"replay-reader-{k + 1}",
        )
        for k in range(n_readers)
    ]
    started = time.monotonic()
    day.t0 = started + 0.2
    try:
        for thread in threads:
            thread.start()
        deadline = started + budget
        while not day.all_read.wait(0.5):
            if day.stop.is_set():
                break
            if time.monotonic() > deadline:
                day.fail(
                    f"the day did not finish in {budget:.0f} s: {len(studies) - day.completed}"
                    " studies unread (see the server's log and /api/health)"
                )
                break
    finally:
        day.stop.set()
        with day.cond:
            day.cond.notify_all()
        for thread in threads:
            thread.join(30)
        for client in [*senders, *readers]:
            client.close()
    if day.error is not None:
        raise ReplayError(day.error)
    seconds = time.monotonic() - day.t0
    _check_studies(url, tokens.readers[:n_readers], day.traces, config.finding_code, 30.0)
    say(f"replayed in {seconds:.1f} s")
    return ReplayResult(
        config=config,
        seed=seed,
        speed=speed,
        url=url,
        studies=studies,
        traces=day.traces,
        simulated=simulated,
        facts=facts,
        seconds=seconds,
        lease_seconds=lease_seconds,
        server_timing=server_timing(config, speed),
    )
