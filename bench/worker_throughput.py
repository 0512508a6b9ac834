"""Analysis throughput (studies per minute) with 1, 2 and 4 ``triage worker`` processes.

For each worker count, in a fresh data folder: one ``triage serve`` that only receives
(``TRIAGE_EMBEDDED_WORKER=false``) and N ``triage worker`` processes on the same data folder
and database (SQLite by default; ``--database-url`` names an empty PostgreSQL database of
your own, one worker count per run), the workers ready (models built) before anything is
sent. The studies are then sent with
DCMTK ``storescu`` and the round ends when every study's job is ``done`` or ``failed``, or
when ``--budget-seconds`` has passed.

What is timed, from the database: from the first job queued to the last job finished
(findings recorded; the DICOM SEG/SR made after that are not included), so that process
start-up and model building are outside the measure and the send overlaps the analysis
as it does in use. Studies per minute = studies analysed / that span; "jobs" counts
analyses, more than the studies when a study was analysed again (instances arriving after
its series went quiet). The CPUs' busy
fraction over the round comes from /proc/stat (other processes included).

Studies: the demo's kinds in turn, synthetic head CTs (``triage.demo.phantom``, BLAST-CT,
weights from ``--mirror``) and the demo chest radiograph (the chest model with random
weights saved as the real file is, in a temporary mirror: compute does not depend on the
values). ``--kinds ct`` or ``--kinds xray`` keeps one kind.

Usage (small, on the 2-core dev VM):
    python bench/worker_throughput.py --mirror ../shared/weights --studies 4 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from cpuload import busy_cpu_seconds
from sqlalchemy import func, select

from triage.db import Database
from triage.db.tables import JobRow
from triage.demo.run import dcmtk_env, dcmtk_tool, storescu_commands
from triage.serve.launcher import ServerProcess, stop_child


@dataclass
class Round:
    workers: int
    studies: int
    finished: int
    jobs: int
    failed: int
    span_s: float
    studies_per_min: float
    cpu_busy: float | None
    complete: bool


def write_random_chest_weights(mirror: Path) -> None:
    """The chest network with random weights, saved as the real file is (``torch.save``
    of the whole module), under ``<mirror>/<model>/<file>``."""
    import torch
    import torchxrayvision as xrv

    from triage.models.catalog import builtin_spec

    spec = builtin_spec("xrv-densenet121-res224-all")
    torch.manual_seed(0)
    path = mirror / spec.name / spec.weights[0].filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(xrv.models.DenseNet(weights=None), path)


def make_studies(out: Path, n: int, kinds: list[str]) -> list[list[Path]]:
    """``n`` studies, the kinds in turn; each a list of files."""
    from triage.demo.phantom import PhantomSpec, write_head_ct_series
    from triage.demo.xray import write_demo_radiograph

    studies = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        folder = out / f"study{i:03d}-{kind}"
        if kind == "ct":
            spec = PhantomSpec(haemorrhage=i % 4 == 0, seed=100 + i)
            studies.append(
                write_head_ct_series(
                    folder, spec, StudyInstanceUID=pydicom.uid.generate_uid(), patient_id=f"B{i}"
                )
            )
        else:
            studies.append(write_demo_radiograph(folder, patient_id=f"B{i}"))
    return studies


def mirror_with(weights: Path | None, tmp: Path) -> Path:
    """A mirror holding the chest model's random weights and, when given, BLAST-CT's."""
    mirror = tmp / "mirror"
    write_random_chest_weights(mirror)
    if weights is not None and (weights / "blast-ct-v1").is_dir():
        (mirror / "blast-ct-v1").symlink_to((weights / "blast-ct-v1").resolve())
    return mirror


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "triage.cli", "worker", "--grace", "0"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_ready(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float) -> None:
    """Until every worker has built its models and started its threads."""
    deadline = time.monotonic() + timeout
    while not all("job lease" in p.read_text(errors="replace") for p in logs):
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise SystemExit(f"a worker exited:\n{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not start in time")
        time.sleep(0.2)


def job_counts(db: Database) -> tuple[int, int, int, int]:
    """(studies whose latest job is done or failed, jobs, jobs open, jobs failed)."""
    with db.session() as s:
        jobs = s.execute(select(JobRow.study_id, JobRow.state).order_by(JobRow.id)).all()
    latest = {study: state for study, state in jobs}
    finished = sum(state in ("done", "failed") for state in latest.values())
    open_ = sum(state in ("queued", "running") for _, state in jobs)
    failed = sum(state == "failed" for _, state in jobs)
    return finished, len(jobs), open_, failed


def span_seconds(db: Database) -> float:
    """From the first job queued to the last finished."""
    with db.session() as s:
        first, last = s.execute(
            select(func.min(JobRow.created_at), func.max(JobRow.finished_at))
        ).one()
    if first is None or last is None:
        return 0.0
    first = first if first.tzinfo else first.replace(tzinfo=UTC)
    last = last if last.tzinfo else last.replace(tzinfo=UTC)
    return max(0.0, (last - first).total_seconds())


def run_round(
    n_workers: int,
    studies: list[list[Path]],
    base_env: dict[str, str],
    tmp: Path,
    storescu: str,
    budget_s: float,
) -> Round:
    data = tmp / f"data-{n_workers}"
    env = {**base_env, "TRIAGE_DATA_DIR": str(data)}
    server = ServerProcess(data, env, sign_in=False)
    server.start(timeout_s=180)
    workers: list[subprocess.Popen[bytes]] = []
    db = Database(server.database_url)
    try:
        logs = [tmp / f"worker-{n_workers}-{i}.log" for i in range(n_workers)]
        workers = [start_worker(env, log) for log in logs]
        wait_ready(workers, logs, timeout=300)
        busy0, wall0 = busy_cpu_seconds(), time.monotonic()
        for files in studies:
            for cmd in storescu_commands(
                storescu,
                files,
                host="127.0.0.1",
                port=server.dicom_port,
                called_ae=server.ae_title,
                calling_ae="BENCH",
            ):
                subprocess.run(cmd, check=True, capture_output=True, env=dcmtk_env(), timeout=600)
        deadline = wall0 + budget_s
        while True:
            finished, jobs, open_, failed = job_counts(db)
            if finished >= len(studies) and open_ == 0:
                complete = True
                break
            if time.monotonic() > deadline:
                complete = False
                break
            time.sleep(0.5)
        busy1, wall1 = busy_cpu_seconds(), time.monotonic()
        cpu = None
        if busy0 is not None and busy1 is not None:
            cpu = (busy1 - busy0) / ((wall1 - wall0) * (os.cpu_count() or 1))
        span = span_seconds(db)
        return Round(
            workers=n_workers,
            studies=len(studies),
            finished=finished,
            jobs=jobs,
            failed=failed,
            span_s=round(span, 1),
            studies_per_min=round(finished / span * 60, 2) if span > 0 else 0.0,
            cpu_busy=None if cpu is None else round(cpu, 2),
            complete=complete,
        )
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            stop_child(proc, grace_s=20)
        server.stop()
        db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", type=Path, default=None, help="weights mirror with blast-ct-v1")
    ap.add_argument("--studies", type=int, default=4, help="studies per round")
    ap.add_argument("--kinds", nargs="+", choices=["ct", "xray"], default=["ct", "xray"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--members", type=int, default=1, help="BLAST-CT ensemble members")
    ap.add_argument("--budget-seconds", type=float, default=600.0, help="per round, at most")
    ap.add_argument("--database-url", default=None, help="default: SQLite in each data folder")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if "ct" in args.kinds and (args.mirror is None or not (args.mirror / "blast-ct-v1").is_dir()):
        raise SystemExit("head CTs need --mirror with blast-ct-v1 (or --kinds xray)")
    if args.database_url and len(args.workers) > 1:
        raise SystemExit("--database-url: one worker count per run (each run needs a new one)")
    storescu = dcmtk_tool("storescu")
    if storescu is None:
        raise SystemExit("DCMTK storescu is needed (apt-get install dcmtk)")

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        mirror = mirror_with(args.mirror, tmp)
        studies = make_studies(tmp / "studies", args.studies, args.kinds)
        env = {
            "TRIAGE_EMBEDDED_WORKER": "false",
            "TRIAGE_MODEL_MIRROR": str(mirror),
            "TRIAGE_DEVICE": args.device,
            "TRIAGE_ENSEMBLE_MEMBERS": str(args.members),
            # Long enough that a series sent slowly (a busy machine) is not completed early
            # and analysed again when the rest arrives.
            "TRIAGE_SERIES_QUIET_SECONDS": "5",
            "TRIAGE_WORKER_POLL_SECONDS": "0.2",
        }
        if args.database_url:
            env["TRIAGE_DATABASE_URL"] = args.database_url
        rounds = []
        for n in args.workers:
            r = run_round(n, studies, env, tmp, storescu, args.budget_seconds)
            rounds.append(r)
            print(f"{n} worker(s): {r}", file=sys.stderr, flush=True)
            shutil.rmtree(tmp / f"data-{n}", ignore_errors=True)

    base = rounds[0].studies_per_min or None
    lines = [
        "| workers | studies analysed | jobs | failed | span s | studies/min | vs 1 worker"
        " | CPUs busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        ratio = f"{r.studies_per_min / base:.2f}x" if base else "-"
        done = f"{r.finished}/{r.studies}" + ("" if r.complete else " (budget)")
        lines.append(
            f"| {r.workers} | {done} | {r.jobs} | {r.failed} | {r.span_s} | {r.studies_per_min}"
            f" | {ratio}"
            f" | {r.cpu_busy if r.cpu_busy is not None else '-'} |"
        )
    print("\n".join(lines))
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "kinds": args.kinds,
        "members": args.members,
        "device": args.device,
        "rounds": [asdict(r) for r in rounds],
    }
    print(json.dumps(meta), file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
