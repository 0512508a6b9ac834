"""Time-to-flag and inference time for a head CT sent to a real ``triage serve``.

Starts ``triage serve`` on free ports with a fresh data directory, sends the series with
DCMTK storescu, and measures from the moment the last instance was acknowledged until
``GET /api/worklist`` shows the study analysed. Reports the worker's preprocessing and
inference times, the server's peak resident memory, and the finding.

Usage (CPU, one member, the real CQ500 series):
    python bench/time_to_flag.py --series ../shared/data/cq500-ct0 --mirror ../shared/weights

On a CUDA machine, all 12 members:
    python bench/time_to_flag.py --series ... --mirror ... --device cuda --members 12

Forcing a precision (sets TRIAGE_PRECISION for the server; default: the server's own
choice, ``auto``):
    python bench/time_to_flag.py --series ... --mirror ... --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom
from cpuload import busy_cpu_seconds

from triage.demo.run import dcmtk_tool, storescu_commands
from triage.serve.launcher import ServerProcess


def process_cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``, and of this process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    if pid is not None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, required=True, help="folder of one head CT series")
    ap.add_argument("--mirror", required=True, help="TRIAGE_MODEL_MIRROR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--quiet-seconds", type=float, default=2.0)
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=None,
        help="TRIAGE_PRECISION for the server (default: not set, i.e. auto)",
    )
    ap.add_argument(
        "--poll-seconds", type=float, default=0.1, help="GET /api/worklist every this often"
    )
    ap.add_argument("--keep-log", type=Path, default=None, help="copy the server's log here")
    args = ap.parse_args()

    storescu = dcmtk_tool("storescu")
    if storescu is None:
        raise SystemExit("DCMTK storescu is needed (apt-get install dcmtk)")
    files = sorted(p for p in args.series.iterdir() if p.is_file())
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "TRIAGE_MODEL_MIRROR": args.mirror,
            "TRIAGE_DEVICE": args.device,
            "TRIAGE_ENSEMBLE_MEMBERS": str(args.members),
            "TRIAGE_SERIES_QUIET_SECONDS": str(args.quiet_seconds),
        }
        if args.precision is not None:
            env["TRIAGE_PRECISION"] = args.precision
        with ServerProcess(Path(tmp), env) as srv:
            rss_idle = srv.peak_rss_mb()
            t_send = time.monotonic()
            for cmd in storescu_commands(
                storescu, files, host="127.0.0.1", port=srv.dicom_port, called_ae=srv.ae_title
            ):
                subprocess.run(cmd, check=True, capture_output=True)
            t_acked = time.monotonic()
            pid = srv.proc.pid if srv.proc is not None else None
            busy0, ours0 = busy_cpu_seconds(), process_cpu_seconds(pid)
            item = None
            while time.monotonic() - t_acked < 1800:
                items = httpx.get(
                    f"{srv.http_url}/api/worklist", headers=srv.headers, timeout=10
                ).json()["items"]
                item = next((i for i in items if i["StudyInstanceUID"] == study_uid), None)
                if item and item["ai_status"] != "pending":
                    break
                time.sleep(args.poll_seconds)
            t_flag = time.monotonic()
            busy1, ours1 = busy_cpu_seconds(), process_cpu_seconds(pid)
            rss_peak = srv.peak_rss_mb()
            detail = httpx.get(
                f"{srv.http_url}/api/studies/{study_uid}", headers=srv.headers, timeout=10
            ).json()
            if args.keep_log is not None:
                args.keep_log.write_text(srv.log())
    # CPUs kept busy by processes other than the server and this script while waiting
    others = (
        None
        if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t_flag - t_acked)
    )
    assert item is not None
    finding = item["findings"][0] if item["findings"] else {}
    details = finding.get("details", {})
    model_timing = details.get("timing_s") or {}  # the model's own stages (load, inference...)
    run_timing = next(
        (m.get("timing_s") or {} for m in detail["routing"]["models"] if m.get("run")), {}
    )  # prepare (preprocessing), predict, interpret
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": args.device,
        "members": args.members,
        "instances": len(files),
        "send_s": round(t_acked - t_send, 2),
        "time_to_flag_s": round(t_flag - t_acked, 2),
        "quiet_period_s": args.quiet_seconds,
        "poll_s": args.poll_seconds,
        "preprocess_s": run_timing.get("prepare"),
        "inference_s": details.get("inference_s", model_timing.get("inference")),
        "model_timing_s": model_timing,
        "precision": details.get("precision"),
        "precision_setting": args.precision or "auto (not set)",
        "server_rss_idle_mb": round(rss_idle or 0),
        "server_rss_peak_mb": round(rss_peak or 0),
        "other_processes_cpus": None if others is None else round(others, 2),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "ai_status": item["ai_status"],
        "flag": finding.get("flag"),
        "volumes_ml": finding.get("volumes_ml"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
