"""CT volume building: decoding + HU (+ 1 mm resampling) against SimpleITK's ImageSeriesReader.

The same files, the same process, the same run, alternating ours and the anchor each round:

* ours: ``load_ct_series`` (headers with pydicom, sorted along the slice normal, gantry tilt
  and the missing slice put on a regular grid, JPEG Lossless decoded by GDCM in threads, HU
  clipped at -1024), then ``resample_isotropic``;
* anchor: SimpleITK ``ImageSeriesReader`` (GDCM) on the file list sorted by
  ``GetGDCMSeriesFileNames`` (timed with the sort, and on a list sorted beforehand), its
  default pixel type (GDCM's rescaled integers), then the same ``resample_isotropic``.

So only decoding, HU conversion and stacking differ. The voxel check compares each source
slice of ours with the anchor's slice at the same position (the anchor stacks the 238 slices
contiguously, ignoring the gantry tilt and the missing slice, so only source slices line up;
padding below -1024 HU is clipped on the anchor's side as ours does).

Usage:
    python bench/ct_volume.py --series ../shared/data/cq500-ct0 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from cpuload import busy_cpu_seconds, own_cpu_seconds

from triage.preprocess.ct import HU_AIR, load_ct_series, resample_isotropic


def sitk_read(names: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(names)
    return reader.Execute()


def sitk_sorted_names(folder: Path) -> list[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def max_abs_diff(files: list[Path], ours: sitk.Image, names: list[str]) -> tuple[float, int]:
    """Largest |ours - anchor| over all source slices, and the number of slices compared."""
    anchor = np.maximum(sitk.GetArrayFromImage(sitk_read(names)).astype(np.float32), HU_AIR)
    positions = np.array(
        [pydicom.dcmread(n, stop_before_pixels=True).ImagePositionPatient for n in names],
        dtype=np.float64,
    )
    ours_array = sitk.GetArrayViewFromImage(ours)
    origin = np.asarray(ours.GetOrigin())
    direction = np.asarray(ours.GetDirection()).reshape(3, 3)
    dz = ours.GetSpacing()[2]
    # the index of each source slice along our stacking axis (its position along that axis)
    k = np.rint((positions - origin) @ direction[:, 2] / dz).astype(int)
    assert len(set(k)) == len(k) == len(files), "source slices do not map one to one"
    worst = max(float(np.max(np.abs(ours_array[kk] - anchor[i]))) for i, kk in enumerate(k))
    return worst, len(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=Path("../shared/data/cq500-ct0"))
    ap.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    ap.add_argument("--spacing", type=float, default=1.0, help="resampling spacing, mm")
    ap.add_argument("--workers", type=int, default=None, help="our decoding threads")
    ap.add_argument(
        "--no-pydicom", action="store_true", help="skip ours with the pydicom decoder (slow)"
    )
    args = ap.parse_args()

    files = sorted(p for p in args.series.iterdir() if p.is_file())
    n = len(files)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # the anchor warns about the gap
    presorted = sitk_sorted_names(args.series)

    def ours_load() -> sitk.Image:
        return load_ct_series(files, workers=args.workers).image

    runs: dict[str, Callable[[], Any]] = {
        "ours: load_ct_series": ours_load,
        "ours: load_ct_series, 1 thread": lambda: load_ct_series(files, workers=1),
        "SimpleITK: GetGDCMSeriesFileNames + ImageSeriesReader": lambda: sitk_read(
            sitk_sorted_names(args.series)
        ),
        "SimpleITK: ImageSeriesReader (list sorted beforehand)": lambda: sitk_read(presorted),
        "ours: load_ct_series + resample": lambda: resample_isotropic(ours_load(), args.spacing),
        "SimpleITK: ImageSeriesReader (sorted beforehand) + resample": lambda: resample_isotropic(
            sitk_read(presorted), args.spacing
        ),
    }
    if not args.no_pydicom:
        runs["ours: load_ct_series, decoder=pydicom (pylibjpeg)"] = lambda: load_ct_series(
            files, decoder="pydicom", workers=args.workers
        )
    load_before = os.getloadavg()
    for fn in runs.values():  # warm up: imports, page cache, thread pools
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    load_after = os.getloadavg()
    # CPUs kept busy by other processes while the rounds ran (0 = a quiet machine)
    others = (
        None
        if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    )
    others_text = "unknown" if others is None else f"{others:.2f}"
    med = {name: statistics.median(ts) for name, ts in times.items()}

    ours_image = ours_load()
    diff, compared = max_abs_diff(files, ours_image, presorted)

    anchor_load = med["SimpleITK: ImageSeriesReader (list sorted beforehand)"]
    anchor_listed = med["SimpleITK: GetGDCMSeriesFileNames + ImageSeriesReader"]
    anchor_resample = med["SimpleITK: ImageSeriesReader (sorted beforehand) + resample"]
    ours_decode = med["ours: load_ct_series"]
    ours_resample = med["ours: load_ct_series + resample"]

    print(f"{'run':62s} {'median s':>9s} {'min s':>7s} {'slices/s':>9s}")
    for name, ts in times.items():
        print(f"{name:62s} {med[name]:9.3f} {min(ts):7.3f} {n / med[name]:9.1f}")
    print(
        f"speed ratio, decode+HU, vs ImageSeriesReader on a sorted list: "
        f"{anchor_load / ours_decode:.2f}x"
    )
    print(
        f"speed ratio, decode+HU, vs GetGDCMSeriesFileNames + ImageSeriesReader: "
        f"{anchor_listed / ours_decode:.2f}x"
    )
    print(f"speed ratio, decode+HU+resampling: {anchor_resample / ours_resample:.2f}x")
    print(f"max |ours - SimpleITK| over {compared} source slices: {diff:g} HU")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"CPUs kept busy by other processes during the rounds: {others_text}")

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print()
    print(
        f"### Decoding, HU and resampling vs SimpleITK ({datetime.now(UTC).date()}, "
        f"{cpus} CPUs, {platform.processor() or platform.machine()})"
    )
    print()
    print("```")
    print(f"python bench/ct_volume.py --series {args.series} --repeats {args.repeats}")
    print("```")
    print()
    print(
        f"{n} files; median of {args.repeats} rounds, ours and the anchor alternating; "
        f"SimpleITK {sitk.Version.VersionString()}, pydicom {pydicom.__version__}."
    )
    print()
    print("| run | median (s) | slices/s | anchor / ours |")
    print("|---|---:|---:|---:|")
    for name in runs:
        anchor = anchor_resample if "resample" in name else anchor_load
        print(f"| {name} | {med[name]:.3f} | {n / med[name]:.0f} | {anchor / med[name]:.2f}× |")
    print()
    print(
        f"Maximum absolute voxel difference, ours vs SimpleITK, over all {compared} source "
        f"slices: **{diff:g} HU**. Load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; other processes kept {others_text} of the {cpus} CPUs "
        "busy during the rounds."
    )


if __name__ == "__main__":
    main()
