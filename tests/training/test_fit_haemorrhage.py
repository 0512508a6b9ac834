"""Fine-tuning the haemorrhage network: patches, determinism, resume, serving loads the
result, and two torchrun (gloo) processes train the same weights as one."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from training.candidate import candidate_spec, read_candidate, write_candidate
from training.fit.engine import Distributed, run_training, weights_file
from training.fit.haemorrhage import (
    IMAGE,
    LABEL,
    PATCH_OUT,
    HaemorrhagePatches,
    Volume,
    load_member,
    patch_loss,
    prepare_patch_batch,
)
from triage.models.catalog import load_specs
from triage.models.deepmedic import CONTEXT_VOXELS
from triage.models.haemorrhage import HaemorrhageModel
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def _spec() -> ModelSpec:
    return next(s for s in load_specs(None, []) if s.name == "blast-ct-v1")


def _volumes(seed: int = 0) -> list[Volume]:
    """Two small volumes: noise around brain density with a 'bleed' cube at 65 HU."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(2):
        hu = rng.normal(30, 8, (45, 50, 50)).astype(np.float32)
        label = np.zeros(hu.shape, np.uint8)
        label[15 + i : 25 + i, 20:30, 20:30] = 1
        hu[label > 0] = 65
        out.append(Volume(hu, label))
    return out


def _fit(net: torch.nn.Module, out: Path, *, steps: int, resume: bool = False) -> list[float]:
    patches = HaemorrhagePatches(_volumes(), samples=2, seed=4, value_range=(-15.0, 100.0))
    result = run_training(
        network=net,
        dataset=patches,
        loss_function=patch_loss(5),
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3),
        steps=steps,
        batch_size=2,
        device=CPU,
        parallel=Distributed(),
        seed=4,
        checkpoint_dir=out,
        checkpoint_every=1,
        resume=resume,
        amp=False,
        prepare_batch=prepare_patch_batch,
    )
    return result.losses


def test_patches_depend_only_on_seed_epoch_and_index() -> None:
    a = HaemorrhagePatches(_volumes(), samples=6, seed=1, value_range=(-15.0, 100.0))
    b = HaemorrhagePatches(_volumes(), samples=6, seed=1, value_range=(-15.0, 100.0))
    side = PATCH_OUT + 2 * CONTEXT_VOXELS
    backwards = [b[i] for i in reversed(range(6))][::-1]
    for i in range(6):
        x, y = a[i], backwards[i]
        assert x[IMAGE].shape == (1, side, side, side)
        assert x[LABEL].shape == (1, PATCH_OUT, PATCH_OUT, PATCH_OUT)
        assert torch.equal(x[IMAGE], y[IMAGE]) and torch.equal(x[LABEL], y[LABEL])
        # Normalised as serving does: the HU window onto [-1, 1], padding -1.
        assert float(x[IMAGE].min()) >= -1.0 and float(x[IMAGE].max()) <= 1.0
    a.set_epoch(1)
    assert any(not torch.equal(a[i][IMAGE], b[i][IMAGE]) for i in range(6))
    # Patches centred on labelled voxels carry the label.
    assert any(int(a[i][LABEL].sum()) > 0 for i in range(6))


def test_same_seed_gives_the_same_weights_and_resume_repeats_a_straight_run(
    tmp_path: Path,
) -> None:
    spec = _spec()
    straight, _ = load_member(spec, None, None, seed=2)
    losses = _fit(straight, tmp_path / "a", steps=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
    again, _ = load_member(spec, None, None, seed=2)
    _fit(again, tmp_path / "b", steps=2)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    first, _ = load_member(spec, None, None, seed=2)
    _fit(first, tmp_path / "c", steps=1)
    resumed, _ = load_member(spec, None, None, seed=99)  # overwritten by the checkpoint
    _fit(resumed, tmp_path / "c", steps=2, resume=True)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    net, _ = load_member(_spec(), None, None, seed=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _fit(net, tmp_path / "empty", steps=1, resume=True)


@pytest.mark.realdata
def test_fine_tuned_weights_load_in_serving_with_their_sha256(
    tmp_path: Path, weights_mirror: Path
) -> None:
    spec = _spec()
    store = ModelStore(tmp_path / "cache", mirror=weights_mirror)
    net, origin = load_member(spec, store, None, seed=0)
    assert "member 7" in origin  # the spec's preferred member
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _fit(net, tmp_path / "ckpt", steps=1)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("conv.weight") for k in changed)
    # Batch-norm statistics stay as published (frozen for fine-tuning).
    assert all("running" not in k for k in changed)
    sha = weights_file(net, tmp_path / "w.pt")
    cand = candidate_spec(spec, version="1.0.0-ft.test", weights=[("ft.pt", sha)])
    write_candidate(cand, {"ft.pt": tmp_path / "w.pt"}, tmp_path / "candidate")
    read_spec, read_store = read_candidate(tmp_path / "candidate")
    model = HaemorrhageModel(read_store, spec=read_spec, members=1, device="cpu")
    model.load()  # strict state dict, sha256 verified
    assert model.weights_sha256() == (sha,)
    # A file changed after the spec was written is refused.
    (tmp_path / "candidate" / "weights" / spec.name / "ft.pt").write_bytes(b"not weights")
    bad = HaemorrhageModel(
        ModelStore(tmp_path / "cache2", mirror=tmp_path / "candidate" / "weights"),
        spec=dataclasses.replace(read_spec),
        members=1,
        device="cpu",
    )
    with pytest.raises(Exception, match="sha256"):
        bad.load()


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from tests.training.test_fit_haemorrhage import _spec, _volumes
    from training.fit.engine import Distributed, run_training, weights_file
    from training.fit.haemorrhage import (
        HaemorrhagePatches, load_member, patch_loss, prepare_patch_batch,
    )
    out = Path(sys.argv[1])
    parallel = Distributed.from_environment(torch.device("cpu"))
    net, _ = load_member(_spec(), None, None, seed=2)
    run_training(
        network=net,
        dataset=HaemorrhagePatches(_volumes(), samples=4, seed=4, value_range=(-15.0, 100.0)),
        loss_function=patch_loss(5),
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3),
        steps=4, batch_size=2, device=torch.device("cpu"), parallel=parallel, seed=4,
        checkpoint_dir=out / "ckpt", checkpoint_every=2, resume=False, amp=False,
        prepare_batch=prepare_patch_batch,
    )
    if parallel.main:
        weights_file(net, out / "weights.pt")
    parallel.close()
    """
)


@pytest.mark.slow
def test_two_torchrun_processes_train_the_same_weights_as_one(tmp_path: Path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, str(script), str(one), str(REPO)], check=True, env=env, timeout=600
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(two), str(REPO)],
        check=True,
        env=env,
        timeout=600,
    )
    a = torch.load(one / "weights.pt", weights_only=True)
    b = torch.load(two / "weights.pt", weights_only=True)
    start, _ = load_member(_spec(), None, None, seed=2)
    init = start.state_dict()
    for k in a:
        moved = float((a[k].float() - init[k].float()).abs().max())
        diff = float((a[k].float() - b[k].float()).abs().max())
        # Float sums in another order: far below one step of the learning rate (1e-3).
        assert diff <= 1e-5 + 1e-3 * moved, (k, diff, moved)
    assert any(float((a[k].float() - init[k].float()).abs().max()) > 0 for k in a)
