"""Worklist under load: latency of ``POST /api/worklist/next`` and of one worklist page.

What it measures: for each database (SQLite, PostgreSQL), each worklist size N (studies
waiting) and each number R of concurrent readers, the latency (p50/p95/max) of claiming the
next study (``POST /api/worklist/next``) and of one worklist page
(``GET /api/worklist?limit=50``), the reading rate (studies handed out and completed per
second), and that every study was handed out exactly once.

How, per cell (one database, one N, one R):

1. A fresh ``triage serve`` is started as a child process on loopback (free ports, a temporary
   data directory; the SQLite default or a new PostgreSQL database on 127.0.0.1, created here
   and dropped after), embedded worker on. ``--server-cmd`` / ``--pythonpath`` run the server
   from another checkout (the "before" of a change), e.g.
   ``git worktree add /tmp/before <commit>`` then ``--pythonpath /tmp/before``.
2. Once ``/api/health`` answers 200 (the schema is migrated), N waiting studies are inserted
   directly into the server's database with SQLAlchemy Core, using only columns that every
   schema since the work queue has (studies, one series each, a flagged haemorrhage finding
   for about 5 %): synthetic UIDs and accession numbers, no patient names. Series are already
   ``complete`` and no job is queued, so the worker analyses nothing. Order priorities,
   locations and arrival times (spread over the last hours) are drawn from a seeded generator.
3. R radiologist accounts and one more (for the page client) get a token each, made by the
   server's own ``triage.auth`` code in a helper process run like the server.
4. One ``GET /api/worklist?limit=1`` warms up (a server that keeps a rank computes the new
   studies' ranks on that first read); its time is reported as ``warmup``.
5. For ``--duration`` seconds R readers (asyncio, one shared ``httpx.AsyncClient``) each loop
   ``/next`` -> (``--think-ms`` reading time) -> ``POST /api/studies/{uid}/complete``, and one
   more client requests the first worklist page back to back. A reader stops at 204 (nothing
   left), and all stop claiming once ``--claim-limit`` of the N studies (half by default)
   were handed out, so that every figure is measured with between N and N/2 studies
   waiting. After the duration no reader starts a new claim; a claimed study is still
   completed. The whole phase is capped at ``--cell-cap`` seconds; each request at
   ``--request-timeout`` (a timed-out request counts at the timeout in the percentiles,
   shown as ``>=``).
6. Exactly once: no UID handed out twice, every study handed out completed, and the
   database's completed studies are exactly those the readers completed.

Closed loop: readers call back to back, so with ``--think-ms 0`` the latency is mostly
queueing, about R / throughput (Little's law; the ``R/X`` column). Latency at R readers with
no reading time says how the server behaves saturated; ``--think-ms`` (mean reading time
per study, uniform +-50 %; the readers' first claims spread over one reading time) measures
a realistic rate instead.

The client runs on the same machine as the server and the database: its CPU time is
reported (``client cpu``), with the server process tree's and the whole machine's.

Usage:
    python bench/worklist_load.py --sizes 200,1000,3000,10000 --readers 10,50,100 \\
        --db sqlite,postgres --duration 20 --json worklist.json
    python bench/worklist_load.py --pythonpath /tmp/before --label before --sizes 200,1000 \\
        --readers 10,50 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from triage.domain import Finding, ModelRef

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_SIZE = 100_000
MAX_READERS = 500
PAGE_SIZE = 50

# The accounts' and tokens' creation, run by the server's own interpreter and checkout.
ACCOUNTS_HELPER = """
import json, sys
import triage
from triage.auth.accounts import create_account
from triage.auth.roles import Role
from triage.auth.tokens import create_token
from triage.db import Database
url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = Database(url)
tokens = []
for i in range(n):
    name = f"{prefix}{i:03d}"
    create_account(db, name, Role.radiologist)
    tokens.append(create_token(db, name, "bench")[0])
db.dispose()
print(json.dumps({"triage": triage.__file__, "version": triage.__version__, "tokens": tokens}))
"""


class BenchError(Exception):
    """A problem the user can act on: reported as one line, exit 2."""


# --------------------------------------------------------------------------- tables
# Only the columns every schema since the reading work queue has (new columns have server
# defaults), so the same fill works against the "before" and the "after" server.

META = sa.MetaData()
STUDIES = sa.Table(
    "studies",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("StudyInstanceUID", sa.String(64)),
    sa.Column("AccessionNumber", sa.String(64)),
    sa.Column("StudyDescription", sa.String(256)),
    sa.Column("order_priority", sa.String(16)),
    sa.Column("location_class", sa.String(16)),
    sa.Column("first_received_at", sa.DateTime(timezone=True)),
    sa.Column("last_received_at", sa.DateTime(timezone=True)),
    sa.Column("ai_status", sa.String(32)),
    sa.Column("ai_updated_at", sa.DateTime(timezone=True)),
    sa.Column("read_state", sa.String(16)),
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("completed_by", sa.String(64)),
)
SERIES = sa.Table(
    "series",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_id", sa.Integer),
    sa.Column("SeriesInstanceUID", sa.String(64)),
    sa.Column("Modality", sa.String(16)),
    sa.Column("SeriesDescription", sa.String(256)),
    sa.Column("BodyPartExamined", sa.String(64)),
    sa.Column("n_instances", sa.Integer),
    sa.Column("last_received_at", sa.DateTime(timezone=True)),
    sa.Column("state", sa.String(16)),
)
FINDINGS = sa.Table(
    "findings",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_id", sa.Integer),
    sa.Column("finding", sa.String(64)),
    sa.Column("flag", sa.Integer),
    sa.Column("score", sa.Float),
    sa.Column("model_name", sa.String(64)),
    sa.Column("model_version", sa.String(32)),
    sa.Column("SeriesInstanceUID", sa.String(64)),
    sa.Column("payload", sa.JSON),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)

HAEMORRHAGE_MODEL = ModelRef("blast-ct-v1", "1.0.0", ("0" * 64,))
# (weight, Modality, BodyPartExamined, StudyDescription, analysed by a model)
KINDS: tuple[tuple[float, str, str, str, bool], ...] = (
    (0.30, "CT", "HEAD", "CT HEAD WO CONTRAST", True),
    (0.15, "CT", "CHEST", "CT CHEST W CONTRAST", False),
    (0.15, "CT", "ABDOMEN", "CT ABDOMEN PELVIS", False),
    (0.30, "CR", "CHEST", "XR CHEST PA", True),
    (0.10, "CR", "KNEE", "XR KNEE 2 VIEWS", False),
)
ORDER_PRIORITIES: tuple[tuple[float, str | None], ...] = (
    (0.05, "STAT"),
    (0.15, "HIGH"),
    (0.60, "ROUTINE"),
    (0.20, None),
)
LOCATIONS: tuple[tuple[float, str | None], ...] = (
    (0.20, "emergency"),
    (0.30, "inpatient"),
    (0.50, None),
)


def _pick(rng: random.Random, table: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    return rng.choices(table, weights=[row[0] for row in table])[0]


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def haemorrhage_payload(rng: random.Random) -> dict[str, Any]:
    """A flagged BLAST-CT finding as the worker records it (``Finding.to_json()``)."""
    volumes = {
        "IPH": round(rng.uniform(0.5, 40.0), 2),
        "EAH": round(rng.uniform(0.0, 15.0), 2),
        "IVH": round(rng.choice([0.0, 0.0, rng.uniform(0.1, 5.0)]), 2),
    }
    total = round(sum(volumes.values()), 2)
    high = total >= 30.0 or volumes["IVH"] > 0
    return Finding(
        finding="intracranial_haemorrhage",
        flag=True,
        score=round(rng.uniform(0.6, 0.99), 3),
        volumes_ml=volumes,
        model=HAEMORRHAGE_MODEL,
        max_probability={k: round(rng.uniform(0.5, 1.0), 3) for k in volumes},
        details={"blood_volume_ml": total, "threshold": 0.5},
        severity="high" if high else "standard",
    ).to_json()


def fill(url: str, n: int, *, seed: int, flagged_fraction: float, spread_h: float) -> int:
    """Insert n waiting studies (one series each; a flagged finding for some).

    Returns:
        The number of flagged studies.
    """
    rng = random.Random(seed)
    now = datetime.now(UTC)
    studies: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    flagged: set[str] = set()
    for i in range(n):
        _w, modality, body, description, analysed = _pick(rng, KINDS)
        first = now - timedelta(hours=rng.uniform(0.0, spread_h))
        last = min(now, first + timedelta(minutes=rng.uniform(0.5, 5.0)))
        study_uid = _uid()
        is_flagged = rng.random() < flagged_fraction
        if is_flagged:  # a haemorrhage is found on a CT head
            modality, body, description, analysed = "CT", "HEAD", "CT HEAD WO CONTRAST", True
            flagged.add(study_uid)
        studies.append(
            {
                "StudyInstanceUID": study_uid,
                "AccessionNumber": f"BENCH{i:07d}",
                "StudyDescription": description,
                "order_priority": _pick(rng, ORDER_PRIORITIES)[1],
                "location_class": _pick(rng, LOCATIONS)[1],
                "first_received_at": first,
                "last_received_at": last,
                "ai_status": "ok" if analysed else "no_applicable_model",
                "ai_updated_at": last,
                "read_state": "unread",
                "claimed_by": None,
                "completed_by": None,
            }
        )
        series.append(
            {
                "SeriesInstanceUID": _uid(),
                "Modality": modality,
                "SeriesDescription": description,
                "BodyPartExamined": body,
                "n_instances": 1 if modality == "CR" else rng.randint(30, 300),
                "last_received_at": last,
                "state": "complete",
            }
        )
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(STUDIES), studies)
            ids = {
                uid: study_id
                for uid, study_id in conn.execute(
                    sa.select(STUDIES.c.StudyInstanceUID, STUDIES.c.id).where(
                        STUDIES.c.AccessionNumber.like("BENCH%")
                    )
                )
            }
            for study, se in zip(studies, series, strict=True):
                se["study_id"] = ids[study["StudyInstanceUID"]]
            conn.execute(sa.insert(SERIES), series)
            findings = [
                {
                    "study_id": se["study_id"],
                    "finding": "intracranial_haemorrhage",
                    "flag": 1,
                    "score": payload["score"],
                    "model_name": HAEMORRHAGE_MODEL.name,
                    "model_version": HAEMORRHAGE_MODEL.version,
                    "SeriesInstanceUID": se["SeriesInstanceUID"],
                    "payload": payload,
                    "created_at": se["last_received_at"],
                }
                for study, se in zip(studies, series, strict=True)
                if study["StudyInstanceUID"] in flagged
                for payload in [haemorrhage_payload(rng)]
            ]
            if findings:
                conn.execute(sa.insert(FINDINGS), findings)
    finally:
        engine.dispose()
    return len(flagged)


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return sa.create_engine(url, connect_args={"timeout": 60})
    return sa.create_engine(url)


def study_states(url: str) -> dict[str, tuple[str, str | None, str | None]]:
    """UID -> (read_state, claimed_by, completed_by) of every study."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    STUDIES.c.StudyInstanceUID,
                    STUDIES.c.read_state,
                    STUDIES.c.claimed_by,
                    STUDIES.c.completed_by,
                )
            )
            return {uid: (state, claimed, completed) for uid, state, claimed, completed in rows}
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- databases


def check_loopback(url: str, what: str) -> None:
    host = make_url(url).host
    if host not in LOOPBACK:
        raise BenchError(f"{what} must be on loopback (127.0.0.1), not {host!r}")


class PostgresDatabase:
    """A new database on the PostgreSQL server at ``server_url``, dropped by :meth:`drop`."""

    def __init__(self, server_url: str) -> None:
        self.server = make_url(server_url)
        self.name = f"triage_bench_{os.getpid()}_{secrets.token_hex(4)}"
        self.admin = sa.create_engine(self.server, isolation_level="AUTOCOMMIT")
        try:
            with self.admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        except sa.exc.SQLAlchemyError as exc:
            self.admin.dispose()
            reason = str(exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc).strip()
            raise BenchError(
                f"cannot create a database on PostgreSQL at {self.server.host}:"
                f"{self.server.port}: {reason.splitlines()[0] if reason else type(exc).__name__}"
            ) from None
        self.url = self.server.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        try:
            with self.admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        finally:
            self.admin.dispose()


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``triage serve`` as a child process on loopback, run from ``cwd`` = its data dir (so
    that ``python -m`` never picks up a checkout from the caller's working directory)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        command: Sequence[str],
        database_url: str | None,
        pythonpath: str | None,
    ) -> None:
        self.data_dir = data_dir
        self.command = list(command)
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = data_dir / "serve.log"
        # No TRIAGE_* setting leaks in from the caller: every run starts from the defaults.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(
            TRIAGE_DATA_DIR=str(data_dir),
            TRIAGE_HTTP_HOST="127.0.0.1",
            TRIAGE_HTTP_PORT=str(self.http_port),
            TRIAGE_DICOM_HOST="127.0.0.1",
            TRIAGE_DICOM_PORT=str(free_port()),
        )
        if database_url:
            env["TRIAGE_DATABASE_URL"] = database_url
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        else:
            env.pop("PYTHONPATH", None)
        self.env = env
        self.database_url = database_url or f"sqlite:///{(data_dir / 'triage.db').resolve()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def start(self, timeout_s: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.command, env=self.env, cwd=self.data_dir, stdout=log, stderr=log
                )
            except OSError as exc:
                raise BenchError(f"cannot run the server command {self.command}: {exc}") from None
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"triage serve exited ({self.proc.returncode}) before answering; its log"
                    f" ends: {self.log_tail() or '(empty)'} (--keep keeps {self.log_path})"
                )
            try:
                answer = httpx.get(f"{self.url}/api/health", timeout=5)
                if answer.status_code == 200:
                    return
                last = f"/api/health {answer.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.2)
        self.stop()
        raise BenchError(f"triage serve not healthy after {timeout_s:.0f} s ({last})")

    def make_accounts(self, prefix: str, n: int, python: str) -> tuple[list[str], str]:
        """n radiologist accounts with a token each, made by the server's own code.

        Returns:
            The tokens, and where the helper imported ``triage`` from (with its version).
        """
        done = subprocess.run(
            [python, "-c", ACCOUNTS_HELPER, self.database_url, prefix, str(n)],
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise BenchError(f"making the reader accounts failed: {tail}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        return list(out["tokens"]), f"{out['triage']} ({out['version']})"

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server and its descendants so far."""
        if self.proc is None:
            return 0.0
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def tree_cpu_seconds(root: int) -> float:
    """user + system CPU seconds of ``root`` and every live descendant (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values) - idle), float(sum(values))


# --------------------------------------------------------------------------- the load


@dataclass
class Load:
    """What the clients saw in one cell."""

    next_ms: list[float] = field(default_factory=list)
    complete_ms: list[float] = field(default_factory=list)
    page_ms: list[float] = field(default_factory=list)
    next_timeouts: int = 0
    complete_timeouts: int = 0
    page_timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    handed: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    drained_readers: int = 0
    claims_started: int = 0
    limited: bool = False
    page_items: int | None = None
    page_total: int | None = None
    page_bytes: int | None = None
    seconds: float = 0.0
    capped: bool = False

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def run_load(
    base_url: str,
    reader_tokens: Sequence[str],
    page_token: str,
    *,
    duration_s: float,
    cap_s: float,
    request_timeout_s: float,
    think_ms: float,
    claim_limit: int,
    seed: int,
) -> Load:
    load = Load()
    stop = asyncio.Event()
    rng = random.Random(seed)
    limits = httpx.Limits(
        max_connections=len(reader_tokens) + 2, max_keepalive_connections=len(reader_tokens) + 2
    )
    timeout_ms = request_timeout_s * 1000.0

    async with httpx.AsyncClient(
        base_url=base_url, timeout=request_timeout_s, limits=limits
    ) as client:

        async def reader(token: str) -> None:
            headers = {"Authorization": f"Bearer {token}"}
            if think_ms > 0:  # readers start spread over one reading time, not all at once
                await asyncio.sleep(think_ms * rng.uniform(0.0, 1.0) / 1000.0)
            while not stop.is_set():
                if load.claims_started >= claim_limit:
                    load.limited = True
                    return
                load.claims_started += 1
                t0 = time.perf_counter()
                try:
                    answer = await client.post("/api/worklist/next", headers=headers)
                except httpx.TimeoutException:
                    load.next_timeouts += 1
                    load.next_ms.append(timeout_ms)
                    continue
                except httpx.HTTPError as exc:
                    load.error(f"next {type(exc).__name__}")
                    await asyncio.sleep(0.1)
                    continue
                load.next_ms.append((time.perf_counter() - t0) * 1000.0)
                if answer.status_code == 204:
                    load.drained_readers += 1
                    return
                if answer.status_code != 200:
                    load.error(f"next {answer.status_code}")
                    await asyncio.sleep(0.1)
                    continue
                uid = str(answer.json()["StudyInstanceUID"])
                load.handed.append(uid)
                if think_ms > 0:
                    await asyncio.sleep(think_ms * rng.uniform(0.5, 1.5) / 1000.0)
                for _attempt in range(3):  # a claimed study is completed, also after the stop
                    t0 = time.perf_counter()
                    try:
                        done = await client.post(f"/api/studies/{uid}/complete", headers=headers)
                    except httpx.TimeoutException:
                        load.complete_timeouts += 1
                        load.complete_ms.append(timeout_ms)
                        continue
                    except httpx.HTTPError as exc:
                        load.error(f"complete {type(exc).__name__}")
                        continue
                    load.complete_ms.append((time.perf_counter() - t0) * 1000.0)
                    if done.status_code == 200:
                        load.completed.append(uid)
                    else:
                        load.error(f"complete {done.status_code}")
                    break

        async def pager() -> None:
            headers = {"Authorization": f"Bearer {page_token}"}
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    answer = await client.get(
                        "/api/worklist", params={"limit": PAGE_SIZE}, headers=headers
                    )
                except httpx.TimeoutException:
                    load.page_timeouts += 1
                    load.page_ms.append(timeout_ms)
                    continue
                except httpx.HTTPError as exc:
                    load.error(f"page {type(exc).__name__}")
                    await asyncio.sleep(0.1)
                    continue
                load.page_ms.append((time.perf_counter() - t0) * 1000.0)
                if answer.status_code != 200:
                    load.error(f"page {answer.status_code}")
                    await asyncio.sleep(0.1)
                    continue
                doc = answer.json()
                load.page_items = len(doc.get("items", []))
                load.page_total = doc.get("total")
                load.page_bytes = len(answer.content)

        async def timer() -> None:
            await asyncio.sleep(duration_s)
            stop.set()

        started = time.perf_counter()
        tasks = [asyncio.create_task(reader(t)) for t in reader_tokens]
        page_task = asyncio.create_task(pager())
        timer_task = asyncio.create_task(timer())
        _done, pending = await asyncio.wait(tasks, timeout=cap_s)
        if pending:  # past the cap: requests still waiting are abandoned
            load.capped = True
            for t in pending:
                t.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                load.error(f"reader {type(outcome).__name__}")
        stop.set()  # all readers done (drained): the page client stops too
        load.seconds = time.perf_counter() - started
        timer_task.cancel()
        try:
            await asyncio.wait_for(page_task, timeout=request_timeout_s + 1)
        except TimeoutError:
            pass
        await asyncio.gather(timer_task, return_exceptions=True)
    return load


# --------------------------------------------------------------------------- one cell


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50_ms": _round(percentile(values, 50)),
        "p95_ms": _round(percentile(values, 95)),
        "max_ms": _round(max(values) if values else None),
        "mean_ms": _round(statistics.fmean(values) if values else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class Cell:
    label: str
    db: str
    size: int
    readers: int
    think_ms: float
    flagged: int
    fill_s: float
    warmup_ms: float | None
    listed_before: int | None
    api: str
    server_triage: str
    seconds: float
    capped: bool
    handed_out: int
    completed: int
    cycles_per_s: float
    little_s: float | None
    next: dict[str, float | int | None]
    complete: dict[str, float | int | None]
    page: dict[str, float | int | None]
    timeouts: dict[str, int]
    errors: dict[str, int]
    page_items: int | None
    page_total: int | None
    page_kib: float | None
    drained: bool
    limited: bool
    duplicates: int
    db_completed: int
    db_claimed_unseen: int
    exactly_once: bool
    server_cpu_pct: float
    client_cpu_pct: float
    machine_busy_pct: float
    load_avg_1m: float


def run_cell(args: argparse.Namespace, db_kind: str, size: int, readers: int) -> Cell:
    workdir = Path(tempfile.mkdtemp(prefix="worklist-load-", dir=args.workdir))
    pg: PostgresDatabase | None = None
    server: Server | None = None
    try:
        if db_kind == "postgres":
            pg = PostgresDatabase(args.pg_url)
        server = Server(
            workdir / "data",
            command=args.server_command,
            database_url=pg.url if pg else None,
            pythonpath=args.pythonpath,
        )
        server.start(args.start_timeout)
        t0 = time.perf_counter()
        flagged = fill(
            server.database_url,
            size,
            seed=args.seed,
            flagged_fraction=args.flagged_fraction,
            spread_h=args.spread_hours,
        )
        fill_s = time.perf_counter() - t0
        tokens, where = server.make_accounts("bench-reader-", readers + 1, args.python)
        page_token, reader_tokens = tokens[0], tokens[1:]

        # Warm-up: the first read (a server keeping ranks computes the new studies' ranks).
        headers = {"Authorization": f"Bearer {page_token}"}
        warmup_ms: float | None = None
        listed: int | None = None
        api = "?"
        t0 = time.perf_counter()
        try:
            first = httpx.get(
                f"{server.url}/api/worklist",
                params={"limit": 1},
                headers=headers,
                timeout=args.request_timeout,
            )
            warmup_ms = (time.perf_counter() - t0) * 1000.0
            first.raise_for_status()
            doc = first.json()
            api = "paged" if "total" in doc else "full list"
            listed = int(doc["total"]) if "total" in doc else len(doc["items"])
        except httpx.TimeoutException:
            warmup_ms = None
        except httpx.HTTPError as exc:
            raise BenchError(f"the first GET /api/worklist failed: {exc}") from None

        load_avg = os.getloadavg()[0]  # other programs' load too: the figures depend on it
        cpu0, busy0, client0 = server.cpu_seconds(), machine_busy(), time.process_time()
        load = asyncio.run(
            run_load(
                server.url,
                reader_tokens,
                page_token,
                duration_s=args.duration,
                cap_s=args.cell_cap,
                request_timeout_s=args.request_timeout,
                think_ms=args.think_ms,
                claim_limit=max(1, math.ceil(size * args.claim_limit)),
                seed=args.seed,
            )
        )
        cpu1, busy1, client1 = server.cpu_seconds(), machine_busy(), time.process_time()
        server.stop()  # nothing changes the database after this
        states = study_states(server.database_url)
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.drop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    handed, completed = set(load.handed), set(load.completed)
    db_completed = {uid for uid, (state, _c, _d) in states.items() if state == "completed"}
    db_claimed = {uid for uid, (state, _c, _d) in states.items() if state == "claimed"}
    duplicates = len(load.handed) - len(handed)
    exactly_once = (
        duplicates == 0
        and len(load.completed) == len(completed)
        and handed == completed
        and db_completed == completed
        and not db_claimed
    )
    cores = os.cpu_count() or 1
    busy = (busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1])
    cycles_per_s = len(load.completed) / load.seconds if load.seconds else 0.0
    return Cell(
        label=args.label,
        db=db_kind,
        size=size,
        readers=readers,
        think_ms=args.think_ms,
        flagged=flagged,
        fill_s=round(fill_s, 2),
        warmup_ms=_round(warmup_ms),
        listed_before=listed,
        api=api,
        server_triage=where,
        seconds=round(load.seconds, 2),
        capped=load.capped,
        handed_out=len(load.handed),
        completed=len(load.completed),
        cycles_per_s=round(cycles_per_s, 2),
        little_s=round(readers / cycles_per_s, 3) if cycles_per_s else None,
        next=stats(load.next_ms),
        complete=stats(load.complete_ms),
        page=stats(load.page_ms),
        timeouts={
            "next": load.next_timeouts,
            "complete": load.complete_timeouts,
            "page": load.page_timeouts,
        },
        errors=load.errors,
        page_items=load.page_items,
        page_total=load.page_total,
        page_kib=round(load.page_bytes / 1024, 1) if load.page_bytes is not None else None,
        drained=load.drained_readers == readers,
        limited=load.limited,
        duplicates=duplicates,
        db_completed=len(db_completed),
        db_claimed_unseen=len(db_claimed - handed),
        exactly_once=exactly_once,
        server_cpu_pct=round(100.0 * (cpu1 - cpu0) / load.seconds, 1) if load.seconds else 0.0,
        client_cpu_pct=round(100.0 * (client1 - client0) / load.seconds, 1)
        if load.seconds
        else 0.0,
        machine_busy_pct=round(100.0 * busy * cores, 1),
        load_avg_1m=round(load_avg, 2),
    )


# --------------------------------------------------------------------------- report


def _ms(value: float | int | None, timeout_ms: float) -> str:
    if value is None:
        return "-"
    prefix = ">=" if value >= timeout_ms else ""
    return f"{prefix}{value / 1000:.2f}s" if value >= 1000 else f"{prefix}{value:.0f}"


COLUMNS = (
    "label",
    "db",
    "N",
    "R",
    "done",
    "/s",
    "R/X s",
    "next p50",
    "next p95",
    "next max",
    "page p50",
    "page p95",
    "page max",
    "pages",
    "t/o",
    "once",
    "srv cpu",
    "cli cpu",
)


def row(cell: Cell, timeout_ms: float) -> list[str]:
    timeouts = sum(cell.timeouts.values())
    errors = sum(cell.errors.values())
    return [
        cell.label,
        cell.db,
        str(cell.size),
        str(cell.readers),
        f"{cell.completed}{' (all)' if cell.drained else ' (lim)' if cell.limited else ''}",
        f"{cell.cycles_per_s:.1f}",
        f"{cell.little_s:.2f}" if cell.little_s is not None else "-",
        _ms(cell.next["p50_ms"], timeout_ms),
        _ms(cell.next["p95_ms"], timeout_ms),
        _ms(cell.next["max_ms"], timeout_ms),
        _ms(cell.page["p50_ms"], timeout_ms),
        _ms(cell.page["p95_ms"], timeout_ms),
        _ms(cell.page["max_ms"], timeout_ms),
        str(cell.page["n"]),
        f"{timeouts}" + (f" +{errors}err" if errors else "") + (" CAP" if cell.capped else ""),
        "yes" if cell.exactly_once else "NO",
        f"{cell.server_cpu_pct:.0f}%",
        f"{cell.client_cpu_pct:.0f}%",
    ]


def print_table(cells: Sequence[Cell], timeout_ms: float, *, markdown: bool) -> None:
    rows = [row(c, timeout_ms) for c in cells]
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(COLUMNS)]
    print("  ".join(h.rjust(w) for h, w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


LEGEND = (
    "times in ms unless marked s; N: studies waiting at the start; R: concurrent readers;"
    " done: studies handed out by /next and completed ('(all)': the worklist was drained,"
    " '(lim)': the readers stopped at --claim-limit, by default half of N, so the worklist"
    " stayed between N and N/2);"
    " /s: completed per second (X); R/X: the closed loop's expected cycle time (Little's law:"
    " with no reading time, /next + complete latency is about R/X whatever the server does);"
    " page: GET /api/worklist?limit=50 back to back by one more client; t/o: timed-out"
    " requests (counted at the timeout, '>='); once: no study handed out twice, every one"
    " completed, the database's completed set equal to the readers'; srv/cli cpu: CPU of the"
    " server process tree / of this client over the run (100% = one core)."
)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


# --------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers: {text!r}")
    return values


def _db_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("sqlite", "postgres") for v in values):
        raise argparse.ArgumentTypeError("sqlite, postgres or sqlite,postgres")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", type=_int_list, default=[200, 1000], help="studies waiting")
    p.add_argument("--readers", type=_int_list, default=[10, 50], help="concurrent readers")
    p.add_argument("--db", type=_db_list, default=["sqlite"], help="sqlite and/or postgres")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per cell")
    p.add_argument(
        "--cell-cap",
        type=float,
        default=None,
        help="wall-time cap of a cell's load phase, s (default: duration + request timeout + 5)",
    )
    p.add_argument("--request-timeout", type=float, default=30.0, help="per request, s")
    p.add_argument("--think-ms", type=float, default=0.0, help="mean reading time per study")
    p.add_argument(
        "--claim-limit",
        type=float,
        default=0.5,
        help="readers stop claiming once this fraction of the N studies was handed out, so"
        " that the worklist stays between N and (1 - fraction) N (1: until drained)",
    )
    p.add_argument("--flagged-fraction", type=float, default=0.05)
    p.add_argument("--spread-hours", type=float, default=6.0, help="arrivals over the last h")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server (loopback only)")
    p.add_argument(
        "--server-cmd",
        default=None,
        help="command that runs the server (default: this Python, -m triage.cli serve)",
    )
    p.add_argument("--pythonpath", default=None, help="PYTHONPATH of the server (another checkout)")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that makes the accounts with the server's code (PYTHONPATH applies)",
    )
    p.add_argument("--label", default="", help="a name for this run in the table (before/after)")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--workdir", type=Path, default=None, help="where temporary data dirs go")
    p.add_argument("--keep", action="store_true", help="keep the data dirs (and server logs)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="the final table as Markdown")
    args = p.parse_args(argv)
    if any(n > MAX_SIZE for n in args.sizes):
        p.error(f"--sizes: at most {MAX_SIZE} studies")
    if any(r > MAX_READERS for r in args.readers):
        p.error(f"--readers: at most {MAX_READERS}")
    if not 0 < args.claim_limit <= 1:
        p.error("--claim-limit is a fraction in (0, 1]")
    if not 0 <= args.flagged_fraction <= 1:
        p.error("--flagged-fraction is between 0 and 1")
    if args.duration <= 0 or args.request_timeout <= 0 or args.think_ms < 0:
        p.error("--duration and --request-timeout are positive, --think-ms not negative")
    if args.cell_cap is None:
        args.cell_cap = args.duration + args.request_timeout + 5.0
    if args.cell_cap < args.duration:
        p.error("--cell-cap is at least --duration")
    args.server_command = (
        shlex.split(args.server_cmd)
        if args.server_cmd
        else [sys.executable, "-m", "triage.cli", "serve"]
    )
    if args.pythonpath:
        args.pythonpath = os.pathsep.join(
            str(Path(p).resolve()) for p in args.pythonpath.split(os.pathsep)
        )
    args.label = args.label or ("pythonpath" if args.pythonpath else "this checkout")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timeout_ms = args.request_timeout * 1000.0
    info = machine_info()
    cells: list[Cell] = []
    try:
        if "postgres" in args.db:
            check_loopback(args.pg_url, "--pg-url")
        for db_kind in args.db:
            for size in args.sizes:
                for readers in args.readers:
                    print(
                        f"{args.label}: {db_kind}, {size} studies, {readers} readers ...",
                        flush=True,
                    )
                    cell = run_cell(args, db_kind, size, readers)
                    cells.append(cell)
                    print_table([cell], timeout_ms, markdown=False)
                    print(
                        f"  server triage: {cell.server_triage}; api: {cell.api}; listed"
                        f" {cell.listed_before}; warm-up {_ms(cell.warmup_ms, timeout_ms)};"
                        f" fill {cell.fill_s:.1f}s; complete p50/p95"
                        f" {_ms(cell.complete['p50_ms'], timeout_ms)}/"
                        f"{_ms(cell.complete['p95_ms'], timeout_ms)}; page {cell.page_items}"
                        f" items, {cell.page_kib} KiB; machine busy {cell.machine_busy_pct:.0f}%,"
                        f" load {cell.load_avg_1m:.1f}"
                        + (f"; errors {cell.errors}" if cell.errors else ""),
                        flush=True,
                    )
                    if args.json:
                        write_json(args.json, info, args, cells)
    except BenchError as exc:
        print(f"worklist_load: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("worklist_load: interrupted", file=sys.stderr)
        return 130
    print()
    print_table(cells, timeout_ms, markdown=args.markdown)
    print()
    print(LEGEND)
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_avg_1m']} at start;"
        f" {info['date']}; duration {args.duration:g}s per cell, think {args.think_ms:g} ms"
    )
    return 0 if all(c.exactly_once for c in cells) else 1


def write_json(
    path: Path, info: dict[str, Any], args: argparse.Namespace, cells: list[Cell]
) -> None:
    doc = {
        "machine": info,
        "settings": {
            "duration_s": args.duration,
            "cell_cap_s": args.cell_cap,
            "request_timeout_s": args.request_timeout,
            "think_ms": args.think_ms,
            "claim_limit": args.claim_limit,
            "flagged_fraction": args.flagged_fraction,
            "page_size": PAGE_SIZE,
            "server_command": args.server_command,
            "pythonpath": args.pythonpath,
        },
        "cells": [asdict(c) for c in cells],
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
