"""Training samples through the serving preprocessing, cached once, augmented reproducibly.

Head CT (haemorrhage segmentation): the series the router picks (:func:`choose_series`) goes
through ``triage.preprocess.ct.prepare_head_ct``, exactly as the haemorrhage model prepares
it; the study's mask is resampled (nearest neighbour) onto the prepared grid and cropped
with it. Chest radiographs: the series goes through the chest model's own ``prepare``
(``load_radiograph`` + ``xrv_input``), so the network input is the one serving builds.

The slow, deterministic part runs once per study: MONAI's ``PersistentDataset`` (a cache
folder that survives the process; its files are named by a hash of the item, which holds the
files, the labels and :data:`PREPROCESS_VERSION`) or, without a folder, ``CacheDataset`` in
memory. Augmentation runs after the cache in :class:`AugmentedDataset`, which seeds the
transform of item ``i`` in epoch ``e`` with :func:`seed_for` ``(seed, e, i)``: a sample depends
only on those three numbers, so one process and several DDP processes see the same samples.

Sample dictionaries (keys are the constants below):

* head CT: :data:`IMAGE` float32 (1, z, y, x) HU at 1 mm isotropic, cropped to the head (axes
  LPS: x to the patient's left, y posterior, z superior); :data:`LABEL` uint8 (1, z, y, x),
  the model's output indices (0 background, 1 IPH, 2 EAH, 3 oedema, 4 IVH), all 0 where no
  mask was given; :data:`HEAD` uint8 (1, z, y, x), 1 inside the head; :data:`HAS_MASK` bool,
  False for a positive study without a mask (skip it for segmentation losses);
  :data:`TARGET` float, the study's label (NaN when unlabelled); :data:`STUDY`,
  :data:`SUBTYPE` (``""`` when unknown), :data:`VOLUME` (ml, NaN when unknown).
* chest: :data:`IMAGE` float32 (1, 224, 224) in [-1024, 1024] (TorchXRayVision's range);
  :data:`LABEL` float32 (n_outputs,) 0/1 per model output; :data:`LABEL_MASK` float32
  (n_outputs,), 1 only on the outputs the study is labelled for; :data:`STUDY`.

The model's intensity window (e.g. ``ClipAndScaleHUd`` for the haemorrhage model) is the
trainer's to apply, as the model applies it in serving.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import (
    CastToTyped,
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    Transform,
)
from torch.utils.data import Dataset as TorchDataset

import triage
from training.data.dataset import (
    DatasetError,
    NoSeriesError,
    StudyRecord,
    choose_series,
)
from training.format import HAEMORRHAGE
from triage.models.spec import ModelSpec
from triage.preprocess.ct import HeadCT, prepare_head_ct
from triage.preprocess.errors import PreprocessError
from triage.preprocess.intensity import IMAGE_KEY

__all__ = [
    "HAS_MASK",
    "HEAD",
    "IMAGE",
    "LABEL",
    "LABEL_MASK",
    "PREPROCESS_VERSION",
    "STUDY",
    "SUBTYPE",
    "TARGET",
    "VOLUME",
    "AugmentedDataset",
    "LoadHeadCTd",
    "LoadRadiographd",
    "chest_augmentation",
    "chest_dataset",
    "chest_items",
    "haemorrhage_augmentation",
    "haemorrhage_dataset",
    "haemorrhage_items",
    "mask_on_head_grid",
    "read_mask",
    "seed_for",
    "warm_cache",
]

log = logging.getLogger(__name__)

IMAGE: Final[str] = IMAGE_KEY
"""The model input (the same key as ``triage.preprocess.intensity``'s transforms use)."""
LABEL: Final = "label"
"""Head CT: the voxel label map; chest: the label per model output."""
HEAD: Final = "head_mask"
HAS_MASK: Final = "has_mask"
TARGET: Final = "target"
LABEL_MASK: Final = "label_mask"
STUDY: Final = "study_uid"
SUBTYPE: Final = "subtype"
VOLUME: Final = "volume_ml"
PATHS: Final = "paths"
MASK_PATH: Final = "mask_path"
MASK_STAMP: Final = "mask_stamp"
VERSION_KEY: Final = "preprocess"

PREPROCESS_VERSION: Final = f"samples/1 triage {triage.__version__}"
"""Part of every cached item: a new version of the preprocessing fills a new cache."""

PrepareHeadCT = Callable[[Sequence[Path]], HeadCT]


# --------------------------------------------------------------------------------------------
# Reproducible augmentation


def seed_for(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s augmentation in ``epoch``: a 32-bit integer that depends
    only on (seed, epoch, index) (numpy's ``SeedSequence``, the same on every platform).

    Raises:
        ValueError: an argument is negative.
    """
    if min(seed, epoch, index) < 0:
        raise ValueError("seed, epoch and index must be >= 0")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint32)
    return int(state[0])


class AugmentedDataset(TorchDataset):  # type: ignore[type-arg]
    """Applies a random transform after a (cached) dataset, reproducibly.

    Before item ``i`` is transformed, a copy of ``transform`` is seeded with
    ``seed_for(seed, epoch, i)`` (``set_random_state``), so the sample depends only on the
    seed, the epoch (:meth:`set_epoch`, as with ``DistributedSampler``) and the index: not on
    the process, the worker or the order of access.

    Args:
        base: the dataset of preprocessed samples.
        transform: a MONAI transform (``Compose`` of ``Rand*d`` transforms), or None.
        seed: the run's seed.
    """

    def __init__(
        self,
        base: Sequence[Any] | TorchDataset,
        transform: Callable[..., Any] | None,
        seed: int = 0,
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.base[index]
        if self.transform is None:
            return item
        transform = copy.deepcopy(self.transform)  # no state shared between threads
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=seed_for(self.seed, self.epoch, index))
        return transform(item)


def haemorrhage_augmentation(
    *,
    flip_prob: float = 0.5,
    affine_prob: float = 0.5,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    noise_prob: float = 0.3,
    noise_std_hu: float = 3.0,
) -> Compose:
    """Augmentation of head-CT samples (keys :data:`IMAGE`, :data:`LABEL`, :data:`HEAD`).

    A left-right flip (the x axis), a small rotation about each axis (up to ``rotate_deg``)
    and scaling (up to ``scale``) with linear interpolation of the image (HU, border
    padding) and nearest neighbour for the masks (0 padding), and Gaussian noise in HU on the
    image. Masks stay uint8.
    """
    masks = (LABEL, HEAD)
    keys = (IMAGE, *masks)
    angle = math.radians(rotate_deg)
    return Compose(
        [
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
            RandAffined(
                keys=keys,
                prob=affine_prob,
                rotate_range=(angle, angle, angle),
                scale_range=(scale, scale, scale),
                mode=("bilinear", "nearest", "nearest"),
                padding_mode=("border", "zeros", "zeros"),
            ),
            RandGaussianNoised(keys=IMAGE, prob=noise_prob, std=noise_std_hu),
            CastToTyped(keys=masks, dtype=torch.uint8),
        ]
    )


def chest_augmentation(
    *, affine_prob: float = 0.5, rotate_deg: float = 7.0, scale: float = 0.1
) -> Compose:
    """Augmentation of chest samples (key :data:`IMAGE`): a small rotation and scaling with
    border padding; no flip (the heart's side is anatomy)."""
    angle = math.radians(rotate_deg)
    return Compose(
        [
            RandAffined(
                keys=IMAGE,
                prob=affine_prob,
                rotate_range=angle,
                scale_range=(scale, scale),
                mode="bilinear",
                padding_mode="border",
            ),
        ]
    )


# --------------------------------------------------------------------------------------------
# Masks


def _segment_values(seg: Any, classes: Sequence[str], path: Path) -> dict[int, int]:
    """Segment number -> class index, from each segment's TrackingID or SegmentLabel."""
    from triage.dicomout.terminology import segment_terms

    names = {c.lower(): i for i, c in enumerate(classes)}
    names.update({segment_terms(c).label.lower(): i for i, c in enumerate(classes)})
    values: dict[int, int] = {}
    for segment in seg.SegmentSequence:
        number = int(segment.SegmentNumber)
        for text in (segment.get("TrackingID", ""), segment.get("SegmentLabel", "")):
            index = names.get(str(text).strip().lower())
            if index is not None:
                values[number] = index
                break
        else:
            raise DatasetError(
                f"{path}: segment {number} names no class of the model ({', '.join(classes)})"
            )
    return values


def read_mask(path: Path, classes: Sequence[str] | None = None) -> sitk.Image:
    """A mask as a SimpleITK label image in patient (LPS) geometry.

    Args:
        path: a NIfTI label map (values: the model's output indices), or a DICOM
            Segmentation (``.dcm``) whose segments' TrackingID or SegmentLabel names a class.
        classes: the model's outputs in index order (needed for a Segmentation).

    Raises:
        DatasetError: the file cannot be read, or a segment names no class.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        import highdicom as hd

        if classes is None:
            raise DatasetError(f"{path}: a DICOM Segmentation mask needs the model's classes")
        try:
            seg = hd.seg.segread(path)
            volume = seg.get_volume(combine_segments=True, relabel=False, dtype=np.uint8)
        except (ValueError, RuntimeError, AttributeError, OSError) as exc:
            problem = f"not a readable DICOM Segmentation volume ({exc})"
            raise DatasetError(f"{path}: {problem}") from None
        lut = np.zeros(256, dtype=np.uint8)
        for number, index in _segment_values(seg, classes, path).items():
            lut[number] = index
        return volume.with_array(lut[volume.array]).to_simpleitk()
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DatasetError(f"{path}: not a readable mask ({exc})") from None


def mask_on_head_grid(mask: sitk.Image, head: HeadCT) -> np.ndarray:
    """A 3D mask resampled (nearest neighbour, 0 outside) onto ``head.resampled`` and cropped
    like ``head.hu``.

    Args:
        mask: a label image in patient geometry (LPS), any grid.
        head: the prepared head CT.

    Returns:
        uint8 (z, y, x), the shape of ``head.hu``, on its 1 mm grid.

    Raises:
        DatasetError: the mask is not 3D.
    """
    if mask.GetDimension() != 3:
        raise DatasetError(f"a head-CT mask must be 3D, got {mask.GetDimension()}D")
    on_grid = sitk.Resample(
        mask, head.resampled, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    z, y, x = head.crop_start
    dz, dy, dx = head.hu.shape
    array = sitk.GetArrayViewFromImage(on_grid)
    return np.array(array[z : z + dz, y : y + dy, x : x + dx], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Head CT


def _stamp(path: Path | None) -> str:
    if path is None:
        return ""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _series_paths(record: StudyRecord, spec: ModelSpec) -> list[str] | None:
    try:
        return [str(p) for p in choose_series(record, spec).paths]
    except NoSeriesError:
        return None


def haemorrhage_items(
    records: Sequence[StudyRecord], spec: ModelSpec, *, finding: str = HAEMORRHAGE
) -> list[dict[str, Any]]:
    """The input items of :func:`haemorrhage_dataset`: one per study the model reads (the
    series chosen by :func:`choose_series`); studies without such a series are left out (the
    count is logged)."""
    items: list[dict[str, Any]] = []
    skipped = 0
    for record in records:
        paths = _series_paths(record, spec)
        if paths is None:
            skipped += 1
            continue
        label = record.label(finding)
        items.append(
            {
                STUDY: record.study_uid,
                PATHS: paths,
                MASK_PATH: "" if record.mask is None else str(record.mask),
                MASK_STAMP: _stamp(record.mask),
                TARGET: math.nan if label is None else float(label),
                SUBTYPE: record.subtype,
                VOLUME: math.nan if record.volume_ml is None else float(record.volume_ml),
                VERSION_KEY: PREPROCESS_VERSION,
            }
        )
    if skipped:
        log.warning("%d study(ies) have no series %s reads and were left out", skipped, spec.name)
    return items


class LoadHeadCTd(Transform):
    """Item of :func:`haemorrhage_items` -> head-CT sample (see the module docstring).

    Args:
        classes: the model's outputs (to read DICOM Segmentation masks).
        prepare: the preprocessing (serving's ``prepare_head_ct``; tests pass others).
    """

    def __init__(
        self, classes: Sequence[str] = (), prepare: PrepareHeadCT = prepare_head_ct
    ) -> None:
        self.classes = tuple(classes)
        self.prepare = prepare

    def __call__(self, item: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        head = self.prepare([Path(p) for p in item[PATHS]])
        if item[MASK_PATH]:
            mask = read_mask(Path(item[MASK_PATH]), self.classes or None)
            label = mask_on_head_grid(mask, head)
            has_mask = True
        else:
            label = np.zeros(head.hu.shape, dtype=np.uint8)
            has_mask = item[TARGET] == 0.0  # a negative study: all background
        return {
            IMAGE: torch.from_numpy(np.ascontiguousarray(head.hu, dtype=np.float32)[None]),
            LABEL: torch.from_numpy(label[None]),
            HEAD: torch.from_numpy(head.head_mask.astype(np.uint8)[None]),
            HAS_MASK: bool(has_mask),
            TARGET: float(item[TARGET]),
            STUDY: item[STUDY],
            SUBTYPE: item[SUBTYPE],
            VOLUME: float(item[VOLUME]),
        }


def _cached(items: list[dict[str, Any]], load: Transform, cache_dir: Path | None) -> MonaiDataset:
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform=load, cache_dir=cache_dir)
    # Filled on first access (as the persistent cache), so that a study that cannot be
    # prepared fails there (see warm_cache), not while building the dataset.
    return CacheDataset(items, transform=load, cache_rate=1.0, runtime_cache=True, progress=False)


def haemorrhage_dataset(
    records: Sequence[StudyRecord],
    spec: ModelSpec,
    *,
    cache_dir: Path | None = None,
    prepare: PrepareHeadCT = prepare_head_ct,
    finding: str = HAEMORRHAGE,
) -> MonaiDataset:
    """Head-CT samples (see the module docstring), preprocessed once.

    Args:
        records: the studies.
        spec: the haemorrhage model's spec (routing and classes).
        cache_dir: a folder for ``PersistentDataset`` (computed on first access, kept across
            runs); None: ``CacheDataset`` in memory (computed on first access, in this
            process).
        prepare: the preprocessing (``prepare_head_ct``, as serving).
        finding: the finding whose label is :data:`TARGET`.

    Returns:
        A MONAI dataset; wrap it in :class:`AugmentedDataset` for training.
    """
    items = haemorrhage_items(records, spec, finding=finding)
    return _cached(items, LoadHeadCTd(spec.outputs, prepare), cache_dir)


# --------------------------------------------------------------------------------------------
# Chest


def chest_items(records: Sequence[StudyRecord], spec: ModelSpec) -> list[dict[str, Any]]:
    """The input items of :func:`chest_dataset`: one per study the model reads, with the
    label per output (1/0 for the outputs of the spec's findings the study is labelled for,
    0 elsewhere) and the label mask (1 on those outputs)."""
    index = {f.code: spec.outputs.index(f.outputs[0]) for f in spec.findings}
    items: list[dict[str, Any]] = []
    skipped = 0
    for record in records:
        paths = _series_paths(record, spec)
        if paths is None:
            skipped += 1
            continue
        target = [0.0] * len(spec.outputs)
        known = [0.0] * len(spec.outputs)
        for code, value in record.labels.items():
            if code in index:
                target[index[code]] = float(value)
                known[index[code]] = 1.0
        items.append(
            {
                STUDY: record.study_uid,
                PATHS: paths,
                LABEL: target,
                LABEL_MASK: known,
                VERSION_KEY: PREPROCESS_VERSION,
            }
        )
    if skipped:
        log.warning("%d study(ies) have no series %s reads and were left out", skipped, spec.name)
    return items


class LoadRadiographd(Transform):
    """Item of :func:`chest_items` -> chest sample: the first frontal radiograph of the series
    (files sorted by path) as the chest model's ``prepare`` builds it for the network.

    Args:
        spec: the chest model's spec.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def __call__(self, item: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from triage.models.chest import ChestXrayModel

        model = ChestXrayModel(self.spec, None, device="cpu")  # no weights: prepare only
        prepared = model.prepare([Path(p) for p in item[PATHS]])
        return {
            IMAGE: torch.from_numpy(np.ascontiguousarray(prepared.x[0], dtype=np.float32)),
            LABEL: torch.tensor(item[LABEL], dtype=torch.float32),
            LABEL_MASK: torch.tensor(item[LABEL_MASK], dtype=torch.float32),
            STUDY: item[STUDY],
        }


def chest_dataset(
    records: Sequence[StudyRecord], spec: ModelSpec, *, cache_dir: Path | None = None
) -> MonaiDataset:
    """Chest samples (see the module docstring), preprocessed once (``cache_dir`` as in
    :func:`haemorrhage_dataset`)."""
    return _cached(chest_items(records, spec), LoadRadiographd(spec), cache_dir)


# --------------------------------------------------------------------------------------------


def warm_cache(dataset: Sequence[Any] | TorchDataset) -> list[int]:
    """Preprocess every item once (filling a ``PersistentDataset``'s cache); returns the
    indices that loaded. Items whose series cannot be prepared (``PreprocessError``), or
    whose mask is unusable (``DatasetError``), are left out and counted in the log."""
    usable: list[int] = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        try:
            dataset[i]
        except (PreprocessError, DatasetError, OSError) as exc:
            log.warning("item %d cannot be prepared: %s", i, type(exc).__name__)
            continue
        usable.append(i)
    failed = len(dataset) - len(usable)  # type: ignore[arg-type]
    if failed:
        log.warning("%d of %d item(s) cannot be prepared", failed, len(dataset))  # type: ignore[arg-type]
    return usable
