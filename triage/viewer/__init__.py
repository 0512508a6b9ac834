"""The image viewer's backend: a study's analysed series laid out for display, one slice's
pixel values and a finding's overlay on it, read from the stored files and the analysis's
overlay files through one bounded cache.

Modules: ``series`` (index rows, display order, windows), ``pixels`` (one slice decoded),
``overlays`` (labels and heatmaps laid on the source slices), ``manifest`` (the document),
``cache`` (the byte-bounded LRU), ``service`` (``Viewer``, what the HTTP routes call).
"""

from __future__ import annotations

from triage.viewer.service import (
    DEFAULT_CACHE_BYTES,
    NotFound,
    SliceBody,
    Unavailable,
    Viewer,
    ViewerError,
)

__all__ = ["DEFAULT_CACHE_BYTES", "NotFound", "SliceBody", "Unavailable", "Viewer", "ViewerError"]
