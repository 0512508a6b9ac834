"""Training throughput (samples/s) of the two fine-tuning paths, one process against torchrun.

Every case runs ``training.fit.engine.run_training`` (MONAI ``SupervisedTrainer``) as
training runs it, in a fresh child process (this script with ``--worker``), so that the
one-process run and its ``torchrun`` peer start alike:

* haemorrhage: ``training.fit.haemorrhage.HaemorrhagePatches`` over synthetic head volumes
  of a realistic size (three volumes of 150 x 180 x 150 voxels, float32 HU: air, a skull
  shell, brain around 30 HU and a labelled 65 HU blob), DeepMedic from the published member
  (``--mirror``, the spec's preferred member) when the weights are there, else from random
  initialisation (compute does not depend on the weight values); ``patch_loss``, Adam
  (lr 1e-4, as ``training.workflows.fit``), batches of 2 and 8 patches (95^3 input,
  15^3 output voxels). Peer, in the same run: ``torchrun --standalone --nproc_per_node 2``
  (DDP on gloo), the batch split between the processes (the engine's step share).
* chest: ``training.fit.chest.ChestSamples`` over synthetic items as
  ``training.data.samples.chest_dataset`` produces them (``image`` float32 (1, 224, 224) in
  [-1024, 1024], ``label`` and ``label_mask`` float32 (18,)), with ``chest_augmentation``;
  the DenseNet-121 of ``load_chest_network`` with no store (random initialisation),
  ``chest_loss``, Adam (lr 1e-4), batch 8.

Threads: ``OMP_NUM_THREADS`` is set so that processes x threads = the CPUs (``--cpus``):
the one-process run gets all of them, each of the two torchrun processes half.
``--one-thread`` adds a one-process, one-thread haemorrhage run (how far threads scale).

Timing: the engine's ``on_step`` callback stamps the end of every optimiser step on the main
process; the first ``--warmup`` steps are left out and samples/s is the timed steps' samples
(the whole batch over all processes) over the time from the end of the last warm-up step to
the end of the last step (data loading, forward, backward, the DDP all-reduce and the
optimiser step; checkpoints are written only after the last step). The engine's own figure,
over the whole run with the warm-up, is kept in the JSON as ``engine_samples_per_s``.

Precision: fp32 on CPU (the engine uses mixed precision only on CUDA; bf16 autocast on a CPU
with AVX512-BF16 or AMX is not something training does, so it is not measured); with
``--device cuda`` every case also runs with ``amp=True`` (MONAI's autocast, float16), as
``training.workflows.fit`` does on CUDA, and the torchrun peer runs only with 2 or more GPUs.

The load average before and after, and the CPUs other processes kept busy while each child
ran (``/proc/stat`` minus the children's own CPU time, start-up included), are reported.

Usage:
    nice python bench/train_throughput.py --json /tmp/train-throughput.json
    nice python bench/train_throughput.py --repeats 2 --one-thread    # ABBA, threads
    python bench/train_throughput.py --device cuda --steps-b2 40 --steps-b8 20   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from cpuload import busy_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "weights"
VOLUME_SHAPE = (150, 180, 150)
if TYPE_CHECKING:
    from training.fit.haemorrhage import Volume

CHEST_MODEL = "xrv-densenet121-res224-all"
HAEMORRHAGE_MODEL = "blast-ct-v1"


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    task: str  # "haemorrhage" or "chest"
    batch: int  # samples per step over all processes
    processes: int
    threads: int  # OMP threads per process
    amp: bool
    warmup: int
    timed: int

    @property
    def label(self) -> str:
        return (
            f"{self.task} b{self.batch} {self.processes}x{self.threads}{' amp' if self.amp else ''}"
        )


# --------------------------------------------------------------------------------------------
# Worker (one case, in its own process or torchrun's)


def synthetic_volumes(
    n: int = 3, shape: tuple[int, int, int] = VOLUME_SHAPE, seed: int = 0
) -> list[Volume]:
    """Head-like volumes: float32 (z, y, x) HU at 1 mm (air -1000, a 6 mm skull shell at
    about 1000, brain N(30, 8)) with a labelled 65 HU ellipsoid (label 1, uint8)."""
    from training.fit.haemorrhage import Volume

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = np.array(shape) / 2
    radii = np.array(shape) * 0.45
    r = np.sqrt(
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    )
    volumes = []
    for i in range(n):
        hu = np.full(shape, -1000.0, np.float32)
        skull = r < 1.0
        brain = r < 1.0 - 6.0 / radii.min()
        hu[skull] = rng.normal(1000, 100, int(skull.sum())).astype(np.float32)
        hu[brain] = rng.normal(30, 8, int(brain.sum())).astype(np.float32)
        c = centre + rng.uniform(-0.3, 0.3, 3) * radii
        b = rng.uniform(6, 14, 3)
        blob = ((z - c[0]) / b[0]) ** 2 + ((y - c[1]) / b[1]) ** 2 + ((x - c[2]) / b[2]) ** 2 < 1
        blob = blob & brain
        label = np.zeros(shape, np.uint8)
        label[blob] = 1 + i % 4
        hu[blob] = rng.normal(65, 5, int(blob.sum())).astype(np.float32)
        volumes.append(Volume(hu, label))
    return volumes


def synthetic_chest_items(n: int, outputs: int, seed: int = 0) -> list[dict[str, Any]]:
    """Items as ``chest_dataset`` yields them: image float32 (1, 224, 224) in
    [-1024, 1024], label and label_mask float32 (outputs,)."""
    from training.data.samples import IMAGE, LABEL, LABEL_MASK, STUDY

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image = rng.uniform(-1024, 1024, (1, 224, 224)).astype(np.float32)
        label = (rng.random(outputs) < 0.3).astype(np.float32)
        mask = (rng.random(outputs) < 0.5).astype(np.float32)
        items.append(
            {
                IMAGE: torch.from_numpy(image),
                LABEL: torch.from_numpy(label),
                LABEL_MASK: torch.from_numpy(mask),
                STUDY: f"synthetic-{i}",
            }
        )
    return items


def worker(args: argparse.Namespace) -> None:
    """Run one case and (main process) write its result as JSON to ``args.worker``."""
    from training.fit.engine import Distributed, run_training

    device = torch.device(args.device)
    parallel = Distributed.from_environment(device)
    if device.type == "cuda" and parallel.active:
        device = torch.device("cuda", parallel.local_rank)
        torch.cuda.set_device(device)
    steps = args.warmup + args.timed
    seed = 0
    origin: str
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    if args.task == "haemorrhage":
        from training.fit.haemorrhage import (
            HaemorrhagePatches,
            load_member,
            patch_loss,
            prepare_patch_batch,
        )
        from triage.models.catalog import load_specs
        from triage.models.store import ModelStore

        spec = next(s for s in load_specs(None, []) if s.name == HAEMORRHAGE_MODEL)
        dataset: Any = HaemorrhagePatches(
            synthetic_volumes(),
            samples=steps * args.batch,
            seed=seed,
            value_range=spec.input.value_range,
        )
        store = None
        if args.mirror and Path(args.mirror, HAEMORRHAGE_MODEL).is_dir():
            store = ModelStore(tmp / "cache", mirror=args.mirror, allow_download=False)
        network, origin = load_member(spec, store, None, seed=seed)
        loss, prepare = patch_loss(len(spec.outputs)), prepare_patch_batch
    else:
        from training.data.samples import chest_augmentation
        from training.fit.chest import (
            ChestSamples,
            chest_loss,
            load_chest_network,
            prepare_chest_batch,
        )
        from triage.models.catalog import builtin_spec

        spec = builtin_spec(CHEST_MODEL)
        items = synthetic_chest_items(16, len(spec.outputs))
        dataset = ChestSamples(
            items, seed=seed, samples=steps * args.batch, augmentation=chest_augmentation()
        )
        network, origin = load_chest_network(spec, None, seed=seed)
        loss, prepare = chest_loss(), prepare_chest_batch

    stamps: list[float] = []

    def on_step(step: int, value: float) -> None:
        stamps.append(time.perf_counter())

    try:
        result = run_training(
            network=network,
            dataset=dataset,
            loss_function=loss,
            optimizer_factory=lambda params: torch.optim.Adam(params, lr=1e-4),
            steps=steps,
            batch_size=args.batch,
            device=device,
            parallel=parallel,
            seed=seed,
            checkpoint_dir=tmp / "checkpoints",
            checkpoint_every=steps,
            resume=False,
            amp=args.amp,
            prepare_batch=prepare,
            on_step=on_step,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if parallel.main:
        # The clock starts at the end of the last warm-up step.
        step_s = np.diff(stamps[args.warmup - 1 :])
        seconds = float(step_s.sum())
        out = {
            "origin": origin,
            "steps": result.steps,
            "timed_steps": len(step_s),
            "timed_s": seconds,
            "samples_per_s": len(step_s) * args.batch / seconds,
            "median_step_s": float(np.median(step_s)),
            "samples_per_s_at_median_step": args.batch / float(np.median(step_s)),
            "step_s": [round(float(s), 4) for s in step_s],
            "engine_samples_per_s": result.samples_per_s,
            "final_loss": result.losses[-1],
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mb_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        Path(args.worker).write_text(json.dumps(out))
    parallel.close()


# --------------------------------------------------------------------------------------------
# Driver


def run_case(case: Case, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run one case in a child process (or torchrun) and return its result."""
    name = f"{case.task}-b{case.batch}-p{case.processes}-t{case.threads}-amp{int(case.amp)}"
    out = tmp / f"{name}.json"
    worker_args = [
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        "--task",
        case.task,
        "--batch",
        str(case.batch),
        "--warmup",
        str(case.warmup),
        "--timed",
        str(case.timed),
        "--device",
        args.device,
        "--mirror",
        str(args.mirror or ""),
    ]
    if case.amp:
        worker_args.append("--amp")
    if case.processes == 1:
        cmd = [sys.executable, *worker_args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(case.processes), *worker_args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(case.threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=args.case_timeout)
    wall = time.perf_counter() - t0
    busy1 = busy_cpu_seconds()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    others = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - own) / wall
    result = json.loads(out.read_text())
    return {
        **asdict(case),
        "precision": "amp (float16 autocast)" if case.amp else "fp32",
        **result,
        "child_wall_s": wall,
        "other_processes_cpus": others,
    }


def plan(args: argparse.Namespace) -> list[Case]:
    """The cases, each one-process run followed by its torchrun peer."""
    cpus = args.cpus
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    peer_processes = 2
    peers = args.peer and (args.device == "cpu" or gpus >= peer_processes)
    peer_threads = max(1, cpus // peer_processes) if args.device == "cpu" else 1
    precisions = [False, True] if args.device == "cuda" else [False]
    steps = {2: args.steps_b2, 8: args.steps_b8}
    cases: list[Case] = []
    for amp in precisions:
        for batch in (2, 8):
            timed = steps[batch]
            cases.append(Case("haemorrhage", batch, 1, cpus, amp, args.warmup, timed))
            if args.one_thread and args.device == "cpu" and cpus > 1:
                cases.append(Case("haemorrhage", batch, 1, 1, amp, args.warmup, timed))
            if peers:
                cases.append(
                    Case(
                        "haemorrhage",
                        batch,
                        peer_processes,
                        peer_threads,
                        amp,
                        args.warmup,
                        timed,
                    )
                )
        cases.append(Case("chest", 8, 1, cpus, amp, args.warmup, args.steps_chest))
    return cases


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table; the ratios are against the one-process run with every CPU of the
    same round, task, batch and precision (samples/s over all timed steps, and the batch
    over the median step, which a neighbour's burst of load moves less)."""
    base = {
        (r["round"], r["task"], r["batch"], r["amp"]): r
        for r in results
        if r["processes"] == 1 and r["threads"] == max(x["threads"] for x in results)
    }
    lines = [
        "| round | task | batch | processes x threads | precision | warm-up + timed steps "
        "| median step (s) | samples/s | vs 1 process | samples/s at median step "
        "| vs 1 process | other CPUs busy |",
        "|---:|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = base.get((r["round"], r["task"], r["batch"], r["amp"]))
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else "-"
        key = "samples_per_s_at_median_step"
        ratio_median = f"{r[key] / ref[key]:.2f}x" if ref else "-"
        others = r["other_processes_cpus"]
        lines.append(
            f"| {r['round']} | {r['task']} | {r['batch']} | {r['processes']} x {r['threads']} "
            f"| {r['precision']} | {r['warmup']} + {r['timed_steps']} "
            f"| {r['median_step_s']:.2f} | {r['samples_per_s']:.2f} | {ratio} "
            f"| {r['samples_per_s_at_median_step']:.2f} | {ratio_median} "
            f"| {'?' if others is None else f'{others:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    ap.add_argument("--steps-b2", type=int, default=8, help="timed steps, haemorrhage batch 2")
    ap.add_argument("--steps-b8", type=int, default=3, help="timed steps, haemorrhage batch 8")
    ap.add_argument("--steps-chest", type=int, default=4, help="timed steps, chest batch 8")
    ap.add_argument("--repeats", type=int, default=1, help="rounds (even rounds in reverse order)")
    ap.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 1, help="processes x threads (CPU)"
    )
    ap.add_argument(
        "--one-thread",
        action="store_true",
        help="also one process with one thread (haemorrhage, CPU): how far threads scale",
    )
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip torchrun runs")
    ap.add_argument(
        "--mirror",
        type=Path,
        default=MIRROR if MIRROR.is_dir() else None,
        help="weights mirror for the haemorrhage member (default ../shared/weights if there)",
    )
    ap.add_argument("--case-timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    # Worker mode (internal).
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default="haemorrhage", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--timed", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the clock starts at the end of a step)")
    if args.worker:
        worker(args)
        return

    from triage.models.device import cpu_info

    info = cpu_info()
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    results = []
    cases = plan(args)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for round_ in range(1, args.repeats + 1):
            # Odd rounds in plan order, even rounds reversed (ABBA: a neighbour's load
            # or a warming machine favours neither side of a comparison).
            for case in cases if round_ % 2 else list(reversed(cases)):
                r = {"round": round_, "case": cases.index(case)}
                r.update(run_case(case, args, Path(tmp)))
                print(
                    f"round {round_} {case.label}: {r['samples_per_s']:.2f} samples/s over "
                    f"{r['timed_steps']} steps ({r['timed_s']:.1f} s; child "
                    f"{r['child_wall_s']:.0f} s; other processes kept "
                    f"{r['other_processes_cpus'] or 0:.2f} CPUs busy)",
                    flush=True,
                )
                results.append(r)
    results.sort(key=lambda r: (r["round"], r["case"]))
    load_after = os.getloadavg()
    meta = {
        "date": datetime.now(UTC).date().isoformat(),
        "host": platform.node(),
        "cpu": info["model"],
        "amx": info["amx"],
        "avx512_bf16": info["avx512_bf16"],
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "niceness": os.nice(0),
        "haemorrhage_volumes": f"3 x {VOLUME_SHAPE} float32 HU, synthetic",
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print()
    print(
        f"CPU {meta['cpu']} (AMX {'yes' if meta['amx'] else 'no'}, AVX512-BF16 "
        f"{'yes' if meta['avx512_bf16'] else 'no'}), {meta['cpus']} CPUs, torch "
        f"{meta['torch']}, device {meta['device']}"
        f"{' ' + meta['cuda_device'] if meta['cuda_device'] else ''}; started from: "
        f"{'; '.join(sorted({r['task'] + ' ' + r['origin'] for r in results}))}; load average "
        f"{meta['load_avg_before']} before, {meta['load_avg_after']} after; "
        f"{meta['wall_s']} s in all"
    )
    print()
    print(table(results))
    doc = {**meta, "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1))
    print()
    print(json.dumps({k: v for k, v in doc.items() if k != "results"}))


if __name__ == "__main__":
    main()
