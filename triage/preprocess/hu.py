"""Hounsfield-unit values shared by CT decoding, resampling and head masking."""

from __future__ import annotations

from typing import Final

__all__ = ["HEAD_THRESHOLD_HU", "HU_AIR"]

HU_AIR: Final[float] = -1024.0
"""HU used for air, for pixel padding and for voxels outside the scanned volume."""

HEAD_THRESHOLD_HU: Final[float] = -300.0
"""Voxels above this HU count as body (skin, fat, soft tissue, bone) in ``head_mask``."""
