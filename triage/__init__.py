"""triage: DICOM in, AI findings out, a reading worklist that puts critical studies first."""

from __future__ import annotations

__version__ = "0.1.0"
