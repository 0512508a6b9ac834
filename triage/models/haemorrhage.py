"""Intracranial haemorrhage segmentation with the BLAST-CT v1 ensemble.

:class:`HaemorrhageModel` turns a 1 mm isotropic head CT in Hounsfield units into per-voxel
class probabilities (background, IPH, EAH, oedema, IVH), a label map and lesion volumes;
:func:`to_finding` turns that into the study-level :class:`triage.domain.Finding` with its
severity; :class:`HaemorrhageFindingModel` is the registry's :class:`FindingModel` (head CT
series in, finding and overlay out).

Why a small tiler and not ``monai.inferers.SlidingWindowInferer``: the network uses valid
convolutions, so an input window of ``n + 80`` voxels yields an output of ``n`` voxels, a
constant shrink that the MONAI inferer cannot express (it only maps same-size or
proportionally scaled outputs back into the volume). Each tile also needs its absolute
origin to keep the coarse pathways' sampling grids aligned across tiles (see
:mod:`triage.models.deepmedic`), and tiles without any head voxel are skipped outright. The
tiler here pads the volume by the 40-voxel context (value -1, i.e. <= -15 HU), lays out
non-overlapping output tiles whose sides are multiples of 5, and runs each tile once.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from triage.domain import Finding, ModelRef, Severity
from triage.models.base import FindingModel, ModelOutput
from triage.models.catalog import builtin_spec
from triage.models.deepmedic import DeepMedic
from triage.models.device import default_precision, resolve_device
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore, ModelWeightsError
from triage.preprocess.ct import HeadCT, prepare_head_ct
from triage.preprocess.errors import InputContractError
from triage.results import Overlay

if TYPE_CHECKING:
    from triage.models.registry import RuntimeOptions

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_T = TypeVar("_T")

#: The shipped spec of BLAST-CT v1 (``triage/models/specs/blast-ct-v1.json``).
BLAST_CT_V1: Final[ModelSpec] = builtin_spec("blast-ct-v1")
#: The finding this model raises.
FINDING = "intracranial_haemorrhage"

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
#: Largest accepted extent per axis, in voxels (= mm at 1 mm spacing).
MAX_EXTENT_VOXELS = 600
#: Spacing tolerance, mm.
SPACING_TOLERANCE_MM = 0.01
#: Cost of an output tile relative to its size: the full-resolution pathway works on the
#: output plus 8 voxels per side; the 1x1x1 head on the output only (weights from timing).
_HEAD_COST = 0.45
#: Default memory budgets, as the number of full-resolution pathway input voxels per tile
#: (the biggest activations are 50 channels of that size, about 3 alive at once).
_TILE_BUDGET_VOXELS: dict[tuple[str, str], int] = {
    ("cpu", "fp32"): 2_200_000,
    ("cpu", "bf16"): 1_500_000,
    ("cuda", "fp32"): 24_000_000,
    ("cuda", "bf16"): 48_000_000,
    ("cuda", "fp16"): 48_000_000,
}


# The process's inference thread (see _compute_executor).
_executor: ThreadPoolExecutor | None = None
_executor_pid = 0
_executor_lock = threading.Lock()
_compute_thread_id: int | None = None


def _init_compute_thread() -> None:
    # Flush denormal floats to zero in this thread *before* it starts its OpenMP pool, so
    # that the pool's worker threads inherit the setting (pthreads inherit the floating-
    # point environment; setting it later only affects the calling thread). Denormals
    # make the fp32 convolutions of the real weights about 20x slower.
    global _compute_thread_id
    _compute_thread_id = threading.get_ident()
    torch.set_flush_denormal(True)


def _run_in_compute_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` in the inference thread and wait for it (directly when already there)."""
    if threading.get_ident() == _compute_thread_id:
        return fn(*args)
    return _compute_executor().submit(fn, *args).result()


def _compute_executor() -> ThreadPoolExecutor:
    """The process's single inference thread (serialises model runs, avoids oversubscribing
    the CPU, and carries the flush-denormals setting into its OpenMP workers)."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="triage-inference",
                initializer=_init_compute_thread,
            )
            _executor_pid = os.getpid()
        return _executor


def default_members(device: str | torch.device = "auto", spec: ModelSpec = BLAST_CT_V1) -> int:
    """Default ensemble size: every member on a GPU, 1 on a CPU (to stay within ~1 min)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    return len(spec.weights) if dev.type == "cuda" else 1


def lesion_classes(spec: ModelSpec) -> tuple[str, ...]:
    """The lesion classes, in output-index order after background."""
    return spec.outputs[1:]


def blood_classes(spec: ModelSpec) -> tuple[str, ...]:
    """The classes that count as blood for the finding (oedema does not)."""
    return spec.finding(FINDING).outputs


@dataclass(frozen=True, eq=False)
class HaemorrhageResult:
    """Segmentation of one head CT.

    Attributes:
        labels: uint8 (z, y, x), argmax class index per voxel (0 background, 1 IPH, 2 EAH,
            3 oedema, 4 IVH); 0 outside the head mask.
        probabilities: float16 (5, z, y, x), ensemble-mean softmax probabilities in [0, 1],
            channels in ``spec.output_classes`` order; background = 1 outside the head mask.
        volumes_ml: lesion volume per class (IPH, EAH, oedema, IVH), ml: voxels labelled
            with the class x voxel volume.
        max_probability: highest voxel probability per lesion class, in [0, 1].
        spacing_mm: voxel spacing (z, y, x), mm.
        members: ensemble members used (1-based member numbers).
        device: torch device the inference ran on (``cpu``, ``cuda:0``).
        precision: compute precision (``fp32``, ``bf16``, ``fp16``).
        timing_s: seconds spent per stage (``load``, ``preprocess``, ``inference``,
            ``postprocess``, ``total``).
        tiles: ``{"run": n, "skipped": m, "size": [tz, ty, tx]}``.
        spec: the model spec that produced it.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    volumes_ml: dict[str, float]
    max_probability: dict[str, float]
    spacing_mm: tuple[float, float, float]
    members: tuple[int, ...]
    device: str
    precision: str
    timing_s: dict[str, float]
    tiles: dict[str, Any] = field(default_factory=dict)
    spec: ModelSpec = BLAST_CT_V1

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel, ml."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def blood_volume_ml(self) -> float:
        """Total blood volume (IPH + EAH + IVH), ml. Oedema is not blood."""
        return float(sum(self.volumes_ml[c] for c in blood_classes(self.spec)))


def check_input(
    hu: np.ndarray,
    head_mask: np.ndarray | None,
    spacing_mm: Sequence[float],
    spec: ModelSpec = BLAST_CT_V1,
) -> np.ndarray | None:
    """Check the input contract; return the head mask as a bool array (or None).

    Args:
        hu: float32 (z, y, x) volume in Hounsfield units, ``spec.input_spacing_mm`` spacing.
        head_mask: bool (z, y, x) mask of the head (same shape), or None.
        spacing_mm: voxel spacing (z, y, x), mm.
        spec: the model's spec.

    Raises:
        InputContractError: with a message naming the violated condition.
    """
    if not isinstance(hu, np.ndarray):
        raise InputContractError(f"hu must be a numpy array, got {type(hu).__name__}")
    if hu.ndim != 3:
        raise InputContractError(
            f"hu must be a 3D (z, y, x) volume, got {hu.ndim} dimensions {hu.shape}"
        )
    if hu.dtype != np.float32:
        raise InputContractError(
            f"hu must be float32 Hounsfield units, got dtype {hu.dtype}; "
            "convert with hu.astype(np.float32)"
        )
    if min(hu.shape) < 1 or max(hu.shape) > MAX_EXTENT_VOXELS:
        raise InputContractError(
            f"hu shape {hu.shape} is outside 1..{MAX_EXTENT_VOXELS} voxels per axis; "
            "crop the volume to the head"
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or any(
        not math.isfinite(s) or abs(s - e) > SPACING_TOLERANCE_MM
        for s, e in zip(spacing, spec.input.spacing_mm or (), strict=False)
    ):
        raise InputContractError(
            f"{spec.name} needs {spec.input.spacing_mm} mm voxels (z, y, x), got {spacing}; "
            "resample the series to 1 mm isotropic first"
        )
    if not np.isfinite(hu).all():
        raise InputContractError("hu contains NaN or infinite values")
    lo, hi = float(hu.min()), float(hu.max())
    if lo < -10000.0 or hi > 40000.0:
        raise InputContractError(
            f"hu values span [{lo:.0f}, {hi:.0f}], outside any plausible Hounsfield range"
        )
    if hi - lo < 100.0 or (lo > -100.0 and hi < 300.0):
        raise InputContractError(
            f"hu values span [{lo:.3g}, {hi:.3g}], which does not look like Hounsfield units "
            "(no air below -100 HU and no bone above 300 HU); pass stored value x "
            "RescaleSlope + RescaleIntercept, not normalised or windowed intensities"
        )
    if head_mask is None:
        return None
    if not isinstance(head_mask, np.ndarray) or head_mask.shape != hu.shape:
        shape = getattr(head_mask, "shape", None)
        raise InputContractError(f"head_mask must be an array of shape {hu.shape}, got {shape}")
    if head_mask.dtype != np.bool_:
        if not np.issubdtype(head_mask.dtype, np.integer):
            raise InputContractError(f"head_mask must be bool, got dtype {head_mask.dtype}")
        head_mask = head_mask != 0
    if not head_mask.any():
        raise InputContractError("head_mask is empty: no head was found in the volume")
    return head_mask


def plan_tiles(
    shape: Sequence[int],
    head_mask: np.ndarray | None,
    budget_voxels: int,
    multiple: int = 5,
    context: int = 8,
    tile: Sequence[int] | None = None,
) -> tuple[tuple[int, int, int], list[tuple[int, int, int]], int]:
    """Choose the output tile size and the tiles to run.

    The volume is covered by non-overlapping output tiles whose sides are multiples of
    ``multiple``; tiles without any head-mask voxel are dropped. Among tile sizes whose
    full-resolution pathway input (side + 2 x ``context``) fits in ``budget_voxels``, the one
    with the lowest estimated cost (pathway voxels plus ``_HEAD_COST`` x output voxels, summed
    over the tiles that run) wins.

    Args:
        shape: volume shape (z, y, x), voxels.
        head_mask: bool (z, y, x) or None (every tile runs).
        budget_voxels: largest allowed full-resolution pathway input per tile, voxels.
        multiple: tile sides are multiples of this.
        context: full-resolution context per side (8 for BLAST-CT).
        tile: a fixed tile size (z, y, x) to use instead of searching.

    Returns:
        ``(tile, origins, n_total)``: tile size (z, y, x), the origins of the tiles to run,
        and the number of tiles covering the volume.
    """
    candidates: list[list[int]] = []
    for axis, length in enumerate(shape):
        if tile is not None:
            candidates.append([int(tile[axis])])
            continue
        # Splitting an axis into n near-equal tiles, n = 1..8.
        sizes = {multiple * math.ceil(length / n / multiple) for n in range(1, 9)}
        candidates.append(sorted(s for s in sizes if s > 0))
    # Head occupancy on a coarse grid of `multiple`-voxel cells.
    cells = [math.ceil(n / multiple) for n in shape]
    if head_mask is not None:
        padded = np.zeros([c * multiple for c in cells], dtype=bool)
        padded[: shape[0], : shape[1], : shape[2]] = head_mask
        occ = padded.reshape(cells[0], multiple, cells[1], multiple, cells[2], multiple).any(
            axis=(1, 3, 5)
        )
    else:
        occ = np.ones(cells, dtype=bool)
    best: tuple[float, tuple[int, int, int], list[tuple[int, int, int]], int] | None = None
    for tz, ty, tx in itertools.product(*candidates):
        too_big = (tz + 2 * context) * (ty + 2 * context) * (tx + 2 * context) > budget_voxels
        if too_big and tile is None:
            continue
        t_cells = (tz // multiple, ty // multiple, tx // multiple)
        counts = [math.ceil(c / t) for c, t in zip(cells, t_cells, strict=True)]
        grid = np.zeros([n * t for n, t in zip(counts, t_cells, strict=True)], dtype=bool)
        grid[: cells[0], : cells[1], : cells[2]] = occ
        hit = grid.reshape(counts[0], t_cells[0], counts[1], t_cells[1], counts[2], t_cells[2]).any(
            axis=(1, 3, 5)
        )
        n_run = int(hit.sum())
        per_tile = (tz + 2 * context) * (ty + 2 * context) * (tx + 2 * context) + (
            _HEAD_COST * tz * ty * tx
        )
        cost = n_run * per_tile
        if best is None or cost < best[0]:
            origins = [
                (int(i) * tz, int(j) * ty, int(k) * tx)
                for i, j, k in zip(*np.nonzero(hit), strict=True)
            ]
            best = (cost, (tz, ty, tx), origins, int(np.prod(counts)))
    if best is None:
        raise ValueError(f"no tile fits the budget of {budget_voxels} voxels")
    return best[1], best[2], best[3]


class HaemorrhageModel:
    """BLAST-CT haemorrhage segmentation (ensemble of DeepMedic networks).

    Members are loaded lazily (on the first :meth:`predict` or :meth:`load`), each from
    bytes whose sha256 the store verified.

    Args:
        store: where the weight files come from.
        spec: the model spec (weights, input contract, classes).
        members: ensemble size n (the first n of ``spec.member_order``) or explicit
            1-based member numbers; None -> :func:`default_members` for the device.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        tile: output tile size (z, y, x), multiples of 5; None plans it per volume within
            a memory budget (see :func:`plan_tiles`).
        precision: ``"auto"`` (:func:`default_precision`), ``"fp32"``, ``"bf16"`` or
            ``"fp16"``. Convolutions and activations run in this dtype; batch-norm
            statistics are folded in fp32; probabilities are accumulated in fp32.
        num_threads: if given, ``torch.set_num_threads`` for CPU inference (process-wide).
        tile_budget_voxels: override the per-tile memory budget used when ``tile`` is None.
    """

    def __init__(
        self,
        store: ModelStore | None,
        *,
        spec: ModelSpec = BLAST_CT_V1,
        members: int | Sequence[int] | None = None,
        device: str = "auto",
        tile: Sequence[int] | None = None,
        precision: Precision = "auto",
        num_threads: int | None = None,
        tile_budget_voxels: int | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.device = resolve_device(device)
        if members is None:
            members = default_members(self.device, spec)
        if isinstance(members, int):
            self.members: tuple[int, ...] = spec.first_members(members)
        else:
            self.members = tuple(int(m) for m in members)
            if not self.members:
                raise ValueError("members is empty")
            for m in self.members:
                spec.artifact(m)  # validates the number
        self.precision = default_precision(self.device) if precision == "auto" else precision
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
        if self.device.type == "cpu" and self.precision == "fp16":
            raise ValueError("fp16 is not supported on CPU; use fp32 or bf16")
        self.dtype = _DTYPES[self.precision]
        if tile is not None:
            tile = tuple(int(t) for t in tile)
            multiple = int(spec.params["tile_multiple"])
            if len(tile) != 3 or any(t <= 0 or t % multiple for t in tile):
                raise ValueError(f"tile must be 3 positive multiples of {multiple}, got {tile}")
        self.tile = tile
        self.num_threads = num_threads
        budget_key = (self.device.type, "fp32" if self.precision == "fp32" else "bf16")
        self.tile_budget_voxels = tile_budget_voxels or _TILE_BUDGET_VOXELS[budget_key]
        self._networks: dict[int, nn.Module] = {}
        self._sha256: dict[int, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_networks(
        cls,
        networks: Sequence[nn.Module],
        *,
        spec: ModelSpec = BLAST_CT_V1,
        device: str = "auto",
        tile: Sequence[int] | None = None,
        precision: Precision = "fp32",
        tile_budget_voxels: int | None = None,
    ) -> HaemorrhageModel:
        """Wrap already-built networks (e.g. fresh from training) instead of stored weights."""
        model = cls(
            None,
            spec=spec,
            members=range(1, len(networks) + 1),
            device=device,
            tile=tile,
            precision=precision,
            tile_budget_voxels=tile_budget_voxels,
        )
        for number, net in zip(model.members, networks, strict=True):
            model._networks[number] = model._prepare(net)
        return model

    @property
    def model_ref(self) -> ModelRef:
        """Name, version and member weights of the model, for findings and DICOM outputs."""
        return ModelRef(self.spec.name, self.spec.version, self.weights_sha256())

    def weights_sha256(self) -> tuple[str, ...]:
        """SHA-256 of each loaded member's weight file, in member order (empty for networks
        given directly, e.g. fresh from training)."""
        return tuple(self._sha256[m] for m in self.members if m in self._sha256)

    def load(self) -> float:
        """Load every member not loaded yet; return the seconds spent.

        Raises:
            ModelWeightsError: a weight file is missing, corrupt or not a BLAST-CT state dict.
        """
        start = time.perf_counter()
        with self._lock:
            for number in self.members:
                if number not in self._networks:
                    net, sha256 = self._load_member(number)
                    self._networks[number] = self._prepare(net)
                    self._sha256[number] = sha256
        return time.perf_counter() - start

    def _load_member(self, number: int) -> tuple[nn.Module, str]:
        if self.store is None:
            raise ModelWeightsError(f"no model store configured to load member {number}")
        artifact = self.spec.artifact(number)
        data, sha256 = self.store.read_verified(self.spec.name, artifact)
        label = f"{self.spec.name}/{artifact.filename}"
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            net = DeepMedic()
            net.load_state_dict(state, strict=True)
        except Exception as exc:  # any failure here means a bad weight file
            raise ModelWeightsError(
                f"model weights {label} passed the sha256 check but are not a loadable "
                f"{self.spec.name} state dict: {exc}"
            ) from exc
        logger.info("loaded %s member %d", self.spec.name, number)
        return net, sha256

    def _prepare(self, net: nn.Module) -> nn.Module:
        net = net.eval().to(self.device)
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                module.to(dtype=self.dtype)
                weight = module.weight.data
                module.weight.data = weight.contiguous(memory_format=torch.channels_last_3d)
        return net

    def predict(
        self,
        hu: np.ndarray,
        head_mask: np.ndarray | None = None,
        spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> HaemorrhageResult:
        """Segment haemorrhage in a head CT.

        Args:
            hu: float32 (z, y, x) volume in Hounsfield units, 1 mm isotropic, ideally
                cropped to the head (compute time grows with the volume).
            head_mask: bool (z, y, x) head mask of the same shape, or None. Tiles without
                head voxels are not computed, and voxels outside the mask are background.
            spacing_mm: voxel spacing (z, y, x) in mm; must be 1 mm.

        Returns:
            The segmentation, probabilities and lesion volumes.

        Raises:
            InputContractError: the input violates the contract.
            ModelWeightsError: weights are missing or corrupt.
        """
        t0 = time.perf_counter()
        mask = check_input(hu, head_mask, spacing_mm, self.spec)
        load_s = self.load()
        t1 = time.perf_counter()
        shape = hu.shape
        tile, origins, n_total = plan_tiles(
            shape,
            mask,
            self.tile_budget_voxels,
            int(self.spec.params["tile_multiple"]),
            tile=self.tile,
        )
        probs, stage_s = _run_in_compute_thread(self._run_tiles, hu, tile, origins)
        t3 = time.perf_counter()
        if mask is not None:
            outside = ~mask
            probs[:, outside] = 0.0
            probs[0, outside] = 1.0
        n_classes = len(self.spec.outputs)
        labels = probs.argmax(axis=0).astype(np.uint8)
        voxel_ml = float(np.prod(spacing_mm)) / 1000.0
        counts_per_class = np.bincount(labels.ravel(), minlength=n_classes)
        classes = self.spec.outputs
        lesions = lesion_classes(self.spec)
        volumes = {
            name: float(counts_per_class[classes.index(name)]) * voxel_ml for name in lesions
        }
        max_prob = {name: float(probs[classes.index(name)].max()) for name in lesions}
        probabilities = probs.astype(np.float16)
        t4 = time.perf_counter()
        timing = {
            "load": load_s,
            "preprocess": stage_s["preprocess"],
            "inference": t3 - t1 - stage_s["preprocess"],
            "postprocess": t4 - t3,
            "total": t4 - t0,
        }
        logger.info(
            "%s: %d/%d tiles of %s, %d member(s), %s %s, %.1f s",
            self.spec.name,
            len(origins),
            n_total,
            tile,
            len(self.members),
            self.device,
            self.precision,
            timing["total"],
        )
        return HaemorrhageResult(
            labels=labels,
            probabilities=probabilities,
            volumes_ml=volumes,
            max_probability=max_prob,
            spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
            members=self.members,
            device=str(self.device),
            precision=self.precision,
            timing_s=timing,
            tiles={"run": len(origins), "skipped": n_total - len(origins), "size": list(tile)},
            spec=self.spec,
        )

    def _run_tiles(
        self, hu: np.ndarray, tile: Sequence[int], origins: Sequence[tuple[int, int, int]]
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Normalise, then run every member on every tile (in the compute thread).

        Returns:
            Ensemble-mean probabilities, float32 (5, z, y, x) (background 1 where no tile
            ran), and ``{"preprocess": seconds}``.
        """
        start = time.perf_counter()
        if self.device.type == "cpu" and self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        volume = self._normalise(hu, tile)
        preprocess_s = time.perf_counter() - start
        shape = hu.shape
        ctx = int(self.spec.params["context_voxels"])
        probs = np.zeros((len(self.spec.outputs), *shape), dtype=np.float32)
        probs[0] = 1.0
        networks = [self._networks[m] for m in self.members]
        with torch.inference_mode():
            for origin in origins:
                window = tuple(slice(o, o + t + 2 * ctx) for o, t in zip(origin, tile, strict=True))
                x = volume[window][None, None]
                acc: torch.Tensor | None = None
                for net in networks:
                    p = F.softmax(net(x, origin=origin)[0].float(), dim=0)
                    acc = p if acc is None else acc.add_(p)
                assert acc is not None
                acc /= len(networks)
                region = tuple(
                    slice(o, min(o + t, n)) for o, t, n in zip(origin, tile, shape, strict=True)
                )
                sizes = [r.stop - r.start for r in region]
                probs[(slice(None), *region)] = (
                    acc[:, : sizes[0], : sizes[1], : sizes[2]].cpu().numpy()
                )
        return probs, {"preprocess": preprocess_s}

    def _normalise(self, hu: np.ndarray, tile: Sequence[int]) -> torch.Tensor:
        """Clip to the HU window, map onto [-1, 1] and pad by the context (value -1).

        Returns:
            Tensor (z + 80 + pz, y + 80 + py, x + 80 + px) in the compute dtype on the
            device, where p* pads each axis up to a whole number of tiles.
        """
        lo, hi = self.spec.input.value_range
        ctx = int(self.spec.params["context_voxels"])
        x = torch.from_numpy(hu).to(self.device)
        x = x.clamp(lo, hi).sub_(lo).mul_(2.0 / (hi - lo)).sub_(1.0)
        pad: list[int] = []
        for n, t in zip(reversed(hu.shape), reversed(tuple(tile)), strict=True):
            pad += [ctx, ctx + t * math.ceil(n / t) - n]
        return F.pad(x[None], pad, value=-1.0)[0].to(self.dtype)


def blood_score(result: HaemorrhageResult, threshold_ml: float) -> float:
    """Confidence that at least ``threshold_ml`` of blood is present, in [0, 1].

    Per voxel, the blood probability is P(IPH) + P(EAH) + P(IVH). The score is the largest
    q such that a volume of ``threshold_ml`` has blood probability >= q, i.e. the k-th
    highest blood probability with k = ceil(threshold_ml / voxel volume). It rises
    monotonically with both the size and the certainty of the most blood-like region,
    ignores a few isolated voxels, and is >= 0.5 when at least ``threshold_ml`` of tissue
    is more likely blood than not.
    """
    classes = result.spec.outputs
    blood = np.zeros(result.labels.shape, dtype=np.float32)
    for name in blood_classes(result.spec):
        blood += result.probabilities[classes.index(name)]
    flat = blood.ravel()
    k = max(1, math.ceil(threshold_ml / result.voxel_volume_ml - 1e-9))
    k = min(k, flat.size)
    kth = float(np.partition(flat, flat.size - k)[flat.size - k])
    return float(min(1.0, max(0.0, kth)))


def largest_lesion_ml(result: HaemorrhageResult) -> float:
    """Volume (ml) of the largest connected blood region (IPH, EAH and IVH voxels together,
    26-connected): one haematoma with its intraventricular extension counts once."""
    classes = result.spec.outputs
    blood = np.isin(result.labels, [classes.index(c) for c in blood_classes(result.spec)])
    if not blood.any():
        return 0.0
    components, n = ndimage.label(blood, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    return float(sizes.max()) * result.voxel_volume_ml


def severity_of(result: HaemorrhageResult, largest_ml: float) -> tuple[str, list[str]]:
    """``high`` when the total blood volume reaches ``params.severity.high_total_ml`` (30 ml)
    or there is intraventricular blood (IVH of at least ``intraventricular_ml``); else
    ``standard``. Returns the severity and the reasons for it."""
    rules = result.spec.params.get("severity", {})
    high_ml = float(rules.get("high_total_ml", 30.0))
    ivh_ml = float(rules.get("intraventricular_ml", 0.5))
    reasons: list[str] = []
    if result.blood_volume_ml >= high_ml:
        reasons.append(f"blood volume {result.blood_volume_ml:.1f} ml >= {high_ml:g} ml")
    if result.volumes_ml.get("IVH", 0.0) >= ivh_ml:
        reasons.append(f"intraventricular blood {result.volumes_ml['IVH']:.1f} ml")
    if largest_ml >= high_ml and not reasons:
        reasons.append(f"largest lesion {largest_ml:.1f} ml >= {high_ml:g} ml")
    return (Severity.high.value if reasons else Severity.standard.value), reasons


def to_finding(
    result: HaemorrhageResult, threshold_ml: float | None = None, model: ModelRef | None = None
) -> Finding:
    """Study-level intracranial haemorrhage finding from a segmentation.

    Args:
        result: the segmentation.
        threshold_ml: blood volume (IPH + EAH + IVH, ml) at or above which the finding is
            flagged; None uses the spec's threshold.
        model: the model reference to record (None: name and version of ``result.spec``).

    Returns:
        A Finding with ``flag = blood volume >= threshold_ml``, ``score`` from
        :func:`blood_score`, and, when flagged, a severity (:func:`severity_of`); details hold
        the total and largest-lesion volumes and whether blood extends into the ventricles.
    """
    spec_threshold = result.spec.finding(FINDING).threshold
    threshold = spec_threshold if threshold_ml is None else float(threshold_ml)
    if threshold <= 0:
        raise ValueError(f"threshold_ml must be positive, got {threshold}")
    blood_ml = result.blood_volume_ml
    flag = blood_ml >= threshold
    largest = largest_lesion_ml(result)
    severity, severity_reasons = severity_of(result, largest)
    ivh_ml = float(result.spec.params.get("severity", {}).get("intraventricular_ml", 0.5))
    return Finding(
        finding=FINDING,
        flag=flag,
        score=blood_score(result, threshold),
        volumes_ml={k: round(v, 3) for k, v in result.volumes_ml.items()},
        model=model or ModelRef(result.spec.name, result.spec.version),
        max_probability={k: round(v, 4) for k, v in result.max_probability.items()},
        severity=severity if flag else None,
        details={
            "blood_volume_ml": round(blood_ml, 3),
            "largest_lesion_ml": round(largest, 3),
            "intraventricular_extension": result.volumes_ml.get("IVH", 0.0) >= ivh_ml,
            "severity_reasons": severity_reasons if flag else [],
            "threshold_ml": threshold,
            "score_definition": "k-th highest P(IPH)+P(EAH)+P(IVH), k = threshold_ml voxels",
            "members": list(result.members),
            "device": result.device,
            "precision": result.precision,
            "timing_s": {k: round(v, 3) for k, v in result.timing_s.items()},
            "tiles": dict(result.tiles),
        },
    )


class HaemorrhageFindingModel(FindingModel[HeadCT, HaemorrhageResult]):
    """BLAST-CT as a registry model: a head-CT series in, the haemorrhage finding with its
    severity and the label overlay out.

    Args:
        engine: the segmentation ensemble.
        threshold_ml: the site's flag threshold (None: the spec's).
    """

    def __init__(self, engine: HaemorrhageModel, threshold_ml: float | None = None) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.threshold_ml = threshold_ml

    def load(self) -> float:
        return self.engine.load()

    def weights_sha256(self) -> tuple[str, ...]:
        return self.engine.weights_sha256()

    def prepare(self, paths: Sequence[Path]) -> HeadCT:
        return prepare_head_ct(paths)

    def predict(self, prepared: HeadCT) -> HaemorrhageResult:
        return self.engine.predict(prepared.hu, prepared.head_mask, prepared.spacing_mm)

    def interpret(self, prepared: HeadCT, raw: HaemorrhageResult, series_uid: str) -> ModelOutput:
        finding = to_finding(raw, threshold_ml=self.threshold_ml)
        overlay = Overlay(
            kind="labels",
            data=raw.labels.astype(np.uint8),
            background=np.clip(prepared.hu, -1024, 3071).astype(np.int16),
            classes=lesion_classes(self.spec),
            origin=prepared.crop_start,
            SeriesInstanceUID=series_uid,
            grid_origin=prepared.hu_origin,
            grid_spacing=tuple(float(v) for v in prepared.resampled.GetSpacing()),
            grid_direction=tuple(float(v) for v in prepared.resampled.GetDirection()),
        )
        return ModelOutput(findings=[finding], overlays={finding.finding: overlay})

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.engine.device),
            "precision": self.engine.precision,
            "members": list(self.engine.members),
        }


def build(spec: ModelSpec, options: RuntimeOptions) -> HaemorrhageFindingModel:
    """The registry's factory for ``kind = "blast-ct"``."""
    engine = HaemorrhageModel(
        options.store,
        spec=spec,
        members=options.members,  # None: 1 on CPU, every member on CUDA
        device=options.device,
        precision=options.precision,
    )
    return HaemorrhageFindingModel(engine, threshold_ml=options.thresholds.get(FINDING))
