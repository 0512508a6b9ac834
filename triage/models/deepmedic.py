"""A DeepMedic-style multi-scale 3D CNN matching the BLAST-CT v1 state dicts.

This is an independent implementation of the network described in
``docs/models/blast-ct-v1.md`` (Kamnitsas et al., Medical Image Analysis 2017; as trained by
Monteiro et al., Lancet Digital Health 2020). Parameter names match the published
``state_dict`` files exactly, so they load with ``strict=True``:

- ``path(5, 5, 5)0``, ``path(3, 3, 3)1``, ``path(1, 1, 1)2``: three pathways, each an
  ``nn.Sequential`` called ``path`` whose index 0 is the sub-sampling and index 9 the
  up-sampling (both without weights) and 1..8 are pre-activation blocks;
- ``fully_connected.0`` .. ``fully_connected.2``: the 1x1x1 head, 150 -> 250 -> 250 -> 5.

Geometry (per axis). All convolutions are "valid", so the network maps an input tile of
``n + 80`` voxels to an output tile of ``n`` voxels, ``n`` a multiple of 5; output voxel ``k``
is centred on input voxel ``k + 40``. A pathway with sub-sampling factor ``s`` computes its
features on a coarse grid of voxel centres spaced ``s`` apart and repeats each coarse value
over the ``s`` output voxels centred on it (nearest-neighbour up-sampling).

The phase of that coarse grid is fixed in *absolute* output coordinates: coarse centres lie
at ``k_abs % s == s // 2``, where ``k_abs = origin + k`` and ``origin`` is the absolute
position of the tile's first output voxel. With this convention, inference over tiles gives
the same result as inference over the whole volume (up to float rounding), as long as tile
origins are multiples of 5. For tiles at origin 0 with 30 output voxels (the 110-voxel input
patches of the upstream project) the grid is identical to the upstream one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

SCALE_FACTORS: tuple[int, ...] = (5, 3, 1)
FEATURE_MAPS: tuple[int, ...] = (30, 30, 40, 40, 40, 40, 50, 50)
FULLY_CONNECTED: tuple[int, ...] = (250, 250)
DROPOUT: tuple[float, ...] = (0.0, 0.5, 0.5)
NUM_CLASSES = 5

#: Context (input voxels per side) the network needs around each output voxel.
CONTEXT_VOXELS = 40
#: Output tile sides must be multiples of this (the coarsest sub-sampling factor).
TILE_MULTIPLE = 5
#: Head output rows processed at once (bounds the memory of the 250-channel layers).
_HEAD_CHUNK_VOXELS = 1 << 17


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 5 and not x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


class PreActBlock(nn.Module):
    """BatchNorm3d -> Dropout -> PReLU (one slope) -> Conv3d (valid, no bias) [+ residual].

    When the input and output channel counts are equal, the input centre-cropped by
    ``kernel_size // 2`` voxels per side is added to the convolution output.

    In eval mode batch norm and PReLU are applied as one fused per-channel affine map and an
    in-place leaky ReLU, which gives the same values with less memory traffic.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # Registration order bn, conv, dropout, prelu gives the published key order.
        self.bn = nn.BatchNorm3d(in_channels)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=kernel_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.prelu = nn.PReLU(num_parameters=1)
        self.kernel_size = kernel_size
        self.residual = in_channels == out_channels
        #: Training with the published batch-norm statistics (see
        #: :meth:`DeepMedic.freeze_statistics`).
        self.frozen_statistics = False

    def preactivation(
        self, x: torch.Tensor, channel_dim: int = 1, inplace: bool = False
    ) -> torch.Tensor:
        """BatchNorm + PReLU of ``x`` (channels on ``channel_dim``), in ``x.dtype``.

        With ``inplace`` (eval mode only) the result is written into ``x``.
        """
        bn = self.bn
        if self.training and self.frozen_statistics:
            if channel_dim != 1:
                return self.preactivation(x.movedim(channel_dim, 1)).movedim(1, channel_dim)
            out = F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
            return self.prelu(self.dropout(out))
        if self.training:
            if channel_dim != 1:
                return self.preactivation(x.movedim(channel_dim, 1)).movedim(1, channel_dim)
            momentum = bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average, as in nn.BatchNorm
                    momentum = 1.0 / float(bn.num_batches_tracked)
            # Functional batch norm: also accepts (V, C) rows, unlike BatchNorm3d.
            out = F.batch_norm(
                x,
                bn.running_mean,
                bn.running_var,
                bn.weight,
                bn.bias,
                True,
                momentum if momentum is not None else 0.0,
                bn.eps,
            )
            return self.prelu(self.dropout(out))
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        shift = bn.bias.float() - bn.running_mean.float() * scale
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        scale = scale.to(x.dtype).view(shape)
        shift = shift.to(x.dtype).view(shape)
        out = torch.addcmul(shift, x, scale, out=x) if inplace else torch.addcmul(shift, x, scale)
        return F.leaky_relu_(out, float(self.prelu.weight.reshape(-1)[0]))

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """Apply the block.

        Args:
            x: features, shape (N, C_in, D, H, W).
            consume: the caller no longer needs ``x``; in eval mode a block without a
                residual connection may then overwrite it (saves memory and time).

        Returns:
            Shape (N, C_out, D - k + 1, H - k + 1, W - k + 1), same dtype.
        """
        inplace = consume and not self.residual and not self.training
        out = self.conv(_to_channels_last(self.preactivation(x, inplace=inplace)))
        if self.residual:
            c = self.kernel_size // 2
            shortcut = x[..., c : x.shape[-3] - c, c : x.shape[-2] - c, c : x.shape[-1] - c]
            out = out + shortcut if self.training else out.add_(shortcut)
        return out

    def forward_rows(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """Apply a 1x1x1 block to feature rows.

        Args:
            x: features, shape (V, C_in) (voxels as rows).
            consume: as in :meth:`forward`.

        Returns:
            Shape (V, C_out).
        """
        if self.kernel_size != 1:
            raise ValueError("forward_rows needs a 1x1x1 block")
        weight = self.conv.weight.reshape(self.conv.out_channels, self.conv.in_channels)
        inplace = consume and not self.residual and not self.training
        out = F.linear(self.preactivation(x, inplace=inplace), weight.to(x.dtype))
        if self.residual:
            out = out + x if self.training else out.add_(x)
        return out


class _SubSample(nn.Module):
    """Placeholder for the strided sub-sampling (index 0 of a pathway; no weights).

    The slicing itself depends on the tile geometry and is done by :class:`Pathway`.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class _UpSample(_SubSample):
    """Placeholder for nearest-neighbour up-sampling (index 9 of a pathway; no weights)."""


def _coarse_grid(factor: int, out_size: int, origin: int, in_size: int) -> tuple[slice, int]:
    """Where a pathway samples its input and how its coarse output maps to output voxels.

    Args:
        factor: sub-sampling factor s of the pathway.
        out_size: output tile size n along this axis (voxels).
        origin: absolute output coordinate of the tile's first output voxel.
        in_size: input tile size along this axis (voxels); must be ``n + 80``.

    Returns:
        ``(input_slice, shift)``: the strided slice of the input tile to feed the pathway,
        and the shift (0 <= shift < s) such that output voxel k takes its value from coarse
        output voxel ``(k + shift) // s``.
    """
    half = factor // 2
    first = (half - origin) % factor  # first coarse centre at or after output voxel 0
    if first > half:  # output voxel 0 belongs to the centre before it
        first -= factor
    last = first + factor * ((out_size - 1 + half - first) // factor)
    reach = factor * (len(FEATURE_MAPS))  # 8 valid 3x3x3 convolutions at scale s
    start = first + CONTEXT_VOXELS - reach
    stop = last + CONTEXT_VOXELS + reach + 1
    if start < 0 or stop > in_size:
        raise ValueError(
            f"tile does not fit pathway s={factor}: output size {out_size} at origin "
            f"{origin} needs input [{start}, {stop}) of {in_size}; use output sizes and "
            f"origins that are multiples of {TILE_MULTIPLE}"
        )
    return slice(start, stop, factor), half - first


class Pathway(nn.Module):
    """One resolution pathway: sub-sample -> 8 pre-activation blocks -> (up-sample)."""

    def __init__(self, factor: int, in_channels: int, feature_maps: Sequence[int]) -> None:
        super().__init__()
        self.factor = factor
        layers: list[nn.Module] = [_SubSample(factor)]
        channels = [in_channels, *feature_maps]
        layers += [PreActBlock(channels[i], channels[i + 1]) for i in range(len(feature_maps))]
        layers.append(_UpSample(factor))
        self.path = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, out_size: Sequence[int], origin: Sequence[int]
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Compute the pathway's coarse features for one tile.

        Args:
            x: input tile, shape (N, C, D + 80, H + 80, W + 80).
            out_size: output tile size (D, H, W).
            origin: absolute output coordinates of the tile's first output voxel.

        Returns:
            ``(coarse, shift)``: coarse features, shape (N, C_out, d, h, w), and per axis
            the shift such that output voxel k takes coarse voxel ``(k + shift) // s``.
        """
        grids = [
            _coarse_grid(self.factor, n, o, i)
            for n, o, i in zip(out_size, origin, x.shape[2:], strict=True)
        ]
        index: tuple[Any, ...] = (..., *(g[0] for g in grids))
        out = x[index]
        for i, block in enumerate(list(self.path)[1:-1]):
            out = block(out, consume=i > 0)  # the first block reads a view of the input
        return out, tuple(g[1] for g in grids)

    def upsample(
        self, coarse: torch.Tensor, shift: Sequence[int], out_size: Sequence[int], z0: int, z1: int
    ) -> torch.Tensor:
        """Nearest-neighbour up-sampling of output slices ``z0:z1``, channels last.

        Args:
            coarse: coarse features from :meth:`forward`, shape (N, C, d, h, w).
            shift: the shifts from :meth:`forward`.
            out_size: output tile size (D, H, W).
            z0: first output slice.
            z1: end (exclusive) output slice.

        Returns:
            View of shape (N, z1 - z0, H, W, C).
        """
        s = self.factor
        _, height, width = out_size
        sz, sy, sx = shift
        if s == 1:
            part = coarse[:, :, z0:z1, :height, :width]
        else:
            c0, c1 = (z0 + sz) // s, (z1 - 1 + sz) // s + 1
            part = F.interpolate(coarse[:, :, c0:c1], scale_factor=float(s), mode="nearest")
            part = part[
                :, :, z0 + sz - c0 * s : z1 + sz - c0 * s, sy : sy + height, sx : sx + width
            ]
        return part.permute(0, 2, 3, 4, 1)


class DeepMedic(nn.Module):
    """Three-pathway DeepMedic (sub-sampling 5, 3, 1) with a 1x1x1 head.

    Input: one channel, intensities already normalised (BLAST-CT: HU clipped to
    [-15, 100] and mapped linearly to [-1, 1]), 1 mm isotropic, (z, y, x) order.
    Output: ``NUM_CLASSES`` logits per voxel.
    """

    def __init__(
        self,
        input_channels: int = 1,
        num_classes: int = NUM_CLASSES,
        scale_factors: Sequence[int] = SCALE_FACTORS,
        feature_maps: Sequence[int] = FEATURE_MAPS,
        fully_connected: Sequence[int] = FULLY_CONNECTED,
        dropout: Sequence[float] = DROPOUT,
    ) -> None:
        super().__init__()
        if list(scale_factors) != sorted(scale_factors, reverse=True):
            raise ValueError("scale factors must be in decreasing order")
        self.scale_factors = tuple(scale_factors)
        self.pathways: list[Pathway] = []
        for i, s in enumerate(scale_factors):
            pathway = Pathway(s, input_channels, feature_maps)
            # Upstream naming: "path" + str((s, s, s)) + str(index), e.g. "path(5, 5, 5)0".
            self.add_module(f"path{(s, s, s)}{i}", pathway)
            self.pathways.append(pathway)
        channels = [feature_maps[-1] * len(scale_factors), *fully_connected, num_classes]
        if len(dropout) != len(channels) - 1:
            raise ValueError("need one dropout probability per fully connected block")
        self.fully_connected = nn.Sequential(
            *(
                PreActBlock(channels[i], channels[i + 1], kernel_size=1, dropout=dropout[i])
                for i in range(len(channels) - 1)
            )
        )
        self.num_classes = num_classes

    def freeze_statistics(self, frozen: bool = True, *, dropout: bool = False) -> DeepMedic:
        """Fine-tuning mode: batch norm normalises with the running statistics (its scale and
        shift still learn, the statistics stay as trained) and, unless ``dropout``, dropout is
        off.

        Small fine-tuning batches (one or two patches) cannot estimate batch statistics, and
        with both frozen a step on a batch of two patches equals two data-parallel processes
        of one patch each (the gradient is the same mean), which is what makes training with
        ``torchrun`` reproduce a one-process run. Takes effect in train mode; eval mode is
        unchanged.
        """
        for module in self.modules():
            if isinstance(module, PreActBlock):
                module.frozen_statistics = frozen
                module.dropout.p = module.dropout.p if dropout else 0.0
        return self

    @staticmethod
    def output_size(input_size: Sequence[int]) -> tuple[int, ...]:
        """Output tile size for an input tile size (each axis minus 2 x 40 voxels)."""
        return tuple(int(i) - 2 * CONTEXT_VOXELS for i in input_size)

    @staticmethod
    def input_size(output_size: Sequence[int]) -> tuple[int, ...]:
        """Input tile size needed for an output tile size (each axis plus 2 x 40 voxels)."""
        return tuple(int(o) + 2 * CONTEXT_VOXELS for o in output_size)

    def forward(self, x: torch.Tensor, origin: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
        """Segment one tile.

        Args:
            x: normalised input, shape (N, 1, D + 80, H + 80, W + 80), float (the dtype of
                the convolution weights). D, H, W must be multiples of 5.
            origin: absolute output coordinates (z, y, x) of the tile's first output voxel
                (= absolute input coordinate of its centre voxel minus 40); multiples of 5.
                Only needed when tiles are combined: it fixes the phase of the coarse
                grids so that tiles agree with whole-volume inference.

        Returns:
            Logits, shape (N, 5, D, H, W), dtype of ``x``. Output voxel (i, j, k)
            corresponds to input voxel (i + 40, j + 40, k + 40).
        """
        if x.dim() != 5:
            raise ValueError(f"expected (N, C, D, H, W) input, got shape {tuple(x.shape)}")
        out_size = self.output_size(x.shape[2:])
        if any(n <= 0 for n in out_size):
            raise ValueError(f"input {tuple(x.shape[2:])} is smaller than the 81-voxel context")
        x = _to_channels_last(x)
        features = [p(x, out_size, origin) for p in self.pathways]
        n = x.shape[0]
        d, h, w = out_size
        widths = [f.shape[1] for f, _ in features]
        out = x.new_empty((n, d, h, w, self.num_classes))
        chunk = max(1, _HEAD_CHUNK_VOXELS // (h * w))
        for z0 in range(0, d, chunk):
            z1 = min(d, z0 + chunk)
            rows = x.new_empty((n, z1 - z0, h, w, sum(widths)))
            start = 0
            for pathway, (coarse, shift), width in zip(
                self.pathways, features, widths, strict=True
            ):
                rows[..., start : start + width] = pathway.upsample(coarse, shift, out_size, z0, z1)
                start += width
            flat = rows.view(-1, start)
            for block in self.fully_connected:
                flat = cast(PreActBlock, block).forward_rows(flat, consume=True)
            out[:, z0:z1] = flat.view(n, z1 - z0, h, w, self.num_classes)
        return out.permute(0, 4, 1, 2, 3)
