"""The files of a study's series: as the store indexed them, or grouped from a folder."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

__all__ = ["SeriesFiles", "group_files", "read_header"]


@dataclass
class SeriesFiles:
    """The files of one series, as stored."""

    SeriesInstanceUID: str
    paths: list[Path]


def read_header(path: Path) -> dict[str, str]:
    """The attributes that group a file into its study and series (pixels not read)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {k: str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID")}


def group_files(paths: Iterable[Path]) -> dict[str, list[SeriesFiles]]:
    """Group DICOM files (folders expanded recursively) by study and series.

    Files that are not DICOM are skipped; returns {StudyInstanceUID: [SeriesFiles, ...]}.
    """
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            files.append(p)
    series: dict[tuple[str, str], SeriesFiles] = {}
    for f in files:
        try:
            header = read_header(f)
        except (InvalidDicomError, OSError, ValueError, KeyError):
            log.info("skipping a file that is not DICOM")
            continue
        key = (header["StudyInstanceUID"], header["SeriesInstanceUID"])
        if key not in series:
            series[key] = SeriesFiles(header["SeriesInstanceUID"], [])
        series[key].paths.append(f)
    studies: dict[str, list[SeriesFiles]] = defaultdict(list)
    for (study_uid, _), se in series.items():
        studies[study_uid].append(se)
    return dict(studies)
