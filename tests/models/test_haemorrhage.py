"""The haemorrhage model runtime: input contract, tiling, ensemble, volumes, finding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from triage.models.deepmedic import DeepMedic
from triage.models.haemorrhage import (
    BLAST_CT_V1,
    HaemorrhageModel,
    HaemorrhageResult,
    blood_score,
    default_members,
    plan_tiles,
    to_finding,
)
from triage.models.store import ModelStore, ModelWeightsError
from triage.preprocess.errors import InputContractError


def _phantom(shape: tuple[int, int, int] = (20, 26, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A small head-like volume: air, a 1000 HU shell, 30 HU brain, a 70 HU blob."""
    z, y, x = np.indices(shape, dtype=np.float32)
    c = [(n - 1) / 2 for n in shape]
    r = np.sqrt(((z - c[0]) / 9) ** 2 + ((y - c[1]) / 12) ** 2 + ((x - c[2]) / 11) ** 2)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < 1.0] = 1000.0
    hu[r < 0.8] = 30.0
    hu[(z - 10) ** 2 + (y - 13) ** 2 + (x - 8) ** 2 < 9] = 70.0
    return hu, r < 1.0


def _tiny_net(seed: int) -> DeepMedic:
    torch.manual_seed(seed)
    net = DeepMedic(feature_maps=(4, 4, 6, 6, 6, 6, 8, 8), fully_connected=(12, 12))
    with torch.no_grad():
        # Make the random network prefer lesion classes somewhere, so labels vary.
        net.fully_connected[2].conv.weight.mul_(20.0)
    return net.eval()


@pytest.fixture()
def model(tmp_path: Path) -> HaemorrhageModel:
    """A model whose weights are never needed (contract checks come first)."""
    return HaemorrhageModel(ModelStore(tmp_path), device="cpu", precision="fp32")


@pytest.mark.parametrize(
    ("hu", "kwargs", "match"),
    [
        (np.zeros((10, 10), np.float32), {}, "3D"),
        (np.zeros((10, 10, 10), np.float64), {}, "float32"),
        (np.zeros((10, 10, 10), np.int16), {}, "float32"),
        (np.zeros((700, 10, 10), np.float32), {}, "crop"),
        (_phantom()[0], {"spacing_mm": (0.625, 0.45, 0.45)}, "1 mm"),
        (_phantom()[0], {"spacing_mm": (1.0, 1.0)}, "1 mm"),
        (np.clip(_phantom()[0], -15, 100) / 57.5, {}, "Hounsfield"),
        (np.full((10, 10, 10), 128.0, np.float32), {}, "Hounsfield"),
        (np.full((10, 10, 10), 1e6, np.float32), {}, "plausible"),
    ],
)
def test_contract_violations(
    model: HaemorrhageModel, hu: np.ndarray, kwargs: dict, match: str
) -> None:
    with pytest.raises(InputContractError, match=match):
        model.predict(hu.astype(hu.dtype), **kwargs)


def test_contract_nan_and_masks(model: HaemorrhageModel) -> None:
    hu, mask = _phantom()
    bad = hu.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputContractError, match="NaN"):
        model.predict(bad)
    with pytest.raises(InputContractError, match="shape"):
        model.predict(hu, mask[:-1])
    with pytest.raises(InputContractError, match="empty"):
        model.predict(hu, np.zeros_like(mask))
    with pytest.raises(InputContractError, match="bool"):
        model.predict(hu, mask.astype(np.float32))
    assert issubclass(InputContractError, ValueError)


def test_configuration_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert default_members("cpu") == 1
    # One member on CPU: the one closest to the full ensemble; 12 = all of them.
    assert HaemorrhageModel(store, device="cpu").members == (7,)
    assert sorted(HaemorrhageModel(store, members=12, device="cpu").members) == list(range(1, 13))
    assert HaemorrhageModel(store, members=[3, 1], device="cpu").members == (3, 1)
    with pytest.raises(ValueError, match="members"):
        HaemorrhageModel(store, members=13, device="cpu")
    with pytest.raises(ValueError):
        HaemorrhageModel(store, members=[0], device="cpu")
    with pytest.raises(ValueError, match="multiples of 5"):
        HaemorrhageModel(store, device="cpu", tile=(40, 42, 40))
    with pytest.raises(ValueError, match="fp16"):
        HaemorrhageModel(store, device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            HaemorrhageModel(store, device="cuda")


def test_missing_weights_raise_model_weights_error(tmp_path: Path) -> None:
    empty = tmp_path / "mirror"
    empty.mkdir()
    spec = dataclasses.replace(
        BLAST_CT_V1,
        weights=tuple(
            dataclasses.replace(a, url="http://127.0.0.1:9/none.pt") for a in BLAST_CT_V1.weights
        ),
    )
    model = HaemorrhageModel(
        ModelStore(tmp_path / "cache", mirror=empty, timeout_s=2), spec=spec, device="cpu"
    )
    hu, mask = _phantom()
    with pytest.raises(ModelWeightsError, match="blast-ct-v1/model_7.pt"):
        model.predict(hu, mask)


def test_loads_verified_members_from_mirror(weights_mirror: Path, tmp_path: Path) -> None:
    model = HaemorrhageModel(
        ModelStore(tmp_path, mirror=weights_mirror, allow_download=False),
        members=[1, 9],
        device="cpu",
    )
    assert model.load() > 0
    assert (tmp_path / "blast-ct-v1" / "model_9.pt").is_file()
    assert model.load() < 0.1  # already loaded


def test_plan_tiles_covers_head_and_skips_air() -> None:
    mask = np.zeros((40, 50, 60), dtype=bool)
    mask[5:20, 5:20, 5:20] = True
    tile, origins, total = plan_tiles(mask.shape, mask, budget_voxels=30**3)
    assert all(t % 5 == 0 for t in tile)
    assert len(origins) < total
    covered = np.zeros_like(mask)
    for o in origins:
        covered[o[0] : o[0] + tile[0], o[1] : o[1] + tile[1], o[2] : o[2] + tile[2]] = True
    assert covered[mask].all()


def test_predict_pipeline_tiling_ensemble_and_volumes() -> None:
    hu, mask = _phantom()
    nets = [_tiny_net(0), _tiny_net(1)]
    auto = HaemorrhageModel.from_networks(nets, device="cpu", precision="fp32")
    tiled = HaemorrhageModel.from_networks(nets, device="cpu", precision="fp32", tile=(10, 15, 15))
    single = HaemorrhageModel.from_networks(nets[:1], device="cpu", precision="fp32")
    a, b = auto.predict(hu, mask), tiled.predict(hu, mask)
    assert b.tiles["run"] > 1
    assert a.labels.shape == hu.shape and a.labels.dtype == np.uint8
    assert a.probabilities.shape == (5, *hu.shape) and a.probabilities.dtype == np.float16
    # The tiling does not change the result.
    np.testing.assert_allclose(
        a.probabilities.astype(np.float32), b.probabilities.astype(np.float32), atol=2e-3
    )
    # Probabilities sum to one; outside the head everything is background.
    np.testing.assert_allclose(a.probabilities.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert (a.labels[~mask] == 0).all() and (a.probabilities[0][~mask] == 1).all()
    # Volumes are voxel counts x 1 ml / 1000.
    for index, name in enumerate(BLAST_CT_V1.outputs[1:], start=1):
        assert a.volumes_ml[name] == pytest.approx((a.labels == index).sum() / 1000.0)
        assert a.max_probability[name] == pytest.approx(
            float(a.probabilities[index].max()), abs=1e-3
        )
    assert sum(a.volumes_ml.values()) > 0  # the random nets do label something
    # The ensemble is the mean of its members' probabilities.
    c = single.predict(hu, mask)
    assert c.members == (1,) and a.members == (1, 2)
    assert not np.allclose(a.probabilities, c.probabilities, atol=1e-2)
    assert a.device == "cpu" and a.precision == "fp32" and a.timing_s["total"] > 0


def _result(labels: np.ndarray, blood_p: float) -> HaemorrhageResult:
    probs = np.zeros((5, *labels.shape), dtype=np.float32)
    probs[0] = 1.0
    lesion = labels == 1
    probs[0][lesion] = 1 - blood_p
    probs[1][lesion] = blood_p
    volumes = {
        name: float((labels == i).sum()) / 1000
        for i, name in enumerate(BLAST_CT_V1.outputs)
        if i > 0
    }
    return HaemorrhageResult(
        labels=labels.astype(np.uint8),
        probabilities=probs.astype(np.float16),
        volumes_ml=volumes,
        max_probability={
            k: float(probs[i].max()) for i, k in enumerate(BLAST_CT_V1.outputs) if i > 0
        },
        spacing_mm=(1.0, 1.0, 1.0),
        members=(1,),
        device="cpu",
        precision="fp32",
        timing_s={"total": 1.0},
    )


def test_to_finding_flag_and_score() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[10:20, 10:20, 10:20] = 1  # 1000 voxels = 1.0 ml of IPH
    result = _result(labels, blood_p=0.9)
    finding = to_finding(result)
    assert finding.finding == "intracranial_haemorrhage"
    assert finding.flag is True
    assert finding.volumes_ml["IPH"] == pytest.approx(1.0)
    assert finding.score == pytest.approx(0.9, abs=1e-3)
    assert finding.model.name == "blast-ct-v1"
    expected = BLAST_CT_V1.finding("intracranial_haemorrhage").threshold
    assert finding.details["threshold_ml"] == expected
    # Above the lesion's volume: not flagged, and the score drops (fewer voxels qualify).
    high = to_finding(result, threshold_ml=2.0)
    assert high.flag is False and high.score < finding.score
    # A smaller lesion cannot score higher at the same threshold.
    small = labels.copy()
    small[15:20] = 0
    assert blood_score(_result(small, 0.9), 1.0) <= blood_score(result, 1.0)
    assert 0.0 <= finding.score <= 1.0
    # Round trip through JSON.
    assert type(finding).from_json(finding.to_json()) == finding
    with pytest.raises(ValueError):
        to_finding(result, threshold_ml=0)


def test_severity_volume_ivh_and_largest_lesion() -> None:
    labels = np.zeros((60, 60, 60), dtype=np.uint8)
    labels[5:15, 5:15, 5:15] = 1  # 1 ml of IPH
    labels[30:40, 30:40, 30:35] = 1  # 0.5 ml more IPH, apart from the first
    small = to_finding(_result(labels, 0.9))
    assert small.flag and small.severity == "standard"
    assert small.details["blood_volume_ml"] == pytest.approx(1.5)
    assert small.details["largest_lesion_ml"] == pytest.approx(1.0)
    assert small.details["intraventricular_extension"] is False
    assert small.details["severity_reasons"] == []

    ivh = labels.copy()
    ivh[14:16, 5:15, 5:15] = 4  # 0.2 ml of IVH touching the first haematoma
    ivh[16:20, 5:15, 5:15] = 4  # 0.4 ml more: 0.6 ml of IVH
    graded = to_finding(_result(ivh, 0.9))
    assert graded.severity == "high"
    assert graded.details["intraventricular_extension"] is True
    assert graded.details["largest_lesion_ml"] == pytest.approx(1.5)  # IPH + its IVH, one region
    assert any("intraventricular" in r for r in graded.details["severity_reasons"])

    big = np.zeros((60, 60, 60), dtype=np.uint8)
    big[0:30, 0:30, 0:34] = 1  # 30.6 ml
    large = to_finding(_result(big, 0.9))
    assert large.severity == "high" and large.details["blood_volume_ml"] >= 30
    # Unflagged findings carry no severity.
    assert to_finding(_result(labels, 0.9), threshold_ml=5.0).severity is None
