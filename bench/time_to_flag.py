"""Time-to-flag and inference time for a head CT sent to a real ``triage serve``.

Starts ``triage serve`` on free ports with a fresh data directory, sends the series with
DCMTK storescu, and measures from the moment the last instance was acknowledged until
``GET /api/worklist`` shows the study analysed. Reports the worker's preprocessing and
inference times, the server's peak resident memory, and the finding.

Usage (CPU, one member, the real CQ500 series):
    python bench/time_to_flag.py --series ../shared/data/cq500-ct0 --mirror ../shared/weights

On a CUDA machine, all 12 members:
    python bench/time_to_flag.py --series ... --mirror ... --device cuda --members 12
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom

from triage.demo.run import dcmtk_tool, storescu_commands
from triage.serve.launcher import ServerProcess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, required=True, help="folder of one head CT series")
    ap.add_argument("--mirror", required=True, help="TRIAGE_MODEL_MIRROR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--quiet-seconds", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=1, help="studies sent one after another")
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
        with ServerProcess(Path(tmp), env) as srv:
            rss_idle = srv.peak_rss_mb()
            t_send = time.monotonic()
            for cmd in storescu_commands(
                storescu, files, host="127.0.0.1", port=srv.dicom_port, called_ae=srv.ae_title
            ):
                subprocess.run(cmd, check=True, capture_output=True)
            t_acked = time.monotonic()
            item = None
            while time.monotonic() - t_acked < 1800:
                items = httpx.get(f"{srv.http_url}/api/worklist", timeout=10).json()["items"]
                item = next((i for i in items if i["StudyInstanceUID"] == study_uid), None)
                if item and item["ai_status"] != "pending":
                    break
                time.sleep(0.1)
            t_flag = time.monotonic()
            rss_peak = srv.peak_rss_mb()
    assert item is not None
    finding = item["findings"][0] if item["findings"] else {}
    details = finding.get("details", {})
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": args.device,
        "members": args.members,
        "instances": len(files),
        "send_s": round(t_acked - t_send, 2),
        "time_to_flag_s": round(t_flag - t_acked, 2),
        "quiet_period_s": args.quiet_seconds,
        "preprocess_s": details.get("preprocess_s"),
        "inference_s": details.get("inference_s"),
        "server_rss_idle_mb": round(rss_idle or 0),
        "server_rss_peak_mb": round(rss_peak or 0),
        "ai_status": item["ai_status"],
        "flag": finding.get("flag"),
        "volumes_ml": finding.get("volumes_ml"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
