"""Run the demo head-CT phantoms through preprocessing and the real haemorrhage model.

Prints one row per phantom: the true bleed volume, the predicted volume per class and the
study-level flag. The synthetic bleeds should be flagged with a blood volume (IPH + EAH + IVH)
close to the true volume, and the normals should stay well below the flag threshold.

Needs the BLAST-CT weights (a model-store mirror, e.g. ``../shared/weights``, or a cache that
already holds them). Runs on the CPU unless ``--device`` says otherwise.

Example::

    python bench/phantom_check.py --seeds 0,1,2 --kinds normal,iph,sdh \\
        --mirror ../shared/weights
"""

# ruff: noqa: T201

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from triage.demo.phantom import PhantomSpec, head_ct_phantom, write_head_ct_series
from triage.models.haemorrhage import BLAST_CT_V1, HaemorrhageModel, to_finding
from triage.models.store import ModelStore
from triage.preprocess.ct import prepare_head_ct

REPO_ROOT = Path(__file__).resolve().parents[1]


def _spec(kind: str, seed: int, volume_ml: float) -> PhantomSpec:
    if kind == "normal":
        return PhantomSpec(haemorrhage=False, seed=seed)
    return PhantomSpec(haemorrhage=True, kind=kind, seed=seed, bleed_volume_ml=volume_ml)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated phantom seeds")
    parser.add_argument(
        "--kinds", default="normal,iph", help="comma-separated kinds: normal, iph, sdh"
    )
    parser.add_argument("--volume-ml", type=float, default=25.0, help="bleed volume to build")
    parser.add_argument("--members", type=int, default=1, help="ensemble members (1..12)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument(
        "--mirror",
        default=str(REPO_ROOT.parent / "shared" / "weights"),
        help="model-store mirror directory holding blast-ct-v1/",
    )
    parser.add_argument(
        "--cache-dir", default="/tmp/triage-model-cache", help="model-store cache directory"
    )
    args = parser.parse_args(argv)

    model = HaemorrhageModel(
        ModelStore(cache_dir=Path(args.cache_dir), mirror=args.mirror),
        spec=BLAST_CT_V1,
        members=args.members,
        device=args.device,
        precision=args.precision,
    )
    print(
        f"{'kind':7s} {'seed':>4s} {'true_ml':>8s} {'blood_ml':>8s} {'IPH':>7s} {'EAH':>7s} "
        f"{'oedema':>7s} {'IVH':>7s} {'flag':>5s} {'score':>5s} {'gen_s':>5s} {'model_s':>7s}"
    )
    for kind in args.kinds.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            spec = _spec(kind, seed, args.volume_ml)
            t0 = time.perf_counter()
            truth = head_ct_phantom(spec).bleed_volume_ml
            gen_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_head_ct_series(Path(tmp), spec)
                head = prepare_head_ct(paths)
            t1 = time.perf_counter()
            result = model.predict(head.hu, head.head_mask, head.spacing_mm)
            model_s = time.perf_counter() - t1
            finding = to_finding(result)
            v = result.volumes_ml
            print(
                f"{kind:7s} {seed:4d} {truth:8.2f} {result.blood_volume_ml:8.2f} "
                f"{v['IPH']:7.2f} {v['EAH']:7.2f} {v['oedema']:7.2f} {v['IVH']:7.2f} "
                f"{'yes' if finding.flag else 'no':>5s} {finding.score:5.2f} {gen_s:5.2f} "
                f"{model_s:7.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
