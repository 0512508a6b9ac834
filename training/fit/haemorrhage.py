"""Fine-tuning the BLAST-CT haemorrhage network (DeepMedic) from masks.

Starts from a published ensemble member (the spec's preferred one unless told otherwise),
trains on patches of the serving preprocessing's output (``prepare_head_ct``: 1 mm
isotropic HU cropped to the head; the mask resampled onto that grid), normalised exactly as
serving does (the spec's HU window onto [-1, 1], padded with -1 by the network's context),
and saves a state dict the serving loader reads with ``strict=True``.

Patches: an output cube of :data:`PATCH_OUT` voxels and its input cube (plus the
40-voxel context on every side). Output starts are multiples of 15, so the coarse
pathways' grids (sub-sampling 5 and 3) have the phase they have at origin 0, the phase
tiled inference uses. Half the patches are centred on a labelled voxel where the volume has
one. A left-right flip is the augmentation (the head is near-symmetric; the flip keeps the
coarse grids' phase). Batch-norm statistics stay as published and dropout is off
(:meth:`DeepMedic.freeze_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from training.fit.engine import item_rng
from triage.models.deepmedic import CONTEXT_VOXELS, DeepMedic
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

__all__ = [
    "PATCH_OUT",
    "HaemorrhagePatches",
    "Volume",
    "load_member",
    "patch_loss",
    "prepare_patch_batch",
]

#: Output patch side in voxels (a multiple of 15: the coarse grids keep their phase).
PATCH_OUT = 15
IMAGE = "image"
LABEL = "label"


@dataclass(frozen=True)
class Volume:
    """One preprocessed training volume.

    Attributes:
        hu: float32 (z, y, x) HU, 1 mm isotropic, cropped to the head.
        label: uint8 (z, y, x) class indices (0 background, 1 IPH, 2 EAH, 3 oedema, 4 IVH),
            all zero for a study without haemorrhage.
    """

    hu: np.ndarray
    label: np.ndarray


class HaemorrhagePatches:
    """Training patches; item ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.

    Args:
        volumes: the training volumes.
        samples: items per epoch.
        seed: the run's seed.
        value_range: the spec's HU window, mapped onto [-1, 1].
        foreground: share of patches centred on a labelled voxel.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        *,
        samples: int,
        seed: int,
        value_range: tuple[float, float],
        foreground: float = 0.5,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        self.samples = samples
        self.seed = seed
        self.epoch = 0
        self.foreground = foreground
        lo, hi = value_range
        self._inputs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._foreground: list[np.ndarray] = []
        for v in volumes:
            if v.hu.shape != v.label.shape:
                raise ValueError(f"image {v.hu.shape} and label {v.label.shape} differ in shape")
            # Pad the far end up to whole output patches, then the context on both sides.
            extra = [(-n) % PATCH_OUT for n in v.hu.shape]
            scaled = (np.clip(v.hu, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
            pad = [(CONTEXT_VOXELS, CONTEXT_VOXELS + e) for e in extra]
            self._inputs.append(np.pad(scaled.astype(np.float32), pad, constant_values=-1.0))
            self._labels.append(np.pad(v.label, [(0, e) for e in extra]))
            self._foreground.append(np.argwhere(v.label > 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = item_rng(self.seed, self.epoch, index)
        which = int(rng.integers(len(self._inputs)))
        label = self._labels[which]
        fg = self._foreground[which]
        if len(fg) and rng.random() < self.foreground:
            centre = fg[int(rng.integers(len(fg)))]
            start = [int(c) // PATCH_OUT * PATCH_OUT for c in centre]
        else:
            start = [int(rng.integers(n // PATCH_OUT)) * PATCH_OUT for n in label.shape]
        side = PATCH_OUT + 2 * CONTEXT_VOXELS
        x = self._inputs[which][tuple(slice(s, s + side) for s in start)]
        y = label[tuple(slice(s, s + PATCH_OUT) for s in start)]
        if rng.random() < 0.5:  # left-right flip (x is the last axis)
            x, y = x[..., ::-1], y[..., ::-1]
        return {
            IMAGE: torch.from_numpy(np.ascontiguousarray(x))[None],
            LABEL: torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))[None],
        }


def prepare_patch_batch(
    batchdata: dict[str, torch.Tensor], device: torch.device, non_blocking: bool = False, **_: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI ``prepare_batch``: (inputs (N, 1, 95, 95, 95), labels (N, 1, 15, 15, 15))."""
    return (
        batchdata[IMAGE].to(device, non_blocking=non_blocking),
        batchdata[LABEL].to(device, non_blocking=non_blocking),
    )


def patch_loss(num_classes: int) -> nn.Module:
    """Dice + cross-entropy per sample, averaged over samples (MONAI ``DiceCELoss`` with
    ``batch=False``): a mean over samples, so data-parallel gradients equal one process's."""
    from monai.losses import DiceCELoss

    del num_classes  # the one-hot width follows the logits
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=False)


def load_member(
    spec: ModelSpec, store: ModelStore | None, member: int | None, *, seed: int
) -> tuple[DeepMedic, str]:
    """A network to fine-tune: the published member ``member`` (None: the spec's preferred
    one) read from ``store`` and verified, or, with no store, one freshly initialised from
    ``seed`` (training from scratch; for tests and for demonstrating a refused promotion).

    Returns:
        The network (train mode, statistics frozen, dropout off) and where it came from.
    """
    import io

    torch.manual_seed(seed)
    net = DeepMedic()
    origin = "random initialisation"
    if store is not None:
        number = member if member is not None else spec.first_members(1)[0]
        artifact = spec.artifact(number)
        data, sha256 = store.read_verified(spec.name, artifact)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        origin = f"{spec.name} member {number} ({artifact.filename}, sha256 {sha256[:12]})"
    net.freeze_statistics()
    net.train()
    return net, origin
