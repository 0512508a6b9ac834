"""Fine-tuning the chest radiograph classifier: a few steps on synthetic radiographs change
the weights with a finite loss, the same seed gives the same weights, a resumed run reaches
the weights of a straight one, two ``torchrun`` processes give the weights of one, and serving
loads the saved weights through the model store.

The real weights cannot be downloaded here: the starting network is the DenseNet-121 with
random weights saved the way the real file is (``tests.conftest.write_chest_weights``: a
whole pickled module) in a mirror folder, read through a store that never downloads.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import REPO_ROOT, write_chest_weights
from training.data.dataset import read_dataset
from training.data.samples import IMAGE, LABEL, LABEL_MASK, chest_augmentation, chest_dataset
from training.fit.chest import (
    ChestSamples,
    bare_network,
    chest_loss,
    load_chest_network,
    masked_bce_with_logits,
    prepare_chest_batch,
    save_chest_weights,
)
from training.fit.engine import Distributed, TrainResult, run_training
from training.synth.xray import synth_xray_dataset
from triage.models import chest
from triage.models.catalog import builtin_spec
from triage.models.registry import RuntimeOptions
from triage.models.spec import ModelSpec, WeightArtifact
from triage.models.store import ModelStore

SPEC = builtin_spec("xrv-densenet121-res224-all")
FILENAME = SPEC.weights[0].filename
PTX = SPEC.outputs.index("Pneumothorax")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic CR chest PAs (two with a pneumothorax) in the generic format."""
    out = tmp_path_factory.mktemp("chest") / "ptx"
    synth_xray_dataset(out, n_studies=4, seed=3, prevalence=0.5, size="small")
    return out


@pytest.fixture(scope="module")
def items(dataset_dir: Path) -> list[dict[str, Any]]:
    """The four radiographs through the serving preprocessing (read-only for the tests)."""
    ds = chest_dataset(read_dataset(dataset_dir).studies, SPEC)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    """A store that never downloads, over a mirror holding the random-weight file, pinned."""
    mirror = tmp_path / "mirror"
    sha = write_chest_weights(mirror, seed=0)
    return ModelStore(
        tmp_path / "cache", mirror, allow_download=False, pins={f"{SPEC.name}/{FILENAME}": sha}
    )


def _fit(
    network: nn.Module,
    items: list[dict[str, Any]],
    checkpoints: Path,
    *,
    steps: int,
    seed: int = 7,
    samples: int = 4,
    resume: bool = False,
    optimizer: str = "adam",
) -> TrainResult:
    def factory(params: Any) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=1e-3)
        return torch.optim.Adam(params, lr=1e-4)

    return run_training(
        network=network,
        dataset=ChestSamples(items, seed=seed, samples=samples, augmentation=chest_augmentation()),
        loss_function=chest_loss(),
        optimizer_factory=factory,
        steps=steps,
        batch_size=2,
        device=CPU,
        parallel=Distributed(),
        seed=seed,
        checkpoint_dir=checkpoints,
        checkpoint_every=samples // 2,  # one epoch of ``samples`` items in batches of 2
        resume=resume,
        amp=False,
        prepare_batch=prepare_chest_batch,
    )


def _state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bare_network(network).state_dict().items()}


# --------------------------------------------------------------------------------------------
# Parts


def test_loss_is_over_labelled_outputs_and_a_mean_over_samples() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 18)
    labels = (torch.rand(4, 18) > 0.5).float()
    mask = torch.zeros(4, 18)
    mask[0, PTX] = 1.0
    mask[1, [PTX, 7, 10]] = 1.0
    mask[2, :] = 1.0  # sample 3: labelled for nothing
    target = torch.stack([labels, mask], dim=1)
    loss = masked_bce_with_logits(logits, target)
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = (
        bce(logits[0, PTX], labels[0, PTX])
        + bce(logits[1, [PTX, 7, 10]], labels[1, [PTX, 7, 10]])
        + bce(logits[2], labels[2])
    ) / 4
    torch.testing.assert_close(loss, expected)
    # Unlabelled outputs do not matter.
    moved = logits.clone()
    moved[mask == 0] += 100.0
    torch.testing.assert_close(masked_bce_with_logits(moved, target), loss)
    # Two halves (two data-parallel processes) average to the whole batch.
    halves = (
        masked_bce_with_logits(logits[:2], target[:2])
        + masked_bce_with_logits(logits[2:], target[2:])
    ) / 2
    torch.testing.assert_close(halves, loss)


def test_batch_norm_stays_in_eval_mode_and_dropout_off() -> None:
    net, origin = load_chest_network(SPEC, None, seed=1)
    assert origin == "random initialisation"
    net.eval().train()  # as SupervisedTrainer does before every step
    assert net.training
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert all(getattr(m, "drop_rate", 0.0) == 0.0 for m in net.modules())
    before = norms[0].running_mean.clone()
    net(torch.randn(2, 1, 224, 224) * 500).sum().backward()
    torch.testing.assert_close(norms[0].running_mean, before, rtol=0, atol=0)
    assert norms[0].weight.grad is not None  # scale and shift still learn


def test_samples_depend_only_on_seed_epoch_and_index(items: list[dict[str, Any]]) -> None:
    a = ChestSamples(items, seed=5, samples=8, augmentation=chest_augmentation(affine_prob=1.0))
    b = ChestSamples(items, seed=5, samples=8, augmentation=chest_augmentation(affine_prob=1.0))
    b.set_epoch(3)
    b.set_epoch(0)
    forward = [a[i] for i in range(8)]
    backward = [b[i] for i in reversed(range(8))][::-1]
    for x, y in zip(forward, backward, strict=True):
        torch.testing.assert_close(x[IMAGE], y[IMAGE], rtol=0, atol=0)
        torch.testing.assert_close(x[LABEL], y[LABEL], rtol=0, atol=0)
    assert forward[0][IMAGE].shape == (1, 224, 224) and forward[0][IMAGE].dtype == torch.float32
    assert type(forward[0][IMAGE]) is torch.Tensor
    # Every radiograph once in each run of four items; labels travel with their image.
    assert sorted(a.source(i) for i in range(4)) == [0, 1, 2, 3]
    for i in range(8):
        source = items[a.source(i)]
        assert torch.equal(forward[i][LABEL], source[LABEL])
        assert torch.equal(forward[i][LABEL_MASK], source[LABEL_MASK])
    b.set_epoch(1)
    assert not all(torch.equal(b[i][IMAGE], forward[i][IMAGE]) for i in range(8))


def test_load_records_the_hash_of_an_unpinned_file_on_first_use(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    sha = write_chest_weights(mirror, seed=0)
    store = ModelStore(tmp_path / "cache", mirror, allow_download=False)
    net, origin = load_chest_network(SPEC, store, seed=0)
    assert store.expected_sha256(SPEC.name, SPEC.weights[0]) == (sha, "first download")
    assert sha[:12] in origin
    reference = chest.build_network(
        SPEC, chest.read_state_dict((mirror / SPEC.name / FILENAME).read_bytes())
    )
    for key, value in reference.state_dict().items():
        assert torch.equal(bare_network(net).state_dict()[key], value), key


# --------------------------------------------------------------------------------------------
# Training


def test_fine_tuning_changes_the_weights_with_a_finite_loss(
    items: list[dict[str, Any]], store: ModelStore, tmp_path: Path
) -> None:
    net, origin = load_chest_network(SPEC, store, seed=0)
    assert FILENAME in origin
    before = _state(net)
    result = _fit(net, items, tmp_path / "ckpt", steps=2)
    assert result.steps == 2 and len(result.losses) == 2
    assert all(np.isfinite(result.losses))
    after = _state(net)
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert not torch.equal(after["features.conv0.weight"], before["features.conv0.weight"])
    # Batch-norm statistics are as published.
    assert torch.equal(after["features.norm5.running_var"], before["features.norm5.running_var"])
    assert result.checkpoint is not None and result.checkpoint.is_file()


def test_same_seed_same_weights(items: list[dict[str, Any]], tmp_path: Path) -> None:
    states = []
    for run in ("a", "b"):
        net, _ = load_chest_network(SPEC, None, seed=3)
        _fit(net, items, tmp_path / run, steps=2)
        states.append(_state(net))
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_resumed_run_reaches_the_weights_of_a_straight_run(
    items: list[dict[str, Any]], tmp_path: Path
) -> None:
    # One step per epoch (two samples, batch two): the resume is at an epoch boundary.
    straight, _ = load_chest_network(SPEC, None, seed=3)
    _fit(straight, items, tmp_path / "straight", steps=2, samples=2)

    first, _ = load_chest_network(SPEC, None, seed=3)
    _fit(first, items, tmp_path / "resumed", steps=1, samples=2)
    again, _ = load_chest_network(SPEC, None, seed=3)
    result = _fit(again, items, tmp_path / "resumed", steps=2, samples=2, resume=True)
    assert result.steps == 2 and len(result.losses) == 1
    expected = _state(straight)
    for key, value in _state(again).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


_WORKER = """
import sys
from pathlib import Path

import torch

from training.data.dataset import read_dataset
from training.data.samples import chest_augmentation, chest_dataset
from training.fit.chest import (
    ChestSamples, chest_loss, load_chest_network, prepare_chest_batch, save_chest_weights,
)
from training.fit.engine import Distributed, run_training
from triage.models.catalog import builtin_spec

spec = builtin_spec("xrv-densenet121-res224-all")
dataset_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
ds = chest_dataset(read_dataset(dataset_dir).studies, spec)
items = [ds[i] for i in range(len(ds))]
device = torch.device("cpu")
parallel = Distributed.from_environment(device)
net, _ = load_chest_network(spec, None, seed=3)
run_training(
    network=net,
    dataset=ChestSamples(items, seed=7, samples=4, augmentation=chest_augmentation()),
    loss_function=chest_loss(),
    optimizer_factory=lambda params: torch.optim.SGD(params, lr=1e-3),
    steps=2,
    batch_size=2,
    device=device,
    parallel=parallel,
    seed=7,
    checkpoint_dir=out / "ckpt",
    checkpoint_every=2,
    resume=False,
    amp=False,
    prepare_batch=prepare_chest_batch,
)
if parallel.main:
    save_chest_weights(net, out / "weights.pt")
parallel.close()
"""


@pytest.mark.slow
def test_two_torchrun_processes_give_the_weights_of_one(
    items: list[dict[str, Any]], dataset_dir: Path, tmp_path: Path
) -> None:
    one, _ = load_chest_network(SPEC, None, seed=3)
    _fit(one, items, tmp_path / "one", steps=2, optimizer="sgd")

    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(script),
            str(dataset_dir),
            str(tmp_path / "two"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    start = _state(load_chest_network(SPEC, None, seed=3)[0])
    # The random-weight network on raw [-1024, 1024] input has large gradients: compare each
    # tensor's change from the start, to a tolerance relative to the largest change (the two
    # runs sum the gradients in different orders).
    for key, value in _state(one).items():
        if not value.is_floating_point():
            continue
        change_one, change_two = value - start[key], two[key] - start[key]
        error = float((change_two - change_one).abs().max())
        scale = float(change_one.abs().max())
        assert error <= 1e-4 * scale + 1e-9, f"{key}: {error:.3g} of a change {scale:.3g}"
    assert not torch.equal(two["classifier.weight"], start["classifier.weight"])


# --------------------------------------------------------------------------------------------
# Serving


def test_serving_loads_the_fine_tuned_weights(
    items: list[dict[str, Any]], dataset_dir: Path, tmp_path: Path
) -> None:
    net, _ = load_chest_network(SPEC, None, seed=2)
    _fit(net, items, tmp_path / "ckpt", steps=1, samples=2)
    mirror = tmp_path / "mirror"
    sha = save_chest_weights(net, mirror / SPEC.name / FILENAME)
    artifact = dataclasses.replace(SPEC.weights[0], sha256=sha)
    spec: ModelSpec = dataclasses.replace(SPEC, version="1.0.1", weights=(artifact,))
    assert spec.weights == (WeightArtifact(FILENAME, SPEC.weights[0].url, sha),)

    store = ModelStore(tmp_path / "cache", mirror, allow_download=False)
    model = chest.build(spec, RuntimeOptions(store=store, device="cpu"))
    radiograph = sorted((dataset_dir / "dicom").rglob("*.dcm"))[0]
    prepared = model.prepare([radiograph])
    raw = model.predict(prepared)
    assert model.weights_sha256() == (sha,)

    bare = bare_network(net).eval()
    with torch.no_grad():
        logits = bare(torch.from_numpy(prepared.x))
    np.testing.assert_allclose(raw.probability, torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)
    assert raw.score.shape == (1, len(SPEC.outputs)) and np.isfinite(raw.score).all()
