"""Haemorrhage-model inference time on one head CT series: the product's setting vs a peer.

The peer is the naive set-up described with the weights (fp32, 40x80x80 output tiles),
run in the same process on the same preprocessed volume, so the ratio is a fair one.

Usage:
    python bench/inference.py --series ../shared/data/cq500-ct0 --mirror ../shared/weights
    python bench/inference.py ... --device cuda --members 12     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from triage.models.haemorrhage import BLAST_CT_V1, HaemorrhageModel
from triage.models.store import ModelStore
from triage.preprocess.ct import prepare_head_ct


def run(model: HaemorrhageModel, hu, mask) -> dict[str, object]:  # type: ignore[no-untyped-def]
    model.load()
    t0 = time.perf_counter()
    res = model.predict(hu, mask)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "precision": res.precision,
        "tiles": res.tiles,
        "members": list(res.members),
        "blood_ml": round(res.blood_volume_ml, 3),
        "volumes_ml": {k: round(v, 3) for k, v in res.volumes_ml.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, required=True)
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--members", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true", help="skip the naive peer run")
    args = ap.parse_args()

    files = sorted(p for p in args.series.iterdir() if p.is_file())
    t0 = time.perf_counter()
    head = prepare_head_ct(files)
    prep_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        store = ModelStore(Path(cache), mirror=args.mirror)
        ours = HaemorrhageModel(store, spec=BLAST_CT_V1, members=args.members, device=args.device)
        result: dict[str, object] = {
            "volume_shape": list(head.hu.shape),
            "preprocess_s": round(prep_s, 2),
            "ours": run(ours, head.hu, head.head_mask),
        }
        if not args.no_peer:
            peer = HaemorrhageModel(
                store,
                spec=BLAST_CT_V1,
                members=list(ours.members),
                device=args.device,
                tile=(40, 80, 80),
                precision="fp32",
            )
            result["peer_naive_fp32_40x80x80"] = run(peer, head.hu, head.head_mask)
            peer_s = result["peer_naive_fp32_40x80x80"]["seconds"]  # type: ignore[index]
            ours_s = result["ours"]["seconds"]  # type: ignore[index]
            result["speedup_vs_peer"] = round(float(peer_s) / float(ours_s), 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
