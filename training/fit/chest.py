"""Fine-tuning the chest radiograph classifier (TorchXRayVision DenseNet-121) from study labels.

Starts from the spec's published weight file (read through the model store, verified, and
loaded by serving's own :func:`triage.models.chest.read_state_dict` and
:func:`~triage.models.chest.build_network`), trains on the serving preprocessing's output
(:func:`training.data.samples.chest_dataset`: float32 (1, 224, 224) in [-1024, 1024], built by
the chest model's ``prepare``) and writes a state dict that serving loads unchanged.

Targets are study labels per model output with a mask of the outputs the study is labelled
for (:data:`~training.data.samples.LABEL` and :data:`~training.data.samples.LABEL_MASK`); the
loss is binary cross-entropy with logits over the labelled outputs only, so the unlabelled
outputs of the 18 keep what the published network learnt as far as the shared features allow.

Logits, not scores: ``build_network`` builds the network with ``apply_sigmoid=False`` and no
``op_threshs`` buffer, so its forward pass returns the classifier's logits (N, 18) and training
runs on those. Serving then takes ``sigmoid(logit)`` as the probability and maps it with
TorchXRayVision's calibrated operating points (``op_norm`` with the spec's
``params.op_threshs``) so that each output's operating point becomes 0.5: the finding's
score. Fine-tuning moves the logits, so the published ``op_threshs``, which stay in the spec
as they are, no longer sit at the fine-tuned network's operating points; they must be
recalibrated on validation data (a new spec version) before the calibrated scores mean what
they did.

Batch-norm statistics stay as published (every BatchNorm module is kept in eval mode while
the rest trains; its scale and shift still learn) and dropout is off
(:class:`FrozenStatistics`). Small batches cannot estimate batch statistics, and with both
frozen each sample's gradient depends on that sample only, so a step on a batch of B equals
``torchrun --nproc_per_node W`` processes of B/W each (see :mod:`training.fit.engine`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch import nn

from training.data.samples import IMAGE, LABEL, LABEL_MASK, seed_for
from training.fit.engine import weights_file
from triage.models.chest import build_network, read_state_dict
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

__all__ = [
    "FrozenStatistics",
    "ChestSamples",
    "bare_network",
    "chest_loss",
    "load_chest_network",
    "masked_bce_with_logits",
    "prepare_chest_batch",
    "save_chest_weights",
]

#: The batch's target: (N, 2, outputs), [:, 0] the 0/1 labels and [:, 1] the label mask.
TARGET_LABEL = 0
TARGET_MASK = 1


class FrozenStatistics(nn.Module):
    """The chest network for fine-tuning: batch norm normalises with the published running
    statistics (its modules stay in eval mode whatever :meth:`train` is told; their scale and
    shift still learn) and dropout is off.

    MONAI's ``SupervisedTrainer`` calls ``network.train()`` before every step, so freezing
    the statistics once would not last: this wrapper re-applies it on every ``train``.
    Forward returns the wrapped network's output: logits (N, outputs).

    Args:
        network: TorchXRayVision's DenseNet as :func:`triage.models.chest.build_network`
            builds it (``apply_sigmoid=False``, no ``op_threshs``).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        for module in network.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if hasattr(module, "drop_rate"):  # TorchXRayVision's _DenseLayer (F.dropout)
                setattr(module, "drop_rate", 0.0)  # noqa: B010 (a plain attribute, not typed)
        self.train()

    def train(self, mode: bool = True) -> FrozenStatistics:
        super().train(mode)
        for module in self.network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``: float32 (N, 1, 224, 224) in [-1024, 1024] -> (N, outputs)."""
        out: torch.Tensor = self.network(x)
        return out


def bare_network(network: nn.Module) -> nn.Module:
    """The TorchXRayVision network inside ``network`` (unwraps DDP and
    :class:`FrozenStatistics`)."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, FrozenStatistics):
        network = network.network
    return network


def load_chest_network(
    spec: ModelSpec, store: ModelStore | None, *, seed: int
) -> tuple[FrozenStatistics, str]:
    """A network to fine-tune: the spec's published weight file read from ``store`` (sha256
    verified: the spec publishes none, so the site's pin or the hash recorded at the first
    download, which is taken only once the file loads as this network), or, with no store,
    freshly initialised from ``seed`` (training from scratch; tests).

    Returns:
        The network (train mode, statistics frozen, dropout off) and where it came from.

    Raises:
        ModelWeightsError: the file is unavailable, fails verification or does not fit.
    """
    torch.manual_seed(seed)
    if store is None:
        return FrozenStatistics(build_network(spec)), "random initialisation"
    artifact = spec.weights[0]

    def validate(path: Path) -> None:
        build_network(spec, read_state_dict(path.read_bytes()))

    data, sha256 = store.read_verified(spec.name, artifact, validate)
    net = build_network(spec, read_state_dict(data))
    return FrozenStatistics(net), f"{spec.name} ({artifact.filename}, sha256 {sha256[:12]})"


def save_chest_weights(network: nn.Module, path: Path) -> str:
    """Write the fine-tuned weights as serving reads them and return the file's sha256.

    The file is a plain state dict of the TorchXRayVision DenseNet (``torch.save`` of a
    tensor dict, loadable with ``weights_only=True``): ``read_state_dict`` accepts it as well
    as the published pickled module, and ``build_network`` loads it strictly (no
    ``op_threshs``: serving takes those from the spec). Serve it as the spec's weight file
    with this sha256 in the spec's ``weights[0].sha256``.

    Args:
        network: the fine-tuned network (:class:`FrozenStatistics`, DDP-wrapped or bare).
        path: where to write it (folders created; replaced atomically).
    """
    return weights_file(bare_network(network), path)


class ChestSamples:
    """Training samples of preprocessed radiographs; item ``i`` of epoch ``e`` depends only on
    ``(seed, e, i)``.

    Epoch ``e`` takes the radiographs in a random order (a fresh permutation every ``n``
    items, seeded by ``(seed, e, i // n)``) and, when given, augments item ``i`` with the
    transform seeded by :func:`training.data.samples.seed_for` ``(seed, e, i)``.

    Args:
        base: preprocessed chest samples (:func:`training.data.samples.chest_dataset`, or any
            sequence of its dicts): :data:`IMAGE` float32 (1, 224, 224) in [-1024, 1024],
            :data:`LABEL` and :data:`LABEL_MASK` float32 (outputs,).
        seed: the run's seed.
        samples: items per epoch (default: one per radiograph); make it a multiple of the
            batch size.
        augmentation: a MONAI transform of dicts with key :data:`IMAGE`
            (:func:`training.data.samples.chest_augmentation`), or None.
    """

    def __init__(
        self,
        base: Sequence[Mapping[str, Any]],
        *,
        seed: int,
        samples: int | None = None,
        augmentation: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    ) -> None:
        if len(base) == 0:
            raise ValueError("no training radiographs")
        self.base = base
        self.seed = int(seed)
        self.samples = len(base) if samples is None else int(samples)
        self.augmentation = augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples

    def source(self, index: int) -> int:
        """The radiograph (index into ``base``) item ``index`` of this epoch shows."""
        n = len(self.base)
        cycle, place = divmod(index, n)
        order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(n)
        return int(order[place])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.samples:
            raise IndexError(index)
        item = self.base[self.source(index)]
        image = torch.as_tensor(item[IMAGE], dtype=torch.float32)
        if self.augmentation is not None:
            transform = copy.deepcopy(self.augmentation)  # no state shared between threads
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=seed_for(self.seed, self.epoch, index))
            image = torch.as_tensor(transform({IMAGE: image})[IMAGE], dtype=torch.float32)
        return {
            IMAGE: image.as_subclass(torch.Tensor).contiguous(),
            LABEL: torch.as_tensor(item[LABEL], dtype=torch.float32),
            LABEL_MASK: torch.as_tensor(item[LABEL_MASK], dtype=torch.float32),
        }


def prepare_chest_batch(
    batchdata: dict[str, torch.Tensor], device: torch.device, non_blocking: bool = False, **_: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI ``prepare_batch``: (images (N, 1, 224, 224), targets (N, 2, outputs)) with the
    labels at ``[:, 0]`` and the label mask at ``[:, 1]``."""
    target = torch.stack([batchdata[LABEL], batchdata[LABEL_MASK]], dim=1)
    return (
        batchdata[IMAGE].to(device, non_blocking=non_blocking),
        target.to(device, non_blocking=non_blocking),
    )


def masked_bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits over the labelled outputs, a mean over samples.

    Each sample's loss is the mean over its labelled outputs (0 for a sample labelled for
    none); the batch's loss is the mean of those over the samples, so the gradient averaged
    over data-parallel processes equals the one-process gradient.

    Args:
        logits: (N, outputs), the network's pre-sigmoid output.
        target: (N, 2, outputs) as :func:`prepare_chest_batch` builds it: 0/1 labels and the
            1/0 label mask.

    Returns:
        A scalar float32 tensor.
    """
    logits = logits.float()
    labels = target[:, TARGET_LABEL].float()
    mask = target[:, TARGET_MASK].float()
    per_output = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    per_sample = (per_output * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return per_sample.mean()


def chest_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The fine-tuning loss for ``run_training``: :func:`masked_bce_with_logits`."""
    return masked_bce_with_logits
