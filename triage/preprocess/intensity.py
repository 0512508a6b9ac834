"""HU → model input: head-CT display windows and the clip-and-scale transform, as MONAI array
and dictionary transforms."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils.enums import TransformBackends

__all__ = ["IMAGE_KEY", "ClipAndScaleHU", "ClipAndScaleHUd", "WindowPreset"]

IMAGE_KEY: Final[str] = "image"
"""Default dictionary key of the CT image for the dictionary transforms."""


class WindowPreset(enum.Enum):
    """Head-CT display windows as (level, width) in HU.

    * ``brain`` L 40 / W 80: the standard brain window.
    * ``subdural`` L 75 / W 215: the middle of the common subdural ranges L 50–100 /
      W 130–300 (Radiopaedia, "Windowing (CT)").
    * ``stroke`` L 40 / W 40: the "stroke window" of Turner and Holdsworth, Br J Radiol
      2011;84:1061–1066, also listed by Radiopaedia. The narrower L 32 / W 8 (Radiology
      1999;213:150–155) was a starting point for manual adjustment, too narrow for a fixed
      model input.
    * ``bone`` L 600 / W 2800: the temporal-bone (skull) window listed by Radiopaedia; the
      general bone window L 500 / W 2000 clips dense skull cortex above 1500 HU.
    """

    brain = (40.0, 80.0)
    subdural = (75.0, 215.0)
    stroke = (40.0, 40.0)
    bone = (600.0, 2800.0)

    @property
    def level(self) -> float:
        """Window centre in HU."""
        return self.value[0]

    @property
    def width(self) -> float:
        """Window width in HU."""
        return self.value[1]

    @property
    def hu_range(self) -> tuple[float, float]:
        """(lowest, highest) HU of the window."""
        return (self.level - self.width / 2, self.level + self.width / 2)


class ClipAndScaleHU(Transform):
    """Clips HU to [lo, hi] and maps that range linearly onto [-1, 1].

    Input: numpy array or torch tensor (MetaTensor kept) of any shape, in HU.
    Output: the same type and shape, float32, values in [-1, 1].
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, lo: float, hi: float) -> None:
        """Sets the HU range.

        Args:
            lo: HU mapped to -1 (lower values are clipped).
            hi: HU mapped to +1 (higher values are clipped).

        Raises:
            ValueError: ``lo`` is not below ``hi``.
        """
        if not lo < hi:
            raise ValueError(f"lo must be below hi, got lo={lo}, hi={hi}")
        self.lo = float(lo)
        self.hi = float(hi)

    @classmethod
    def from_window(cls, preset: WindowPreset) -> ClipAndScaleHU:
        """The transform for a display window preset."""
        lo, hi = preset.hu_range
        return cls(lo, hi)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Applies the transform; see the class docstring."""
        width = self.hi - self.lo
        if isinstance(img, torch.Tensor):
            out = img.to(torch.float32).clamp(self.lo, self.hi)
            return (out - self.lo) / width * 2.0 - 1.0
        arr = np.clip(np.asarray(img, dtype=np.float32), self.lo, self.hi)
        arr -= np.float32(self.lo)
        arr /= np.float32(width)
        arr *= np.float32(2.0)
        arr -= np.float32(1.0)
        return arr


class ClipAndScaleHUd(MapTransform):
    """Dictionary wrapper of ``ClipAndScaleHU`` for the given keys."""

    backend = ClipAndScaleHU.backend

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        *,
        lo: float,
        hi: float,
        allow_missing_keys: bool = False,
    ) -> None:
        """Sets the keys and the HU range.

        Args:
            keys: Keys of the HU images to transform.
            lo: HU mapped to -1.
            hi: HU mapped to +1.
            allow_missing_keys: Do not fail when a key is absent.
        """
        super().__init__(keys, allow_missing_keys)
        self.transform = ClipAndScaleHU(lo, hi)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        """Returns a shallow copy of ``data`` with the keyed HU images transformed."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
