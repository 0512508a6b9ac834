"""DICOM results of the AI: a model's label overlay laid back onto the source images
(:mod:`~triage.dicomout.geometry`), a DICOM Segmentation of it (:mod:`~triage.dicomout.seg`)
and a Comprehensive 3D SR measurement report, TID 1500 (:mod:`~triage.dicomout.sr`), built
with highdicom; :mod:`~triage.dicomout.terminology` holds the codes they use.

Every object is marked as AI output not for diagnostic use and carries the algorithm's name,
family ("Artificial Intelligence") and version.
"""

from __future__ import annotations
