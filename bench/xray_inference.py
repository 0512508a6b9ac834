"""Chest X-ray model: time per radiograph, split by stage, against TorchXRayVision's own path.

For each radiograph, in one process, warm (one untimed warm-up of every path first), the
paths alternate each round and the median of ``--repeats`` rounds is reported:

* ours: ``ChestXrayModel.run([path], uid)`` -> ``timing_s`` ``prepare`` (our X-ray reader,
  ``xrv_input``), ``predict`` (network forward, calibration, and MONAI's Grad-CAM for
  pneumothorax and for every other flagged finding) and ``interpret`` (findings, overlays);
* ours without Grad-CAM: the same ``prepare`` followed by the network forward alone on our
  prepared tensor (no saliency), the part of ``predict`` that is not Grad-CAM;
* peer: TorchXRayVision's own path on the same file: ``xrv.utils.read_xray_dcm``,
  ``XRayCenterCrop``, ``XRayResizer(224)`` and the forward of the same network (same
  weights, a separate module without the Grad-CAM hooks), no saliency.

The real weights cannot be downloaded here, so the network carries random weights saved the
way the real file is (a whole pickled module, ``torch.save(model)``) in a temporary mirror
and is loaded through the product's ``ModelStore``; compute time does not depend on the
weight values, but the number of flagged findings (hence of Grad-CAMs) does: it is reported.

Usage:
    python bench/xray_inference.py --repeats 7
    python bench/xray_inference.py --device cuda --repeats 21      # on a GPU machine
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
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torchxrayvision as xrv
from cpuload import busy_cpu_seconds, own_cpu_seconds

from triage.models.catalog import builtin_spec
from triage.models.chest import ChestXrayModel, build_network, read_state_dict
from triage.models.device import cpu_info
from triage.models.store import ModelStore

MODEL = "xrv-densenet121-res224-all"
SIIM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "xray" / "siim-cr-chest.dcm"


def pydicom_data_file(name: str) -> Path | None:
    """A file shipped with pydicom or pydicom-data, found on disk (never downloaded)."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    for root in roots:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    return None


def write_random_weights(mirror: Path, seed: int = 0) -> Path:
    """The chest network with random weights, saved as the real file is (``torch.save`` of
    the whole module) under ``<mirror>/<model>/<file>``."""
    spec = builtin_spec(MODEL)
    torch.manual_seed(seed)
    net = xrv.models.DenseNet(weights=None)
    path = mirror / spec.name / spec.weights[0].filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net, path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_file(
    path: Path,
    model: ChestXrayModel,
    peer_net: torch.nn.Module,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    resolution = model.resolution
    net = model.network

    def ours() -> dict[str, float]:
        out = model.run([path], "1.2.3")
        return {**out.timing_s, "gradcams": float(len(out.overlays))}

    def ours_forward() -> dict[str, float]:
        t_prep, prepared = timed(lambda: model.prepare([path]), device)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                x = torch.from_numpy(prepared.x).to(device)
                return torch.sigmoid(net(x).float()).cpu()

        t_fwd, _ = timed(forward, device)
        return {"prepare": t_prep, "forward": t_fwd}

    def peer() -> dict[str, float]:
        def read() -> np.ndarray:
            with warnings.catch_warnings():  # MONOCHROME1 conversion warning
                warnings.simplefilter("ignore", UserWarning)
                img = xrv.utils.read_xray_dcm(path)
            img = img[None, ...].astype(np.float32)
            img = xrv.datasets.XRayCenterCrop()(img)
            return xrv.datasets.XRayResizer(resolution)(img)

        t_read, img = timed(read, device)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)[None]).to(device)
                return torch.sigmoid(peer_net(x).float()).cpu()

        t_fwd, _ = timed(forward, device)
        return {"prepare": t_read, "forward": t_fwd}

    paths = {"ours": ours, "ours_no_gradcam": ours_forward, "peer": peer}
    for fn in paths.values():  # warm-up, untimed
        fn()
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    for i in range(repeats):
        order = list(paths) if i % 2 == 0 else list(reversed(paths))
        for name in order:
            rounds[name].append(paths[name]())
    busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    # CPUs kept busy by other processes while the rounds ran (0 = a quiet machine)
    others = (
        None
        if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    )

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    def med_total(name: str, keys: tuple[str, ...]) -> float:
        return statistics.median(sum(r[k] for k in keys) for r in rounds[name])

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    res = {
        "file": path.name,
        "image": f"{ds.Rows}x{ds.Columns} {ds.BitsStored}-bit {ds.PhotometricInterpretation} "
        f"{ds.file_meta.TransferSyntaxUID.name}",
        "ours": {
            "prepare_s": med("ours", "prepare"),
            "predict_s": med("ours", "predict"),
            "interpret_s": med("ours", "interpret"),
            "total_s": med_total("ours", ("prepare", "predict", "interpret")),
            "gradcams": int(rounds["ours"][0]["gradcams"]),
        },
        "ours_no_gradcam": {
            "prepare_s": med("ours_no_gradcam", "prepare"),
            "forward_s": med("ours_no_gradcam", "forward"),
            "total_s": med_total("ours_no_gradcam", ("prepare", "forward")),
        },
        "peer": {
            "prepare_s": med("peer", "prepare"),
            "forward_s": med("peer", "forward"),
            "total_s": med_total("peer", ("prepare", "forward")),
        },
        "repeats": repeats,
        "min_total_s": {
            k: min(sum(v for kk, v in r.items() if kk != "gradcams") for r in rs)
            for k, rs in rounds.items()
        },
        "other_processes_cpus": others,
    }
    peer_total = res["peer"]["total_s"]
    res["ratio_ours_to_peer"] = res["ours"]["total_s"] / peer_total
    res["ratio_ours_no_gradcam_to_peer"] = res["ours_no_gradcam"]["total_s"] / peer_total
    res["ratio_prepare_ours_to_peer"] = res["ours"]["prepare_s"] / res["peer"]["prepare_s"]
    res["ratio_forward_ours_to_peer"] = (
        res["ours_no_gradcam"]["forward_s"] / res["peer"]["forward_s"]
    )
    res["gradcam_s_estimate"] = res["ours"]["predict_s"] - res["ours_no_gradcam"]["forward_s"]
    return res


def markdown(results: list[dict[str, Any]]) -> str:
    ms = 1000.0
    lines = [
        "| radiograph | path | prepare (ms) | predict / forward (ms) | interpret (ms) "
        "| total (ms) | ours / peer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        o, n, p = r["ours"], r["ours_no_gradcam"], r["peer"]
        lines.append(
            f"| {r['file']} | ours: run() incl. {o['gradcams']} Grad-CAM(s) "
            f"| {o['prepare_s'] * ms:.0f} | {o['predict_s'] * ms:.0f} "
            f"| {o['interpret_s'] * ms:.0f} | {o['total_s'] * ms:.0f} "
            f"| **{r['ratio_ours_to_peer']:.2f}×** |"
        )
        lines.append(
            f"| | ours without Grad-CAM (prepare + forward) | {n['prepare_s'] * ms:.0f} "
            f"| {n['forward_s'] * ms:.0f} | – | {n['total_s'] * ms:.0f} "
            f"| **{r['ratio_ours_no_gradcam_to_peer']:.2f}×** |"
        )
        lines.append(
            f"| | peer: TorchXRayVision read_xray_dcm + crop + resize + forward "
            f"| {p['prepare_s'] * ms:.0f} | {p['forward_s'] * ms:.0f} | – "
            f"| {p['total_s'] * ms:.0f} | 1.00× |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per file (median)")
    ap.add_argument(
        "--files",
        type=Path,
        nargs="*",
        default=None,
        help="radiographs (default: the SIIM chest CR and pydicom-data's RG1_UNCR.dcm)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    files = args.files
    if not files:
        files = [SIIM.resolve()]
        rg1 = pydicom_data_file("RG1_UNCR.dcm")
        if rg1 is not None:
            files.append(rg1)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mirror = Path(tmp) / "mirror"
        weights = write_random_weights(mirror)
        spec = builtin_spec(MODEL)
        store = ModelStore(Path(tmp) / "cache", mirror, allow_download=False)
        model = ChestXrayModel(spec, store, device=args.device)
        load_s = model.load()
        peer_net = build_network(spec, read_state_dict(weights.read_bytes())).to(model.device)
        results = [bench_file(f, model, peer_net, model.device, args.repeats) for f in files]
    load_after = os.getloadavg()
    info = cpu_info()
    meta = {
        "date": datetime.now(UTC).date().isoformat(),
        "host": platform.node(),
        "cpu": info["model"],
        "amx": info["amx"],
        "avx512_bf16": info["avx512_bf16"],
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchxrayvision": xrv.__version__,
        "device": str(model.device),
        "cuda_device": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else None,
        "precision": "fp32",
        "weights_load_s": round(load_s, 3),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(
        f"CPU {meta['cpu']} (AMX {'yes' if meta['amx'] else 'no'}, AVX512-BF16 "
        f"{'yes' if meta['avx512_bf16'] else 'no'}), {meta['cpus']} CPUs, torch {meta['torch']} "
        f"({meta['torch_threads']} threads), torchxrayvision {meta['torchxrayvision']}, "
        f"device {meta['device']}{' ' + meta['cuda_device'] if meta['cuda_device'] else ''}; "
        f"median of {args.repeats} warm rounds; load average {meta['load_avg_before']} before, "
        f"{meta['load_avg_after']} after"
    )
    for r in results:
        others = r["other_processes_cpus"]
        print(
            f"- {r['file']}: {r['image']}; other processes kept "
            f"{'unknown' if others is None else f'{others:.2f}'} of the CPUs busy"
        )
    print()
    print(markdown(results))
    print()

    def rounded(obj: Any) -> Any:
        if isinstance(obj, float):
            return round(obj, 4)
        if isinstance(obj, dict):
            return {k: rounded(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rounded(v) for v in obj]
        return obj

    print(json.dumps(rounded({**meta, "results": results})))


if __name__ == "__main__":
    main()
