"""Haemorrhage model on CPU: fp32 against bf16 on the same prepared head CT, one process.

The series is prepared once (``prepare_head_ct``); one ``HaemorrhageModel`` per precision
(same member, same planned tiles for each precision's memory budget) is loaded before the
clock starts; the runs alternate fp32, bf16, bf16, fp32, ... (ABBA, so a warming machine
or a neighbour's job favours neither), and the median of each is reported with the lesion
volumes of every run and how far the two precisions' label maps and volumes differ. Also
prints what ``default_precision("cpu")`` picks on this machine and why (the CPU flags torch
reports).

Usage:
    python bench/precision.py --series ../shared/data/cq500-ct0 --mirror ../shared/weights
    python bench/precision.py ... --member 7 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cpuload import busy_cpu_seconds, own_cpu_seconds

from triage.models.device import cpu_info, default_precision
from triage.models.haemorrhage import HaemorrhageModel, HaemorrhageResult
from triage.models.store import ModelStore
from triage.preprocess.ct import prepare_head_ct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, required=True, help="folder of one head CT series")
    ap.add_argument("--mirror", required=True, help="weights mirror (TRIAGE_MODEL_MIRROR)")
    ap.add_argument("--member", type=int, default=7, help="ensemble member (1-based)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per precision")
    ap.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated, first is the reference"
    )
    args = ap.parse_args()
    precisions = args.precisions.split(",")

    info = cpu_info()
    load_before = os.getloadavg()
    files = sorted(p for p in args.series.iterdir() if p.is_file())
    t0 = time.perf_counter()
    head = prepare_head_ct(files)
    prep_s = time.perf_counter() - t0

    runs: dict[str, list[HaemorrhageResult]] = {p: [] for p in precisions}
    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    others: dict[str, list[float | None]] = {p: [] for p in precisions}
    with tempfile.TemporaryDirectory() as cache:
        store = ModelStore(Path(cache), mirror=args.mirror, allow_download=False)
        models = {
            p: HaemorrhageModel(store, members=[args.member], device="cpu", precision=p)
            for p in precisions
        }
        for m in models.values():
            m.load()
        for i in range(args.repeats):
            order = precisions if i % 2 == 0 else list(reversed(precisions))
            for p in order:
                busy0, own0, t = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
                res = models[p].predict(head.hu, head.head_mask, head.spacing_mm)
                seconds[p].append(time.perf_counter() - t)
                busy1, own1 = busy_cpu_seconds(), own_cpu_seconds()
                # CPUs kept busy by other processes during the run (0 = a quiet machine)
                others[p].append(
                    None
                    if busy0 is None or busy1 is None
                    else max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds[p][-1]
                )
                runs[p].append(res)
                print(
                    f"run {i + 1} {p}: {seconds[p][-1]:.2f} s "
                    f"(inference {res.timing_s['inference']:.2f} s; other processes kept "
                    f"{others[p][-1] if others[p][-1] is None else round(others[p][-1], 2)} "
                    f"CPUs busy), "
                    f"volumes { ({k: round(v, 4) for k, v in res.volumes_ml.items()}) }",
                    flush=True,
                )
    load_after = os.getloadavg()

    ref = precisions[0]
    ref_res = runs[ref][0]
    summary: dict[str, Any] = {}
    for p in precisions:
        res = runs[p][0]
        summary[p] = {
            "predict_s": [round(s, 2) for s in seconds[p]],
            "inference_s": [round(r.timing_s["inference"], 2) for r in runs[p]],
            "other_processes_cpus": [None if o is None else round(o, 2) for o in others[p]],
            "median_predict_s": round(statistics.median(seconds[p]), 2),
            "median_inference_s": round(
                statistics.median(r.timing_s["inference"] for r in runs[p]), 2
            ),
            "tiles": res.tiles,
            "volumes_ml": {k: round(v, 4) for k, v in res.volumes_ml.items()},
            "blood_ml": round(res.blood_volume_ml, 4),
            "max_probability": {k: round(v, 4) for k, v in res.max_probability.items()},
            "runs_identical": all(np.array_equal(r.labels, res.labels) for r in runs[p]),
            "voxels_labelled_differently_from_" + ref: int((res.labels != ref_res.labels).sum()),
            "max_abs_volume_diff_ml_vs_" + ref: round(
                max(abs(res.volumes_ml[k] - ref_res.volumes_ml[k]) for k in res.volumes_ml), 4
            ),
            "max_abs_probability_diff_vs_" + ref: round(
                float(
                    np.abs(
                        res.probabilities.astype(np.float32)
                        - ref_res.probabilities.astype(np.float32)
                    ).max()
                ),
                4,
            ),
        }
    speedups = {
        p: round(summary[ref]["median_inference_s"] / summary[p]["median_inference_s"], 2)
        for p in precisions[1:]
    }
    out = {
        "date": datetime.now(UTC).date().isoformat(),
        "host": platform.node(),
        "cpu": info["model"],
        "amx": info["amx"],
        "avx512_bf16": info["avx512_bf16"],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "default_precision_cpu": default_precision("cpu"),
        "member": args.member,
        "volume_shape": list(head.hu.shape),
        "preprocess_s": round(prep_s, 2),
        "repeats": args.repeats,
        "results": summary,
        "inference_speedup_vs_" + ref: speedups,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
