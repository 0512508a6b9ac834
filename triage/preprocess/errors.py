"""The errors of preprocessing and of model input contracts (one type each).

Messages say what is wrong (attribute, count, geometry, range) and never hold patient data.
"""

from __future__ import annotations

__all__ = [
    "CorruptSliceError",
    "GantryTiltError",
    "IncompleteSeriesError",
    "InputContractError",
    "PreprocessError",
]


class PreprocessError(ValueError):
    """A series cannot be turned into a model input.

    The message says what is wrong (attribute, count, geometry) and never holds patient data.
    """


class IncompleteSeriesError(PreprocessError):
    """The series covers too little to be read: too few slices, gaps too large (missing
    slices) or too little coverage along the slice normal.

    The study gets the ``incomplete_series`` status (more images may still arrive). The message
    gives counts and millimetres only.
    """


class CorruptSliceError(PreprocessError):
    """Slices of the series hold pixel data that is cut short or cannot be decoded: a
    compressed stream without its end marker, frames missing from the encapsulated pixel data,
    a decoder error, or a decoded frame of the wrong size.

    The study gets the ``failed`` status with this reason: the files are damaged, so waiting
    for more images does not help (unlike ``IncompleteSeriesError``), and no model reads the
    series. The message gives counts, slice indices and transfer syntaxes only.
    """


class GantryTiltError(PreprocessError):
    """The slices are stacked at a gantry tilt above the allowed limit.

    Attributes:
        tilt_deg: The tilt: angle between the slice-stacking line and the slice normal.
        max_tilt_deg: The limit it exceeds.
    """

    def __init__(self, tilt_deg: float, max_tilt_deg: float) -> None:
        """Records the angle and the limit (both in degrees)."""
        super().__init__(tilt_deg, max_tilt_deg)
        self.tilt_deg = tilt_deg
        self.max_tilt_deg = max_tilt_deg

    def __str__(self) -> str:
        """Names the angle and the limit."""
        return (
            f"gantry tilt of {self.tilt_deg:.1f} degrees is above the limit of "
            f"{self.max_tilt_deg:g} degrees"
        )


class InputContractError(PreprocessError):
    """An array about to enter a model breaks the model's input contract (shape, dtype,
    spacing, intensity range); the message names the violated condition and how to fix it.

    The one contract error of every model: raised by the preprocessing layers' checks and by
    the models' own checks alike.
    """
