"""Chest radiograph findings with TorchXRayVision's DenseNet-121 (``densenet121-res224-all``).

The network is TorchXRayVision's own (``torchxrayvision.models.DenseNet``), and so is the
last part of its preprocessing (``XRayCenterCrop``, ``XRayResizer``); the radiograph is read
by the product's X-ray layer (Modality LUT, VOI LUT or window, else the whole stored range
as TorchXRayVision's ``read_xray_dcm`` does, MONOCHROME1 inverted) and mapped onto
[-1024, 1024]. The 18 outputs are logits; a sigmoid gives the model's probability, and
TorchXRayVision's calibrated operating points (``op_norm``) map each probability so that the
operating point is 0.5: the finding's ``score``. Saliency is MONAI's Grad-CAM on the last
dense block.

The published weight file is a whole pickled module (``torch.save(model)``), not a state dict,
and no sha256 is published for it. It is never unpickled as such: :func:`read_state_dict`
replaces every class the pickle names with an inert stand-in (no code from the file runs) and
keeps only the tensors; the state dict is then loaded into a freshly built network. Its hash
is recorded at the first download that loads this way (see :mod:`triage.models.store`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import logging
import pickle
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from triage.domain import Finding, ModelRef
from triage.models.base import FindingModel, ModelOutput
from triage.models.device import resolve_device
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore, ModelWeightsError
from triage.preprocess.errors import InputContractError, PreprocessError
from triage.preprocess.xray import XRayImage, check_xray_input, load_radiograph
from triage.results import Overlay

if TYPE_CHECKING:
    from triage.models.registry import RuntimeOptions

__all__ = [
    "ChestXrayModel",
    "ChestPrepared",
    "ChestRaw",
    "build",
    "build_network",
    "read_state_dict",
    "xrv_input",
]

logger = logging.getLogger(__name__)

#: Longest side of the stored overlay (saliency and grey image), pixels.
OVERLAY_SIDE_PX = 512
#: Views the model reads; anything else in the chosen series is skipped.
FRONTAL_VIEWS = ("PA", "AP")


# --------------------------------------------------------------------------------------------
# Weights: a pickled module read without running it


class _Inert:
    """Stand-in for any class a weight pickle names: keeps its state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_inert_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


_REAL_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # type: ignore[attr-defined]
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _InertUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; every other global becomes an inert class."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's default) writes Python 2 module names.
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        real = _REAL_GLOBALS.get((module, name))
        if real is not None:
            return real
        return type(name, (_Inert,), {"__module__": f"inert.{module}"})


class _InertPickle:
    """A ``pickle_module`` for ``torch.load`` that never imports what a file names."""

    Unpickler = _InertUnpickler
    __name__ = "triage_inert_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _InertUnpickler(file, **kwargs).load()


def _module_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.__dict__
    skip = state.get("_non_persistent_buffers_set") or set()
    for key in ("_parameters", "_buffers"):
        for name, tensor in (state.get(key) or {}).items():
            if isinstance(tensor, torch.Tensor) and not (key == "_buffers" and name in skip):
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _Inert):
            _module_tensors(child, f"{prefix}{name}.", out)


def read_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: a pickled module or a state dict, without running it.

    Raises:
        ModelWeightsError: the file is neither, or holds no tensors.
    """
    try:
        with warnings.catch_warnings():  # legacy files: "Couldn't retrieve source code for..."
            warnings.simplefilter("ignore", UserWarning)
            root = torch.load(
                io.BytesIO(data),
                map_location="cpu",
                weights_only=False,
                pickle_module=_InertPickle,
            )
    except Exception as exc:
        raise ModelWeightsError(f"not a PyTorch weight file ({type(exc).__name__})") from exc
    state: dict[str, torch.Tensor] = {}
    if isinstance(root, _Inert):
        _module_tensors(root, "", state)
    elif isinstance(root, dict):
        state = {k: v for k, v in root.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelWeightsError("the file holds no network weights")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_network(spec: ModelSpec, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """TorchXRayVision's DenseNet-121 with ``len(spec.outputs)`` logits, weights loaded.

    Raises:
        ModelWeightsError: ``state`` does not fit the network (missing, unexpected or
            mis-shaped tensors).
    """
    import torchxrayvision as xrv  # imported on first use: torchvision is heavy

    net = xrv.models.DenseNet(weights=None, num_classes=len(spec.outputs), apply_sigmoid=False)
    if state is not None:
        state = {k: v for k, v in state.items() if k != "op_threshs"}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ModelWeightsError(f"the weights do not fit {spec.name}: {exc}") from None
        missing = [k for k in missing if k != "op_threshs"]
        if missing or unexpected:
            raise ModelWeightsError(
                f"the weights do not fit {spec.name}: missing {missing[:3]}, "
                f"unexpected {list(unexpected)[:3]}"
            )
    return net.eval()


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    """Each map of a batch (n, 1, r, r) scaled so its minimum is 0 and its maximum 1 (all 0
    when flat). MONAI's default normaliser maps (min, max) to (1, 0), which would show the
    least relevant regions as the hottest."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - lo).clamp_min(1e-12)
    return (x - lo) / span


# --------------------------------------------------------------------------------------------
# Preprocessing


def xrv_input(image: XRayImage, resolution: int = 224) -> tuple[np.ndarray, tuple[int, int]]:
    """One radiograph as TorchXRayVision's models take it.

    Args:
        image: the radiograph read with ``load_radiograph(path, fallback_window="bits")``.
        resolution: the network's input side.

    Returns:
        ``(x, crop_origin)``: x float32 (1, resolution, resolution) in [-1024, 1024] and the
        (row, column) where the centre crop starts.
    """
    import torchxrayvision as xrv

    scaled = ((2.0 * image.pixels - 1.0) * 1024.0).astype(np.float32)[None]
    rows, cols = image.pixels.shape
    side = min(rows, cols)
    origin = (rows // 2 - side // 2, cols // 2 - side // 2)
    cropped = xrv.datasets.XRayCenterCrop()(scaled)
    x = np.ascontiguousarray(xrv.datasets.XRayResizer(resolution)(cropped), dtype=np.float32)
    np.clip(x, -1024.0, 1024.0, out=x)  # resampling overshoot only
    return x, origin


@dataclass(frozen=True, eq=False)
class ChestPrepared:
    """The frontal radiographs of a series, ready for the network.

    Attributes:
        x: float32 (n, 1, r, r) in [-1024, 1024].
        presentation: per image, float32 (rows, columns) presentation grey in [0, 1].
        crop_origin: per image, the (row, column) of the centre crop.
        SOPInstanceUIDs: per image.
        skipped: why other images of the series were not read.
    """

    x: np.ndarray
    presentation: list[np.ndarray]
    crop_origin: list[tuple[int, int]]
    SOPInstanceUIDs: list[str]
    skipped: list[str]


@dataclass(frozen=True, eq=False)
class ChestRaw:
    """The network's answer.

    Attributes:
        probability: float32 (n, outputs), sigmoid of the logits.
        score: float32 (n, outputs), calibrated (operating point at 0.5; NaN thresholds keep
            the probability).
        saliency: finding code -> (image index, float32 (r, r) Grad-CAM map in [0, 1]).
    """

    probability: np.ndarray
    score: np.ndarray
    saliency: dict[str, tuple[int, np.ndarray]]


# --------------------------------------------------------------------------------------------
# The model


class ChestXrayModel(FindingModel[ChestPrepared, ChestRaw]):
    """TorchXRayVision DenseNet-121 as a registry model.

    Args:
        spec: the model's spec (outputs, findings, ``params.op_threshs``,
            ``params.saliency_layer``, ``params.resolution``).
        store: where the weight file comes from (None with ``network``).
        device: ``auto``, ``cpu`` or ``cuda``.
        thresholds: finding code -> the site's flag threshold on the calibrated score.
        network: an already-built network (tests, training) instead of stored weights.
    """

    def __init__(
        self,
        spec: ModelSpec,
        store: ModelStore | None,
        *,
        device: str = "auto",
        thresholds: dict[str, float] | None = None,
        network: nn.Module | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.device = resolve_device(device)
        self.thresholds = dict(thresholds or {})
        self.resolution = int(spec.params.get("resolution", 224))
        op = spec.params.get("op_threshs")
        self.op_threshs = (
            None if op is None else torch.tensor([np.nan if v is None else v for v in op])
        )
        if self.op_threshs is not None and len(self.op_threshs) != len(spec.outputs):
            raise ValueError(f"{spec.name}: op_threshs has {len(self.op_threshs)} values")
        self._network = None if network is None else network.eval().to(self.device)
        self._sha256: tuple[str, ...] = ()
        self._cam: Any = None
        self._lock = threading.Lock()
        # One prediction at a time: Grad-CAM keeps the activations of the last forward pass.
        self._run_lock = threading.Lock()

    # weights

    def _validate(self, path: Path) -> None:
        build_network(self.spec, read_state_dict(path.read_bytes()))

    def load(self) -> float:
        start = time.perf_counter()
        with self._lock:
            if self._network is None:
                if self.store is None:
                    raise ModelWeightsError(f"no model store configured for {self.spec.name}")
                artifact = self.spec.weights[0]
                data, sha256 = self.store.read_verified(self.spec.name, artifact, self._validate)
                try:
                    net = build_network(self.spec, read_state_dict(data))
                except ModelWeightsError as exc:
                    raise ModelWeightsError(
                        f"model weights {self.spec.name}/{artifact.filename}: {exc}"
                    ) from None
                self._network = net.to(self.device)
                self._sha256 = (sha256,)
                logger.info("loaded %s", self.spec.name)
        return time.perf_counter() - start

    def weights_sha256(self) -> tuple[str, ...]:
        return self._sha256

    @property
    def network(self) -> nn.Module:
        self.load()
        assert self._network is not None
        return self._network

    # stages

    def prepare(self, paths: Sequence[Path]) -> ChestPrepared:
        xs: list[np.ndarray] = []
        grey: list[np.ndarray] = []
        origins: list[tuple[int, int]] = []
        uids: list[str] = []
        skipped: list[str] = []
        for path in sorted(paths):
            image = load_radiograph(path, fallback_window="bits")
            view = image.view_position
            if view is not None and view not in FRONTAL_VIEWS:
                skipped.append(f"view {view}")
                continue
            x, origin = xrv_input(image, self.resolution)
            xs.append(x)
            grey.append(image.pixels)
            origins.append(origin)
            uids.append(image.SOPInstanceUID)
        if not xs:
            raise PreprocessError(
                f"no frontal radiograph in the series (read {'/'.join(FRONTAL_VIEWS)}; "
                f"found {', '.join(skipped) or 'none'})"
            )
        batch = np.stack(xs)
        return ChestPrepared(batch, grey, origins, uids, skipped)

    def predict(self, prepared: ChestPrepared) -> ChestRaw:
        self.check_input(prepared.x)
        with self._run_lock:
            return self._predict(prepared)

    def _predict(self, prepared: ChestPrepared) -> ChestRaw:
        net = self.network
        x = torch.from_numpy(prepared.x).to(self.device)
        with torch.no_grad():
            probability = torch.sigmoid(net(x).float())
        score = probability.clone()
        if self.op_threshs is not None:
            import torchxrayvision as xrv

            score = xrv.models.op_norm(probability, self.op_threshs.to(probability.device))
            score = torch.where(torch.isnan(self.op_threshs.to(score.device)), probability, score)
        score_np = score.cpu().numpy().astype(np.float32)
        saliency: dict[str, tuple[int, np.ndarray]] = {}
        for f in self.spec.findings:
            index = self.spec.outputs.index(f.outputs[0])
            best = int(np.argmax(score_np[:, index]))
            if f.critical or score_np[best, index] >= self._threshold(f.code):
                saliency[f.code] = (best, self._grad_cam(x[best : best + 1], index))
        return ChestRaw(probability.cpu().numpy().astype(np.float32), score_np, saliency)

    def interpret(self, prepared: ChestPrepared, raw: ChestRaw, series_uid: str) -> ModelOutput:
        findings: list[Finding] = []
        overlays: dict[str, Overlay] = {}
        for f in self.spec.findings:
            index = self.spec.outputs.index(f.outputs[0])
            best = int(np.argmax(raw.score[:, index]))
            score = float(raw.score[best, index])
            threshold = self._threshold(f.code)
            findings.append(
                Finding(
                    finding=f.code,
                    flag=score >= threshold,
                    score=round(score, 4),
                    volumes_ml={},
                    model=ModelRef(self.spec.name, self.spec.version),
                    details={
                        "label": f.label,
                        "output": f.outputs[0],
                        "probability": round(float(raw.probability[best, index]), 4),
                        "threshold": threshold,
                        "score_definition": (
                            "sigmoid output mapped by TorchXRayVision's calibrated operating "
                            "point onto 0.5 (op_norm)"
                        ),
                        "SOPInstanceUID": prepared.SOPInstanceUIDs[best],
                        "images_read": len(prepared.SOPInstanceUIDs),
                        "images_skipped": prepared.skipped,
                        "device": str(self.device),
                    },
                )
            )
            if f.code in raw.saliency:
                image_index, heat = raw.saliency[f.code]
                overlays[f.code] = self._overlay(prepared, image_index, heat, f.code, series_uid)
        return ModelOutput(findings=findings, overlays=overlays)

    # helpers

    def check_input(self, x: np.ndarray) -> None:
        """The contract: float32 (n, 1, r, r), finite, within ``spec.input.value_range``.

        Raises:
            InputContractError: naming what is wrong.
        """
        if x.ndim != 4:
            raise InputContractError(f"input shape is {x.shape}, expected (n, 1, r, r)")
        check_xray_input(
            x, size=(self.resolution, self.resolution), value_range=self.spec.input.value_range
        )

    def _threshold(self, code: str) -> float:
        return float(self.thresholds.get(code, self.spec.finding(code).threshold))

    def _grad_cam(self, x: torch.Tensor, index: int) -> np.ndarray:
        """MONAI's Grad-CAM of output ``index`` on ``x`` (1, 1, r, r): float32 (r, r) in
        [0, 1], 1 where the output depends most on the image. One ``GradCAM`` per model, so
        its hooks are registered on the network once, not once per prediction."""
        if self._cam is None:
            from monai.visualize import GradCAM

            layer = str(self.spec.params.get("saliency_layer", "features.denseblock4"))
            self._cam = GradCAM(
                nn_module=self.network, target_layers=layer, postprocessing=_unit_scale
            )
        with torch.enable_grad():
            heat = self._cam(x=x, class_idx=index)
        return np.asarray(heat[0, 0].detach().cpu().numpy(), dtype=np.float32)

    def _overlay(
        self,
        prepared: ChestPrepared,
        image_index: int,
        heat: np.ndarray,
        code: str,
        series_uid: str,
    ) -> Overlay:
        from PIL import Image

        grey = prepared.presentation[image_index]
        r0, c0 = prepared.crop_origin[image_index]
        crop_side = min(grey.shape)
        square = grey[r0 : r0 + crop_side, c0 : c0 + crop_side]
        side = min(crop_side, OVERLAY_SIDE_PX)
        background = Image.fromarray((square * 255).astype(np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        heat_img = Image.fromarray(heat.astype(np.float32)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        return Overlay(
            kind="heatmap",
            data=np.clip(np.asarray(heat_img), 0.0, 1.0).astype(np.float16),
            background=np.asarray(background, dtype=np.uint8),
            classes=(code,),
            origin=(r0, c0),
            SeriesInstanceUID=series_uid,
            scale=(crop_side / side, crop_side / side),
            SOPInstanceUID=prepared.SOPInstanceUIDs[image_index],
        )

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": "fp32"}


def build(spec: ModelSpec, options: RuntimeOptions) -> ChestXrayModel:
    """The registry's factory for ``kind = "xrv-densenet"``."""
    return ChestXrayModel(
        spec, options.store, device=options.device, thresholds=dict(options.thresholds)
    )
