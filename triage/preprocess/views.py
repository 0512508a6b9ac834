"""The view of a radiograph (PA, AP, lateral...), told from its header.

Used by the router (a chest model reads frontal views only) and by the X-ray layer, so the
two never disagree about what a file shows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from pydicom.dataset import Dataset

__all__ = ["view_position"]

# ViewPosition defined terms for CR/DX (PS3.3 C.8.11.5), kept as they are.
_VIEW_TERMS: Final[frozenset[str]] = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"})
# Words recognised inside a free-text ViewPosition or SeriesDescription.
_VIEW_WORDS: Final[Mapping[str, str]] = {
    "PA": "PA",
    "AP": "AP",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
}
# Phrases of a ViewCodeSequence CodeMeaning (CID 4010 and similar), most specific first.
_VIEW_MEANINGS: Final[tuple[tuple[str, str], ...]] = (
    ("left lateral decubitus", "LLD"),
    ("right lateral decubitus", "RLD"),
    ("postero-anterior", "PA"),
    ("posteroanterior", "PA"),
    ("antero-posterior", "AP"),
    ("anteroposterior", "AP"),
    ("latero-medial", "LATERAL"),
    ("left lateral", "LL"),
    ("right lateral", "RL"),
    ("lateral", "LATERAL"),
)


def _view_from_text(text: str, words: Mapping[str, str], terms: frozenset[str]) -> str | None:
    value = text.strip().upper()
    if value in terms:
        return value
    found = {words[t] for t in re.findall(r"[A-Z]+", value) if t in words}
    return found.pop() if len(found) == 1 else None


def view_position(ds: Dataset) -> str | None:
    """Normalised view: ViewPosition, else ViewCodeSequence, else SeriesDescription words."""
    view = _view_from_text(str(ds.get("ViewPosition") or ""), _VIEW_WORDS, _VIEW_TERMS)
    if view is not None:
        return view
    for item in ds.get("ViewCodeSequence") or []:
        meaning = str(item.get("CodeMeaning") or "").lower()
        for phrase, code in _VIEW_MEANINGS:
            if phrase in meaning:
                return code
    return _view_from_text(str(ds.get("SeriesDescription") or ""), _VIEW_WORDS, frozenset())
