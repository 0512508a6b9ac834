"""Train, validation and test splits by patient, and the frozen test set.

A patient's studies always share one split (never split by image or study: the same patient in
training and test would leak). Splits given in ``labels.csv`` are kept; the other patients are
placed by a seeded hash of their PatientID within each stratum (the patient's label), so the
assignment is deterministic, independent of the order of the records, and roughly stratified.
:func:`freeze_splits` writes an assignment into ``labels.csv`` so that the test set stays the
same when the dataset grows; :func:`fingerprint` names a set of studies and their labels, so an
evaluation can state which frozen set it compared on.

Messages name ``labels.csv`` lines and counts, never patient data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from training.data.dataset import (
    Dataset,
    DatasetError,
    LabelRow,
    StudyRecord,
    read_labels,
    write_labels,
)
from training.format import LABELS_FILE, SPLITS

__all__ = [
    "DEFAULT_FRACTIONS",
    "assign_splits",
    "fingerprint",
    "freeze_splits",
    "frozen_test_set",
]

#: (train, val, test) shares of the patients.
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions must give {len(SPLITS)} shares ({', '.join(SPLITS)})")
    if any(not math.isfinite(f) or f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError("fractions must be finite, >= 0 and not all 0")
    total = float(sum(fractions))
    return tuple(f / total for f in fractions)


def _quotas(n: int, fractions: Sequence[float]) -> list[int]:
    """``n`` items shared by ``fractions`` (largest remainder; ties go to the earlier split)."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _rank(seed: int, patient_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{patient_id}".encode()).digest()


def assign_splits(
    records: Iterable[StudyRecord],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    stratify_by: str | None = None,
) -> dict[str, str]:
    """A split for every study, grouping by patient.

    Patients with a split in ``labels.csv`` keep it (all their studies go there). The others
    are grouped into strata by their label (the largest over their studies) for
    ``stratify_by``, or, when None, by whether any of their labels is positive; in each
    stratum they are ordered by a hash of (seed, PatientID) and shared out by ``fractions``.

    Args:
        records: the studies.
        fractions: (train, val, test) shares of the patients without a given split
            (normalised to sum to 1).
        seed: changes the hash order, hence which patients go where.
        stratify_by: a finding code, or None (any positive label).

    Returns:
        StudyInstanceUID -> ``train``, ``val`` or ``test``.

    Raises:
        DatasetError: the given splits of one patient's studies differ.
        ValueError: ``fractions`` is invalid.
    """
    shares = _check_fractions(fractions)
    patients: dict[str, list[StudyRecord]] = {}
    for record in records:
        patients.setdefault(record.patient_id, []).append(record)
    result: dict[str, str] = {}
    strata: dict[int, list[str]] = {}
    for patient_id, studies in patients.items():
        given = {r.split for r in studies if r.split}
        if len(given) > 1:
            lines = sorted(line for r in studies for line in r.lines)
            raise DatasetError(
                f"{LABELS_FILE}: lines {', '.join(map(str, lines))}, column 'split': one "
                "patient's studies are given different splits"
            )
        if given:
            split = given.pop()
            for r in studies:
                result[r.study_uid] = split
            continue
        if stratify_by is None:
            values = [v for r in studies for v in r.labels.values()]
        else:
            values = [r.labels[stratify_by] for r in studies if stratify_by in r.labels]
        strata.setdefault(max(values, default=-1), []).append(patient_id)
    for stratum in sorted(strata):
        members = sorted(strata[stratum], key=lambda p: _rank(seed, p))
        start = 0
        for split, count in zip(SPLITS, _quotas(len(members), shares), strict=True):
            for patient_id in members[start : start + count]:
                for r in patients[patient_id]:
                    result[r.study_uid] = split
            start += count
    return result


def fingerprint(records: Iterable[StudyRecord]) -> str:
    """A stable name of a set of studies with their labels: sha256 (hex) over the sorted
    lines ``StudyInstanceUID<TAB>finding=label,...`` (findings sorted); independent of the
    records' order."""
    lines = sorted(
        f"{r.study_uid}\t" + ",".join(f"{k}={v}" for k, v in sorted(r.labels.items()))
        for r in records
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def frozen_test_set(
    dataset: Dataset | Sequence[StudyRecord],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    stratify_by: str | None = None,
) -> list[StudyRecord]:
    """The test split (given in ``labels.csv``, else assigned by :func:`assign_splits` with
    the same arguments), sorted by StudyInstanceUID; name it with :func:`fingerprint`.

    To keep it frozen while the dataset grows, write the assignment into ``labels.csv`` once
    with :func:`freeze_splits`.
    """
    records = dataset.studies if isinstance(dataset, Dataset) else list(dataset)
    splits = assign_splits(records, fractions=fractions, seed=seed, stratify_by=stratify_by)
    test = [r for r in records if splits[r.study_uid] == "test"]
    return sorted(test, key=lambda r: r.study_uid)


def freeze_splits(root: Path, assignment: Mapping[str, str]) -> int:
    """Write splits into the blank ``split`` cells of a dataset's ``labels.csv``.

    Args:
        root: the dataset folder.
        assignment: StudyInstanceUID -> split (e.g. from :func:`assign_splits`); studies
            not in it, and rows that already have a split, are left as they are.

    Returns:
        The number of rows changed.

    Raises:
        DatasetError: ``labels.csv`` is invalid.
        ValueError: the assignment holds a value that is not a split.
    """
    bad = {v for v in assignment.values() if v not in SPLITS}
    if bad:
        raise ValueError(f"splits must be one of {', '.join(SPLITS)}")
    rows = [row for _, row in read_labels(Path(root))]
    changed = 0
    out: list[LabelRow] = []
    for row in rows:
        split = assignment.get(row.StudyInstanceUID)
        if not row.split and split:
            row = dataclasses.replace(row, split=split)
            changed += 1
        out.append(row)
    write_labels(Path(root), out)
    return changed
