"""The head in a CT volume: a body mask detached from the table, and the crop to it.

Both work on numpy arrays (z, y, x) in HU at about 1 mm isotropic spacing (``resample_isotropic``
gives that); morphology radii are in voxels.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from triage.preprocess.errors import PreprocessError
from triage.preprocess.hu import HEAD_THRESHOLD_HU

__all__ = ["crop_to_head", "head_mask"]


def _largest_component(mask: sitk.Image) -> sitk.Image:
    """The largest 6-connected component of a binary image (all 0 when the image is empty)."""
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return labels == 1


def head_mask(hu: np.ndarray, threshold_hu: float = HEAD_THRESHOLD_HU) -> np.ndarray:
    """Finds the head: the largest body-density 3D component, detached from the table.

    Steps: threshold (drops air and the head rest's foam); a morphological opening at half
    resolution (erosion by 2 voxels = 4 mm at 1 mm spacing, largest component, dilation by 3)
    cuts thin structures touching the head, such as the head holder; the largest component of
    the thresholded voxels inside the opened core; holes (air in sinuses, airways, ear canals)
    filled in each axial slice. Small objects, where the opening would leave nothing, fall back
    to the largest thresholded component.

    Args:
        hu: float array (z, y, x) in HU, about 1 mm isotropic (morphology radii are in voxels).
        threshold_hu: Voxels above this count as body.

    Returns:
        bool array (z, y, x), True inside the head; all False when nothing exceeds the
        threshold.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D array (z, y, x), got shape {hu.shape}")
    body = sitk.GetImageFromArray((hu > threshold_hu).view(np.uint8))
    small = sitk.Shrink(body, [2, 2, 2])
    core = _largest_component(sitk.BinaryErode(small, [2, 2, 2], sitk.sitkBall))
    if sitk.GetArrayViewFromImage(core).any():
        near = sitk.BinaryDilate(core, [3, 3, 3], sitk.sitkBall)
        near = sitk.Resample(near, body, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        body = body & near
    head = _largest_component(body)
    mask = sitk.GetArrayFromImage(head).astype(bool)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask[z].view(np.uint8)))
        mask[z] = sitk.GetArrayViewFromImage(filled) != 0
    return mask


def crop_to_head(
    hu: np.ndarray, mask: np.ndarray, margin_vox: int = 2
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Crops an array and its head mask to the mask's bounding box plus a margin.

    Args:
        hu: float array (z, y, x) in HU.
        mask: bool array, same shape, True inside the head.
        margin_vox: Voxels kept around the bounding box on each side (clipped at the edges).

    Returns:
        (cropped_hu, cropped_mask, start): copies of the cropped arrays and the (z, y, x)
        index of ``cropped_hu[0, 0, 0]`` in ``hu``.

    Raises:
        PreprocessError: The mask is empty (no head found).
        ValueError: The shapes differ or ``margin_vox`` is negative.
    """
    if hu.shape != mask.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} must be the same 3D shape")
    if margin_vox < 0:
        raise ValueError(f"margin_vox must be >= 0, got {margin_vox}")
    if not mask.any():
        raise PreprocessError("no head found: no body-density voxels in the image")
    start: list[int] = []
    stop: list[int] = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(max(int(present[0]) - margin_vox, 0))
        stop.append(min(int(present[-1]) + 1 + margin_vox, mask.shape[axis]))
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    return hu[box].copy(), mask[box].copy(), (start[0], start[1], start[2])
