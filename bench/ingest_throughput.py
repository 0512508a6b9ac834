"""DICOM ingest throughput (images/s) of ``triage serve`` side by side with Orthanc.

What it measures: how fast a real series is accepted over C-STORE, as images per second, over
one association and over N parallel associations (default 1 and 4), for ``triage serve`` and
for Debian's Orthanc started on loopback in the same run, on the same files.

How: every round starts a fresh server with an empty data directory (so nothing is a
duplicate and every instance takes the full write path), sends the files with DCMTK
``storescu`` and times only the send: from starting the storescu processes until the last one
exits (every instance acknowledged). With N associations the files are split into N disjoint
chunks sent by N storescu processes started together. storescu proposes the files' own
transfer syntax (``-xs`` for JPEG lossless, see ``triage.demo.run.STORESCU_PROPOSE``), so
both servers store the files as received, without transcoding. After each round the script
checks that the server holds exactly as many instances as files were sent; a round that
lost instances is reported and makes the run fail.

Durability on both sides: ``triage serve`` answers a C-STORE only after validating the
instance, writing the file, fsync'ing it and its directory and committing the index row
(SQLite WAL, ``synchronous=FULL``). Orthanc keeps its defaults: ``SyncStorageArea: true``
(fsync of each stored file) and its built-in SQLite index (WAL, ``synchronous=NORMAL``).
Debian's plugins are not loaded. Our server runs with a one-hour series quiet period so that
no AI analysis starts during the bench (no model weights are needed).

TCP: DCMTK 3.6.7 (storescu, and Orthanc's DICOM server) leaves Nagle's algorithm on unless
the environment variable ``TCP_NODELAY=1`` is set. Between two Nagle-on DCMTK peers each
C-STORE round trip stalls on a delayed ACK (about 40 ms on Linux), which caps Orthanc far
below what it can do; pynetdicom does not hit the stall. So every configuration is measured
twice by default: ``dcmtk-default`` (variable unset) and ``nodelay`` (``TCP_NODELAY=1`` for
storescu and Orthanc alike). The ``nodelay`` ratios are the fair ones.

Goal: at least 3x Orthanc's images/s over one association and at least Orthanc's over four.

Usage:
    python bench/ingest_throughput.py --series ../shared/data/cq500-ct0 --repeats 5 \\
        --json-out ingest.json --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from triage.demo.orthanc import orthanc_server
from triage.demo.run import STORESCU_PROPOSE, dcmtk_tool
from triage.serve.launcher import ServerProcess

CALLING_AE = "BENCH"
TRIAGE_ENV = {
    "TRIAGE_SERIES_QUIET_SECONDS": "3600",  # no AI analysis during the bench
    "TRIAGE_ALLOWED_CALLING_AETS": "[]",
}
SERVERS = ("triage", "orthanc")
# TCP settings for the DCMTK processes (storescu and Orthanc): name -> TCP_NODELAY value.
NETWORK_MODES: dict[str, str | None] = {"dcmtk-default": None, "nodelay": "1"}
GOALS: dict[int, float] = {1: 3.0, 4: 1.0}  # associations -> minimum triage/Orthanc ratio


@dataclass(frozen=True)
class Round:
    """One timed send."""

    server: str
    network: str
    associations: int
    repeat: int
    files: int
    seconds: float
    stored: int
    storescu_exit_codes: tuple[int, ...]

    @property
    def ok(self) -> bool:
        """Every storescu succeeded and the server holds every file sent."""
        return self.stored == self.files and not any(self.storescu_exit_codes)

    @property
    def images_per_s(self) -> float:
        return self.files / self.seconds


def dcmtk_env(network: str) -> dict[str, str]:
    """The environment for DCMTK processes under a network mode."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    value = NETWORK_MODES[network]
    if value is not None:
        env["TCP_NODELAY"] = value
    return env


# --------------------------------------------------------------------------- input files


def proposal_option(files: Sequence[Path]) -> tuple[str, list[str]]:
    """The storescu option proposing the files' transfer syntax, and the syntaxes found.

    All files must share one option so that every association sends one kind of file.
    """
    syntaxes = sorted(
        {
            str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in files
        }
    )
    options = {STORESCU_PROPOSE.get(ts, "-xe") for ts in syntaxes}
    if len(options) != 1:
        raise SystemExit(f"files mix transfer syntaxes needing different proposals: {syntaxes}")
    return options.pop(), syntaxes


def chunks(files: Sequence[Path], n: int) -> list[list[Path]]:
    """n disjoint, contiguous chunks of near-equal size (slice order kept in each)."""
    size, extra = divmod(len(files), n)
    out: list[list[Path]] = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(list(files[start:end]))
        start = end
    return [c for c in out if c]


def send(
    storescu: str,
    option: str,
    parts: Sequence[Sequence[Path]],
    *,
    port: int,
    called_ae: str,
    env: dict[str, str],
) -> tuple[float, list[int], str]:
    """Start one storescu per part at once.

    Returns:
        Seconds until all of them have exited, their exit codes (storescu stops an
        association at the first failed C-STORE and exits non-zero), and their stderr.
    """
    commands = [
        [storescu, "-aet", CALLING_AE, "-aec", called_ae, option, "127.0.0.1", str(port)]
        + [str(p) for p in part]
        for part in parts
    ]
    results: list[subprocess.CompletedProcess[bytes] | None] = [None] * len(commands)

    def run(i: int) -> None:
        results[i] = subprocess.run(commands[i], capture_output=True, env=env)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(commands))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    codes = [res.returncode if res is not None else -1 for res in results]
    stderr = "".join(res.stderr.decode(errors="replace") for res in results if res is not None)
    return seconds, codes, stderr


# --------------------------------------------------------------------------- servers


def count_triage_instances(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "triage.db", timeout=30) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


@contextmanager
def triage_server(workdir: Path) -> Iterator[ServerProcess]:
    """A fresh ``triage serve`` with an empty data directory under workdir."""
    data_dir = Path(tempfile.mkdtemp(prefix="triage-", dir=workdir))
    try:
        with ServerProcess(data_dir, dict(TRIAGE_ENV)) as srv:
            yield srv
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def run_round(
    server: str,
    *,
    network: str,
    associations: int,
    repeat: int,
    files: Sequence[Path],
    storescu: str,
    option: str,
    orthanc: str,
    workdir: Path,
) -> Round:
    parts = chunks(files, associations)
    env = dcmtk_env(network)
    if server == "triage":
        with triage_server(workdir) as srv:
            seconds, codes, stderr = send(
                storescu, option, parts, port=srv.dicom_port, called_ae=srv.ae_title, env=env
            )
            stored = count_triage_instances(srv.data_dir)
            log = srv.log()
    else:
        with orthanc_server(orthanc, workdir, env) as osrv:
            seconds, codes, stderr = send(
                storescu, option, parts, port=osrv.dicom_port, called_ae=osrv.ae_title, env=env
            )
            stored = osrv.count_instances()
            log = osrv.log()
    if stored != len(files) or any(codes):
        # Reported, not raised: the run goes on but fails at the end.
        problems = [ln for ln in log.splitlines() if re.search(r"WARN|ERROR|E: |W: ", ln)]
        print(
            f"  !! {server} holds {stored} instances after {len(files)} files were sent over"
            f" {associations} association(s); storescu exit codes {codes};"
            f" storescu stderr: {stderr[-1000:]!r}; server warnings/errors: {problems[-10:]}"
        )
    return Round(server, network, associations, repeat, len(files), seconds, stored, tuple(codes))


# --------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def filesystem_of(path: Path) -> str:
    """Type and device of the mount holding path (fsync costs depend on it)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best):
                best, kind = mnt, f"{fstype} ({dev} on {mnt})"
    except OSError:
        pass
    return kind


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else "unknown"


def machine_info(workdir: Path, orthanc: str | None, storescu: str) -> dict[str, object]:
    import pynetdicom

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "kernel": platform.release(),
        "workdir_fs": filesystem_of(workdir),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "orthanc": tool_version([orthanc, "--version"]) if orthanc else None,
        "storescu": tool_version([storescu, "--version"]).strip("$ "),
    }


# --------------------------------------------------------------------------- report


def summarise(rounds: Sequence[Round]) -> dict[str, object]:
    """Median images/s per network mode, server and association count, and the ratios.

    Failed rounds (a C-STORE failed, or instances are missing) are left out: storescu stops
    at the first failure, so their times say nothing about throughput.
    """
    medians: dict[str, dict[str, dict[str, float]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    goals: dict[str, dict[str, object]] = {}
    for network in dict.fromkeys(r.network for r in rounds):
        medians[network] = {}
        for server in SERVERS:
            by_n: dict[str, float] = {}
            for n in dict.fromkeys(r.associations for r in rounds):
                rates = [
                    r.images_per_s
                    for r in rounds
                    if r.ok and (r.network, r.server, r.associations) == (network, server, n)
                ]
                if rates:
                    by_n[str(n)] = round(statistics.median(rates), 1)
            if by_n:
                medians[network][server] = by_n
        ours, theirs = medians[network].get("triage", {}), medians[network].get("orthanc", {})
        ratios[network] = {n: round(ours[n] / theirs[n], 2) for n in ours if n in theirs}
        goals[network] = {
            n: {"ratio_at_least": GOALS[int(n)], "met": ratio >= GOALS[int(n)]}
            for n, ratio in ratios[network].items()
            if int(n) in GOALS
        }
    return {
        "median_images_per_s": medians,
        "ratio_triage_over_orthanc": ratios,
        "goal": goals,
    }


def print_table(summary: dict[str, object], repeats: int) -> None:
    medians = summary["median_images_per_s"]
    ratios = summary["ratio_triage_over_orthanc"]
    goals = summary["goal"]
    assert isinstance(medians, dict) and isinstance(ratios, dict) and isinstance(goals, dict)
    print(f"\n{'network':<15}{'server':<10}{'assoc':>6}{'median img/s':>15}   (of {repeats})")
    for network, by_server in medians.items():
        for server, by_n in by_server.items():
            for n, rate in by_n.items():
                print(f"{network:<15}{server:<10}{n:>6}{rate:>15.1f}")
    for network, by_n in ratios.items():
        for n, ratio in by_n.items():
            goal = goals[network].get(n)
            note = (
                f"  goal >= {goal['ratio_at_least']}x: {'met' if goal['met'] else 'NOT met'}"
                if goal
                else ""
            )
            print(f"triage/orthanc [{network}], {n} association(s): {ratio:.2f}x{note}")


def markdown(
    summary: dict[str, object],
    info: dict[str, object],
    *,
    command: str,
    n_files: int,
    syntaxes: Sequence[str],
    option: str,
    repeats: int,
) -> str:
    medians = summary["median_images_per_s"]
    ratios = summary["ratio_triage_over_orthanc"]
    assert isinstance(medians, dict) and isinstance(ratios, dict)
    lines = [
        "## Ingest throughput (C-STORE, images/s)",
        "",
        f"`{command}`",
        "",
        f"{n_files} files, transfer syntax {', '.join(syntaxes)}, sent with DCMTK storescu"
        f" `{option}` over 1 or N parallel associations (disjoint chunks); a fresh server with"
        f" empty storage every round; median of {repeats} rounds; send time only.",
        "",
        "| TCP (DCMTK peers) | associations | triage (img/s) | Orthanc (img/s)"
        " | triage / Orthanc | goal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for network, by_server in medians.items():
        ours, theirs = by_server.get("triage", {}), by_server.get("orthanc", {})
        for n in dict.fromkeys([*ours, *theirs]):
            ratio = ratios.get(network, {}).get(n)
            goal = f">= {GOALS[int(n)]:g}x" if int(n) in GOALS else ""
            lines.append(
                f"| {network} | {n} | {ours.get(n, '-')} | {theirs.get(n, '-')}"
                f" | {f'{ratio:.2f}x' if ratio is not None else '-'} | {goal} |"
            )
    lines += [
        "",
        "Both durable: triage validates the instance, fsyncs the file and its directory and"
        " commits the SQLite index (WAL, synchronous=FULL) before answering; Orthanc runs with"
        " its defaults (SyncStorageArea true; SQLite index in WAL, synchronous=NORMAL), no"
        " plugins. `dcmtk-default`: DCMTK's default, Nagle's algorithm on in storescu and"
        " Orthanc, so each C-STORE round trip between them waits for a delayed ACK;"
        " `nodelay`: `TCP_NODELAY=1` for storescu and Orthanc (the fair comparison).",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, data on {info['workdir_fs']};"
        f" {info['orthanc']}; DCMTK {info['storescu']}; pynetdicom {info['pynetdicom']};"
        f" {info['date']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--series",
        type=Path,
        default=Path("../shared/data/cq500-ct0"),
        help="folder of DICOM files (all are sent)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds per configuration (median)")
    ap.add_argument(
        "--associations",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4],
        help="comma-separated numbers of parallel associations (default 1,4)",
    )
    ap.add_argument(
        "--network",
        choices=[*NETWORK_MODES, "both"],
        default="both",
        help="TCP_NODELAY for the DCMTK processes: unset (dcmtk-default), 1 (nodelay), or both",
    )
    ap.add_argument("--orthanc", default=shutil.which("Orthanc") or "/usr/sbin/Orthanc")
    ap.add_argument("--no-orthanc", action="store_true", help="measure triage serve only")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the servers' data directories go (default: the system temp dir)",
    )
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--markdown", action="store_true", help="print a docs/benchmarks.md section")
    args = ap.parse_args()

    storescu = dcmtk_tool("storescu")
    if storescu is None:
        raise SystemExit("DCMTK storescu is needed (apt-get install dcmtk)")
    servers = ["triage"] if args.no_orthanc else list(SERVERS)
    if not args.no_orthanc and not (
        Path(args.orthanc).is_file() and os.access(args.orthanc, os.X_OK)
    ):
        raise SystemExit(f"Orthanc not found at {args.orthanc} (apt-get install orthanc)")
    networks = list(NETWORK_MODES) if args.network == "both" else [args.network]
    files = sorted(p for p in args.series.iterdir() if p.is_file())
    if not files:
        raise SystemExit(f"no files in {args.series}")
    option, syntaxes = proposal_option(files)
    for p in files:  # page cache: the first round should not pay for reading the input
        p.read_bytes()
    workdir = (args.workdir or Path(tempfile.gettempdir())).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info(workdir, None if args.no_orthanc else args.orthanc, storescu)
    print(
        f"{len(files)} files from {args.series} ({', '.join(syntaxes)}; storescu {option});"
        f" {info['cpu']}, {info['cores']} cores; data on {info['workdir_fs']}"
    )

    rounds: list[Round] = []
    # Interleave servers and configurations so that background load hits both alike.
    for repeat in range(args.repeats):
        for network in networks:
            for n in args.associations:
                for server in servers:
                    r = run_round(
                        server,
                        network=network,
                        associations=n,
                        repeat=repeat,
                        files=files,
                        storescu=storescu,
                        option=option,
                        orthanc=args.orthanc,
                        workdir=workdir,
                    )
                    rounds.append(r)
                    print(
                        f"  round {repeat + 1}/{args.repeats} {network:<13} {server:<8} {n} assoc:"
                        f" {r.seconds:6.2f} s {r.images_per_s:7.1f} img/s ({r.stored} stored)"
                        + ("" if r.ok else " FAILED"),
                        flush=True,
                    )

    summary = summarise(rounds)
    incomplete = [r for r in rounds if not r.ok]
    summary["complete"] = not incomplete
    print_table(summary, args.repeats)
    result = {
        "series": str(args.series),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "transfer_syntaxes": syntaxes,
        "storescu_option": option,
        "repeats": args.repeats,
        "machine": info,
        **summary,
        "rounds": [{**asdict(r), "images_per_s": round(r.images_per_s, 1)} for r in rounds],
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    if args.markdown:
        command = (
            f"python bench/ingest_throughput.py --series {args.series} --repeats {args.repeats}"
        )
        print()
        print(
            markdown(
                summary,
                info,
                command=command,
                n_files=len(files),
                syntaxes=syntaxes,
                option=option,
                repeats=args.repeats,
            )
        )
    if incomplete:
        raise SystemExit(
            "FAILED (failed C-STORE or instances missing): "
            + ", ".join(
                f"{r.server} {r.network} {r.associations} assoc ({r.stored}/{r.files} stored,"
                f" storescu exit codes {r.storescu_exit_codes})"
                for r in incomplete
            )
        )


if __name__ == "__main__":
    main()
