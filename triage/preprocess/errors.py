"""The errors of preprocessing and of model input contracts (one type each).

Messages say what is wrong (attribute, count, geometry, range) and never hold patient data.
"""

from __future__ import annotations

__all__ = ["GantryTiltError", "IncompleteSeriesError", "InputContractError", "PreprocessError"]


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
