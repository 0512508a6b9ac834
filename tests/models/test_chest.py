"""The chest radiograph model (TorchXRayVision DenseNet-121): preprocessing equivalence with
TorchXRayVision, a run on a real radiograph, weight files read without running them, trust on
first use of an unpinned weight file, the input contract and the choice of frontal views.

The real weights cannot be downloaded here: the tests save the same network with random
weights the way the real file is saved (``torch.save(model)``, a whole pickled module) into a
temporary mirror folder, and read it through a store that never downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import torchxrayvision as xrv
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch import nn

from triage.models import chest
from triage.models.base import ModelOutput
from triage.models.catalog import builtin_spec
from triage.models.registry import ModelRegistry, RuntimeOptions
from triage.models.store import ModelStore, ModelWeightsError, sha256_file
from triage.preprocess.errors import InputContractError, PreprocessError
from triage.preprocess.xray import load_radiograph

XRAY_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "xray"
SIIM = XRAY_DIR / "siim-cr-chest.dcm"

SPEC = builtin_spec("xrv-densenet121-res224-all")
FILENAME = SPEC.weights[0].filename
LABEL = f"{SPEC.name}/{FILENAME}"
OP_THRESHS = torch.tensor(SPEC.params["op_threshs"], dtype=torch.float32)
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# --------------------------------------------------------------------------------------------
# Helpers


def _random_net(seed: int, *, moderate: bool = False) -> nn.Module:
    """TorchXRayVision's DenseNet-121 (18 outputs) with random weights.

    ``moderate``: the classifier is scaled so that the logits are not saturated; pneumothorax
    sits near logit 0 (calibrated score about 0.75) and every other output far below its
    operating point, so that only the critical finding needs a Grad-CAM map.
    """
    torch.manual_seed(seed)
    net = xrv.models.DenseNet(weights=None).eval()
    if moderate:
        with torch.no_grad():
            net.classifier.weight.mul_(1e-3)
            net.classifier.bias.fill_(-8.0)
            net.classifier.bias[SPEC.outputs.index("Pneumothorax")] = 0.0
    return net


def _save(obj: Any, path: Path) -> str:
    """``torch.save(obj)`` at ``path`` (folders created); returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return sha256_file(path)


def _saved_bytes(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _store(tmp: Path, mirror: Path, pins: dict[str, str] | None = None) -> ModelStore:
    return ModelStore(tmp / "cache", mirror, allow_download=False, pins=pins)


def _xrv_reference(path: Path, resolution: int = 224) -> np.ndarray:
    """TorchXRayVision's own preprocessing of a DICOM file: float32 (1, r, r)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its MONOCHROME1 conversion notice
        img = xrv.utils.read_xray_dcm(path)[None]
    return np.asarray(
        xrv.datasets.XRayResizer(resolution)(xrv.datasets.XRayCenterCrop()(img)),
        dtype=np.float32,
    )


def _write_cr(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int = 12,
    view: str = "PA",
    photometric: str = "MONOCHROME2",
    series_uid: str | None = None,
) -> Path:
    """A synthetic CR chest radiograph, uncompressed, no window (so the stored range is used)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _phantom(shape: tuple[int, int] = (300, 240), bits: int = 12) -> np.ndarray:
    """Smooth 'chest-like' stored values (uint16 within ``bits``), not square."""
    rows, cols = np.indices(shape, dtype=np.float64)
    top = 2**bits - 1
    v = 0.5 + 0.3 * np.sin(rows / 17.0) * np.cos(cols / 23.0) + 0.15 * (rows / shape[0])
    return np.clip(np.rint(v * top), 0, top).astype(np.uint16)


def _siim_copy(path: Path, edit: Callable[[pydicom.Dataset], None] | None = None) -> Path:
    """A copy of the SIIM radiograph with a new SOPInstanceUID, edited by ``edit``."""
    ds = pydicom.dcmread(SIIM)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if edit is not None:
        edit(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _true_monochrome1(ds: pydicom.Dataset) -> None:
    """Stored values inverted (255 - v, 8 bits) and labelled MONOCHROME1: the same image."""
    assert ds.BitsStored == 8 and ds.PhotometricInterpretation == "MONOCHROME2"
    inverted = (255 - ds.pixel_array.astype(np.int16)).astype(np.uint8)
    ds.set_pixel_data(inverted, "MONOCHROME1", 8, generate_instance_uid=False)


def _non_square(ds: pydicom.Dataset) -> None:
    """Columns 100..899 only (1024 x 800), so that the centre crop does something."""
    ds.set_pixel_data(
        np.ascontiguousarray(ds.pixel_array[:, 100:900]),
        "MONOCHROME2",
        8,
        generate_instance_uid=False,
    )


def _lateral(ds: pydicom.Dataset) -> None:
    ds.ViewPosition = "LL"


def _needs_xray() -> None:
    if not SIIM.is_file():
        pytest.skip(f"real data not available: {SIIM} is absent")


# --------------------------------------------------------------------------------------------
# Shared fixtures: one saved random-weights network per module


@dataclasses.dataclass(frozen=True)
class SavedNet:
    """A random-weights network saved as the real file is, in a mirror folder."""

    net: nn.Module
    mirror: Path
    path: Path
    sha256: str


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedNet:
    mirror = tmp_path_factory.mktemp("mirror")
    net = _random_net(0, moderate=True)
    path = mirror / SPEC.name / FILENAME
    sha = _save(net, path)
    return SavedNet(net, mirror, path, sha)


@dataclasses.dataclass(frozen=True)
class ChestRun:
    """The model run once on a real series: the SIIM PA radiograph and a lateral copy."""

    model: chest.ChestXrayModel
    store: ModelStore
    paths: list[Path]
    output: ModelOutput
    series_uid: str


@pytest.fixture(scope="module")
def chest_run(saved: SavedNet, tmp_path_factory: pytest.TempPathFactory) -> ChestRun:
    _needs_xray()
    tmp = tmp_path_factory.mktemp("chest-run")
    lateral = _siim_copy(tmp / "series" / "lateral.dcm", _lateral)
    store = _store(tmp, saved.mirror)
    model = chest.ChestXrayModel(SPEC, store, device="cpu")
    series_uid = str(pydicom.dcmread(SIIM, stop_before_pixels=True).SeriesInstanceUID)
    paths = [SIIM, lateral]
    return ChestRun(model, store, paths, model.run(paths, series_uid), series_uid)


# --------------------------------------------------------------------------------------------
# Preprocessing: the same tensor TorchXRayVision makes


@pytest.mark.realdata
@pytest.mark.parametrize(
    "variant",
    [None, _true_monochrome1, _non_square],
    ids=["monochrome2", "true-monochrome1", "non-square"],
)
def test_xrv_input_equals_torchxrayvision_preprocessing(
    variant: Callable[[pydicom.Dataset], None] | None, tmp_path: Path
) -> None:
    _needs_xray()
    path = SIIM if variant is None else _siim_copy(tmp_path / "copy.dcm", variant)
    image = load_radiograph(path, fallback_window="bits")
    x, origin = chest.xrv_input(image)
    expected = _xrv_reference(path)
    assert x.dtype == np.float32 and x.shape == (1, 224, 224)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-3)
    # The image is not flat: the comparison means something.
    assert float(expected.max() - expected.min()) > 1000.0
    if variant is _non_square:
        assert origin == (112, 0)  # (1024 - 800) // 2 rows above the square
    else:
        assert origin == (0, 0)


@pytest.mark.realdata
def test_true_monochrome1_copy_gives_the_same_tensor(tmp_path: Path) -> None:
    _needs_xray()
    m1 = _siim_copy(tmp_path / "m1.dcm", _true_monochrome1)
    stored = pydicom.dcmread(m1)
    assert stored.PhotometricInterpretation == "MONOCHROME1"
    assert np.array_equal(stored.pixel_array, 255 - pydicom.dcmread(SIIM).pixel_array)
    x2, _ = chest.xrv_input(load_radiograph(SIIM, fallback_window="bits"))
    x1, _ = chest.xrv_input(load_radiograph(m1, fallback_window="bits"))
    np.testing.assert_allclose(x1, x2, rtol=0, atol=1e-3)


def test_xrv_input_equals_torchxrayvision_on_a_synthetic_12_bit_radiograph(
    tmp_path: Path,
) -> None:
    """Without real data: 12-bit stored values, not square (the crop takes rows 30..269)."""
    path = _write_cr(tmp_path / "cr.dcm", _phantom((300, 240), bits=12), bits_stored=12)
    image = load_radiograph(path, fallback_window="bits")
    assert image.voi_source == "bits"
    x, origin = chest.xrv_input(image)
    np.testing.assert_allclose(x, _xrv_reference(path), rtol=0, atol=1e-3)
    assert origin == (30, 0)
    # The crop origin names the square XRayCenterCrop takes.
    scaled = (2.0 * image.pixels - 1.0) * 1024.0
    square = scaled[origin[0] : origin[0] + 240, origin[1] : origin[1] + 240]
    np.testing.assert_allclose(
        square[None], xrv.datasets.XRayCenterCrop()(scaled[None]), rtol=0, atol=0
    )


# --------------------------------------------------------------------------------------------
# The model on a real radiograph, with random weights


def _expected_scores(net: nn.Module, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probability, calibrated score), each float (18,), from TorchXRayVision's own path."""
    x = torch.from_numpy(_xrv_reference(path))[None]
    with torch.no_grad():
        probability = torch.sigmoid(net(x))
    score = xrv.models.op_norm(probability, OP_THRESHS)
    return probability[0].numpy(), score[0].numpy()


@pytest.mark.realdata
def test_run_on_a_real_radiograph(chest_run: ChestRun, saved: SavedNet) -> None:
    output = chest_run.output
    findings = {f.finding: f for f in output.findings}
    assert [f.finding for f in output.findings] == [f.code for f in SPEC.findings]
    assert SPEC.finding("pneumothorax").escalate_to == "critical"
    probability, score = _expected_scores(saved.net, SIIM)
    # The random network is tuned so that the scores are not saturated.
    assert 0.55 < score[SPEC.outputs.index("Pneumothorax")] < 0.95
    pa_uid = str(pydicom.dcmread(SIIM, stop_before_pixels=True).SOPInstanceUID)
    for f_spec in SPEC.findings:
        f = findings[f_spec.code]
        index = SPEC.outputs.index(f_spec.outputs[0])
        assert f.model.name == SPEC.name and f.model.version == SPEC.version
        assert f.model.weights_sha256 == (saved.sha256,)
        assert f.details["output"] == f_spec.outputs[0]
        assert f.details["probability"] == pytest.approx(float(probability[index]), abs=1e-4)
        assert f.score == pytest.approx(float(score[index]), abs=1e-4)
        assert f.details["threshold"] == f_spec.threshold
        assert f.flag == (float(score[index]) >= f_spec.threshold)
        assert f.details["SeriesInstanceUID"] == chest_run.series_uid
        # The lateral copy in the series is skipped; the PA image is the one read.
        assert f.details["images_read"] == 1
        assert any("LL" in s for s in f.details["images_skipped"])
        assert f.details["SOPInstanceUID"] == pa_uid
    assert findings["pneumothorax"].flag
    assert not findings["pleural_effusion"].flag


@pytest.mark.realdata
def test_run_overlay_for_pneumothorax_is_a_heatmap(chest_run: ChestRun) -> None:
    overlay = chest_run.output.overlays["pneumothorax"]
    assert overlay.kind == "heatmap"
    assert overlay.classes == ("pneumothorax",)
    assert overlay.SeriesInstanceUID == chest_run.series_uid
    data = overlay.data.astype(np.float32)
    assert data.ndim == 2 and np.isfinite(data).all()
    assert float(data.min()) >= 0.0 and float(data.max()) <= 1.0
    assert float(data.max()) > float(data.min())  # a map, not a constant
    assert overlay.background.shape == overlay.data.shape
    assert overlay.background.dtype == np.uint8
    # Non-critical findings below threshold get no overlay.
    assert "pleural_effusion" not in chest_run.output.overlays


def _reference_grad_cam(net: nn.Module, x: torch.Tensor, index: int, layer: str) -> np.ndarray:
    """Grad-CAM as Selvaraju et al. define it, min-max scaled: 1 = most salient.

    Args:
        x: float32 (1, 1, r, r) network input.

    Returns:
        float32 (r, r) in [0, 1].
    """
    target = net.get_submodule(layer)
    activations: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: activations.append(out))
    try:
        with torch.enable_grad():
            logits = net(x)
            (grad,) = torch.autograd.grad(logits[:, index].sum(), activations[0])
    finally:
        handle.remove()
    act = activations[0].detach()
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(
        cam, size=x.shape[-2:], mode="bilinear", align_corners=False
    )
    cam = cam - cam.min()
    return (cam / cam.max().clamp_min(1e-12))[0, 0].numpy().astype(np.float32)


@pytest.mark.realdata
def test_pneumothorax_heatmap_is_hot_where_grad_cam_is(
    chest_run: ChestRun, saved: SavedNet
) -> None:
    """The overlay's bright (1) pixels are the most salient ones, not the least.

    Fails at the time of writing: MONAI's ``GradCAM`` post-processes with
    ``default_normalizer``, which maps (min, max) onto (1, 0), so the stored heatmap is
    ``1 - Grad-CAM`` (see Project-MONAI/tutorials#1796).
    """
    from PIL import Image

    overlay = chest_run.output.overlays["pneumothorax"]
    x = torch.from_numpy(_xrv_reference(SIIM))[None]
    cam = _reference_grad_cam(
        saved.net, x, SPEC.outputs.index("Pneumothorax"), str(SPEC.params["saliency_layer"])
    )
    assert float(cam.max() - cam.min()) > 0.5  # a map with structure
    side = overlay.data.shape[0]
    expected = np.asarray(
        Image.fromarray(cam).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64
    )
    got = overlay.data.astype(np.float64)
    correlation = float(np.corrcoef(got.ravel(), expected.ravel())[0, 1])
    assert correlation > 0.95, f"heatmap vs Grad-CAM correlation {correlation:.3f}"


@pytest.mark.realdata
def test_site_threshold_override_changes_the_flag(chest_run: ChestRun, saved: SavedNet) -> None:
    default = next(f for f in chest_run.output.findings if f.finding == "pneumothorax")
    assert default.flag and default.details["threshold"] == 0.5
    _, score = _expected_scores(saved.net, SIIM)
    above = (float(score[SPEC.outputs.index("Pneumothorax")]) + 1.0) / 2.0
    options = RuntimeOptions(
        store=chest_run.store, device="cpu", thresholds={"pneumothorax": above}
    )
    model = ModelRegistry([SPEC], options).model(SPEC.name)
    assert isinstance(model, chest.ChestXrayModel)
    output = model.run(chest_run.paths, chest_run.series_uid)
    overridden = next(f for f in output.findings if f.finding == "pneumothorax")
    assert overridden.details["threshold"] == above
    assert not overridden.flag
    assert overridden.score == default.score


@pytest.mark.realdata
def test_grad_cam_leaves_no_hooks_on_the_shared_network(chest_run: ChestRun) -> None:
    """Each prediction must not add hooks to the cached network (they pile up per study).

    Fails at the time of writing: ``ChestXrayModel._grad_cam`` builds a new MONAI ``GradCAM``
    per call, which registers a forward and a full backward hook on the target layer and
    never removes them.
    """
    layer = chest_run.model.network.get_submodule(str(SPEC.params["saliency_layer"]))
    before = (len(layer._forward_hooks), len(layer._backward_hooks))
    prepared = chest_run.model.prepare(chest_run.paths)
    chest_run.model.predict(prepared)
    after = (len(layer._forward_hooks), len(layer._backward_hooks))
    assert after == before, f"hooks on {SPEC.params['saliency_layer']}: {before} -> {after}"


# --------------------------------------------------------------------------------------------
# Weight files: read without running them


def _assert_same_state(state: dict[str, torch.Tensor], net: nn.Module) -> None:
    expected = net.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def test_read_state_dict_of_a_pickled_module(saved: SavedNet) -> None:
    _assert_same_state(chest.read_state_dict(saved.path.read_bytes()), saved.net)


def test_read_state_dict_of_a_legacy_format_pickled_module(saved: SavedNet) -> None:
    """Files written by PyTorch before 1.6 (not a zip archive) read the same."""
    data = _saved_bytes(saved.net, _use_new_zipfile_serialization=False)
    _assert_same_state(chest.read_state_dict(data), saved.net)


def test_read_state_dict_of_a_plain_state_dict(saved: SavedNet) -> None:
    _assert_same_state(chest.read_state_dict(_saved_bytes(saved.net.state_dict())), saved.net)


def test_a_state_dict_file_loads_through_the_store(saved: SavedNet, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    sha = _save(saved.net.state_dict(), mirror / SPEC.name / FILENAME)
    model = chest.ChestXrayModel(SPEC, _store(tmp_path, mirror), device="cpu")
    model.load()
    assert model.weights_sha256() == (sha,)
    _assert_same_state(dict(model.network.state_dict()), saved.net)


class _Payload:
    """Unpickling this runs ``func(*args)``: what a malicious weight file would do."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def _payloads(marker: Path) -> list[_Payload]:
    return [
        _Payload(os.system, f"touch '{marker}'"),
        _Payload(open, str(marker), "w"),
    ]


def test_payload_would_run_with_a_plain_load(tmp_path: Path) -> None:
    """The control: these payloads do create the marker when the pickle is trusted."""
    for n, payload in enumerate(_payloads(tmp_path / "marker")):
        marker = tmp_path / "marker"
        marker.unlink(missing_ok=True)
        path = tmp_path / f"evil-{n}.pt"
        torch.save({"x": payload}, path)
        loaded = torch.load(path, weights_only=False)["x"]
        if hasattr(loaded, "close"):
            loaded.close()  # the file builtins.open returned
        assert marker.exists(), payload.func


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "builtins.open"])
def test_a_pickle_payload_never_runs(which: int, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = _saved_bytes({"x": _payloads(marker)[which]})
    with pytest.raises(ModelWeightsError):
        chest.read_state_dict(data)
    assert not marker.exists()


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "builtins.open"])
def test_a_payload_inside_a_real_network_never_runs(
    which: int, saved: SavedNet, tmp_path: Path
) -> None:
    """A network file carrying a payload attribute: the tensors are read, nothing runs."""
    marker = tmp_path / "marker"
    net = _random_net(0, moderate=True)
    net.payload = _payloads(marker)[which]  # a plain attribute, pickled with the module
    state = chest.read_state_dict(_saved_bytes(net))
    assert not marker.exists()
    _assert_same_state(state, saved.net)


def test_a_payload_file_is_refused_by_the_store_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    mirror = tmp_path / "mirror"
    _save({"x": _payloads(marker)[0]}, mirror / SPEC.name / FILENAME)
    store = _store(tmp_path, mirror)
    model = chest.ChestXrayModel(SPEC, store, device="cpu")
    with pytest.raises(ModelWeightsError, match="not the expected network"):
        model.load()
    assert not marker.exists()
    assert not store.record_path(SPEC.name, SPEC.weights[0]).exists()


def test_a_file_that_is_not_pytorch_is_refused() -> None:
    with pytest.raises(ModelWeightsError, match="not a PyTorch weight file"):
        chest.read_state_dict(b"this is not a weight file" * 10)


def test_wrong_architecture_is_refused_on_first_download(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    torch.manual_seed(0)
    _save(nn.Linear(4, 2), mirror / SPEC.name / FILENAME)
    store = _store(tmp_path, mirror)
    artifact = SPEC.weights[0]
    model = chest.ChestXrayModel(SPEC, store, device="cpu")
    with pytest.raises(ModelWeightsError, match="not the expected network") as info:
        model.load()
    assert LABEL in str(info.value)
    assert not store.record_path(SPEC.name, artifact).exists()
    assert not store.cache_path(SPEC.name, artifact).exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert store.state(SPEC.name, artifact)["sha256_from"] == "none"


# --------------------------------------------------------------------------------------------
# Trust on first use


def test_trust_on_first_use(saved: SavedNet, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror_file = mirror / SPEC.name / FILENAME
    mirror_file.parent.mkdir(parents=True)
    shutil.copyfile(saved.path, mirror_file)
    artifact = SPEC.weights[0]
    assert artifact.sha256 is None  # upstream publishes none

    # First download: validated, then its hash recorded.
    store = _store(tmp_path, mirror)
    first = chest.ChestXrayModel(SPEC, store, device="cpu")
    first.load()
    assert first.weights_sha256() == (saved.sha256,)
    record = store.record_path(SPEC.name, artifact)
    assert record.is_file() and saved.sha256 in record.read_text("utf-8")
    state = store.state(SPEC.name, artifact)
    assert (state["state"], state["sha256"], state["sha256_from"]) == (
        "verified",
        saved.sha256,
        "first download",
    )

    # Another (valid) network replaces the mirror file and the cached copy is gone.
    other_sha = _save(_random_net(1), mirror_file)
    assert other_sha != saved.sha256
    store.cache_path(SPEC.name, artifact).unlink()
    with pytest.raises(ModelWeightsError) as info:
        chest.ChestXrayModel(SPEC, _store(tmp_path, mirror), device="cpu").load()
    message = str(info.value)
    assert "first download" in message and "TRIAGE_WEIGHT_SHA256" in message
    assert other_sha in message
    assert not store.cache_path(SPEC.name, artifact).exists()

    # A site pin that differs from the file is refused too.
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(ModelWeightsError, match="site pin"):
        chest.ChestXrayModel(
            SPEC, _store(tmp_path, mirror, pins={LABEL: wrong}), device="cpu"
        ).load()

    # The site pins the new file's hash: it takes precedence over the recorded one.
    pinned = chest.ChestXrayModel(
        SPEC, _store(tmp_path, mirror, pins={LABEL: other_sha.upper()}), device="cpu"
    )
    pinned.load()
    assert pinned.weights_sha256() == (other_sha,)
    assert sha256_file(store.cache_path(SPEC.name, artifact)) == other_sha


# --------------------------------------------------------------------------------------------
# Missing weights, contract, views


def test_missing_weights_name_the_file_and_the_mirror_setting(tmp_path: Path) -> None:
    empty = tmp_path / "mirror"
    empty.mkdir()
    path = _write_cr(tmp_path / "series" / "pa.dcm", _phantom())
    model = chest.ChestXrayModel(SPEC, _store(tmp_path, empty), device="cpu")
    with pytest.raises(ModelWeightsError) as info:
        model.run([path], "1.2.826.0.1.3680043.8.498.1")
    message = str(info.value)
    assert FILENAME in message
    assert "TRIAGE_MODEL_MIRROR" in message
    assert model.weights_sha256() == ()


def test_no_store_is_a_weights_error() -> None:
    with pytest.raises(ModelWeightsError, match="no model store"):
        chest.ChestXrayModel(SPEC, None, device="cpu").load()


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((1, 1, 200, 200), np.float32), "shape"),
        (np.zeros((1, 224, 224), np.float32), "shape"),
        (np.zeros((1, 3, 224, 224), np.float32), "shape"),
        (np.zeros((1, 1, 224, 224), np.float64), "float32"),
        (np.full((1, 1, 224, 224), np.nan, np.float32), "NaN"),
        (np.full((2, 1, 224, 224), 2000.0, np.float32), "outside"),
        (np.full((1, 1, 224, 224), -1025.0, np.float32), "outside"),
    ],
    ids=["size", "no-batch", "channels", "float64", "nan", "above", "below"],
)
def test_check_input_refuses_what_breaks_the_contract(
    x: np.ndarray, match: str, tmp_path: Path
) -> None:
    model = chest.ChestXrayModel(SPEC, ModelStore(tmp_path), device="cpu")
    with pytest.raises(InputContractError, match=match):
        model.check_input(x)


def test_check_input_accepts_the_contract(tmp_path: Path) -> None:
    model = chest.ChestXrayModel(SPEC, ModelStore(tmp_path), device="cpu")
    x = np.linspace(-1024.0, 1024.0, 2 * 224 * 224, dtype=np.float32).reshape(2, 1, 224, 224)
    model.check_input(x)


def test_prepare_reads_frontal_views_only_synthetic(tmp_path: Path) -> None:
    series = generate_uid()
    pa = _write_cr(tmp_path / "a-pa.dcm", _phantom(), series_uid=series)
    ll = _write_cr(tmp_path / "b-ll.dcm", _phantom(), view="LL", series_uid=series)
    model = chest.ChestXrayModel(SPEC, ModelStore(tmp_path / "cache"), device="cpu")
    prepared = model.prepare([ll, pa])
    assert prepared.x.shape == (1, 1, 224, 224)
    assert prepared.SOPInstanceUIDs == [str(pydicom.dcmread(pa).SOPInstanceUID)]
    assert prepared.skipped == ["view LL"]


@pytest.mark.realdata
def test_prepare_skips_a_lateral_copy_of_the_real_radiograph(tmp_path: Path) -> None:
    _needs_xray()
    pa = _siim_copy(tmp_path / "pa.dcm")
    ll = _siim_copy(tmp_path / "ll.dcm", _lateral)
    model = chest.ChestXrayModel(SPEC, ModelStore(tmp_path / "cache"), device="cpu")
    prepared = model.prepare([pa, ll])
    assert prepared.x.shape == (1, 1, 224, 224)
    assert prepared.SOPInstanceUIDs == [str(pydicom.dcmread(pa).SOPInstanceUID)]
    assert len(prepared.skipped) == 1 and "LL" in prepared.skipped[0]


@pytest.mark.realdata
def test_prepare_refuses_a_series_of_laterals_only(tmp_path: Path) -> None:
    _needs_xray()
    ll = _siim_copy(tmp_path / "ll.dcm", _lateral)
    model = chest.ChestXrayModel(SPEC, ModelStore(tmp_path / "cache"), device="cpu")
    with pytest.raises(PreprocessError, match="LL") as info:
        model.prepare([ll])
    assert "PA" in str(info.value) and "AP" in str(info.value)
