"""The DeepMedic network: state-dict layout, reference semantics, tiling invariance."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from triage.models.deepmedic import CONTEXT_VOXELS, DeepMedic, PreActBlock


def _random_net(seed: int = 0) -> DeepMedic:
    """A narrow DeepMedic (same geometry, fewer channels, so tests stay fast) with random
    weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = DeepMedic(feature_maps=(4, 4, 6, 6, 6, 6, 8, 8), fully_connected=(12, 12))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.3)
    return net.eval()


def test_state_dict_layout_without_files() -> None:
    state = DeepMedic().state_dict()
    assert len(state) == 189
    assert state["path(5, 5, 5)0.path.1.bn.weight"].shape == (1,)
    assert state["path(5, 5, 5)0.path.1.conv.weight"].shape == (30, 1, 3, 3, 3)
    assert state["path(3, 3, 3)1.path.8.conv.weight"].shape == (50, 50, 3, 3, 3)
    assert state["path(1, 1, 1)2.path.5.prelu.weight"].shape == (1,)
    assert state["fully_connected.0.conv.weight"].shape == (250, 150, 1, 1, 1)
    assert state["fully_connected.2.conv.weight"].shape == (5, 250, 1, 1, 1)
    n_params = sum(p.numel() for p in DeepMedic().parameters())
    assert 0.9e6 < n_params < 1.1e6


def test_pretrained_state_dict_loads_strictly(weights_mirror: Path) -> None:
    path = weights_mirror / "blast-ct-v1" / "model_1.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = DeepMedic()
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = net.state_dict()
    assert list(ours) == list(state)
    assert all(ours[k].shape == v.shape for k, v in state.items())


def _crop_center(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return x[
        (
            ...,
            *(
                slice(c // 2 - s // 2, c // 2 - s // 2 + s)
                for c, s in zip(x.shape[2:], size, strict=True)
            ),
        )
    ]


def _block_reference(block: PreActBlock, x: torch.Tensor) -> torch.Tensor:
    bn = block.bn
    out = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    out = block.conv(F.prelu(out, block.prelu.weight))
    if block.residual:
        c = block.kernel_size // 2
        out = out + (x[..., c:-c, c:-c, c:-c] if c else x)
    return out


def _reference_forward(net: DeepMedic, x: torch.Tensor) -> torch.Tensor:
    """A direct reading of the architecture: centre crops, strided sub-sampling,
    F.interpolate up-sampling (the sizes of the upstream implementation)."""
    out_size = tuple(5 * (i // 5 - 16) for i in x.shape[2:])
    features = []
    for pathway in net.pathways:
        s = pathway.factor
        in_size = tuple(s * (-(-o // s) + 16) for o in out_size)
        out = _crop_center(x, in_size)[..., s // 2 :: s, s // 2 :: s, s // 2 :: s]
        for block in list(pathway.path)[1:-1]:
            out = _block_reference(block, out)
        out = F.interpolate(out, scale_factor=s, mode="nearest")
        features.append(_crop_center(out, out_size))
    out = torch.cat(features, dim=1)
    for block in net.fully_connected:
        out = _block_reference(block, out)
    return out


def test_matches_reference_semantics() -> None:
    net = _random_net()
    torch.manual_seed(1)
    with torch.inference_mode():
        # Output sides that are multiples of 15: the coarse grids coincide at origin 0.
        x = torch.rand(1, 1, 110, 95, 125) * 2 - 1
        ours, ref = net(x), _reference_forward(net, x)
        assert ours.shape == ref.shape == (1, 5, 30, 15, 45)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
        # A 40-voxel output has its 3-grid shifted by one voxel: origin 10 reproduces it.
        x = torch.rand(1, 1, 120, 120, 120) * 2 - 1
        ours, ref = net(x, origin=(10, 10, 10)), _reference_forward(net, x)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_tiled_inference_equals_whole_volume() -> None:
    net = _random_net()
    out_size = (20, 25, 30)
    tile = (10, 5, 15)
    torch.manual_seed(2)
    x = torch.rand(1, 1, *(o + 2 * CONTEXT_VOXELS for o in out_size)) * 2 - 1
    with torch.inference_mode():
        whole = net(x)
        tiled = torch.empty_like(whole)
        unaligned = torch.empty_like(whole)
        for origin in itertools.product(
            *(range(0, o, t) for o, t in zip(out_size, tile, strict=True))
        ):
            window = tuple(
                slice(o, o + t + 2 * CONTEXT_VOXELS) for o, t in zip(origin, tile, strict=True)
            )
            region = tuple(slice(o, o + t) for o, t in zip(origin, tile, strict=True))
            tiled[(..., *region)] = net(x[(..., *window)], origin=origin)
            unaligned[(..., *region)] = net(x[(..., *window)])
    scale = whole.abs().max()
    assert (tiled - whole).abs().max() <= 1e-4 * scale
    # Without the origin the 3-voxel grids of the tiles disagree with the whole volume:
    # the test is sensitive to the alignment it checks.
    assert (unaligned - whole).abs().max() > 1e-3 * scale


def test_output_geometry_and_errors() -> None:
    net = _random_net()
    assert DeepMedic.input_size((40, 80, 80)) == (120, 160, 160)
    assert DeepMedic.output_size((120, 160, 160)) == (40, 80, 80)
    with torch.inference_mode():
        out = net(torch.zeros(2, 1, 85, 90, 95))
        assert out.shape == (2, 5, 5, 10, 15)
        with pytest.raises(ValueError, match="context"):
            net(torch.zeros(1, 1, 80, 90, 90))
        with pytest.raises(ValueError, match="multiples of 5"):
            net(torch.zeros(1, 1, 87, 90, 90))
        with pytest.raises(ValueError, match="multiples of 5"):
            net(torch.zeros(1, 1, 85, 90, 90), origin=(1, 0, 0))


def test_train_mode_runs_and_backpropagates() -> None:
    net = _random_net().train()
    x = torch.rand(2, 1, 85, 85, 85) * 2 - 1
    out = net(x)
    out.float().mean().backward()
    assert net.fully_connected[0].conv.weight.grad is not None
