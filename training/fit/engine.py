"""The training loop every task shares: MONAI's ``SupervisedTrainer`` (on ignite) with
seeding, data-parallel processes (``torchrun``: DDP on gloo for CPU, NCCL for CUDA),
checkpoints to resume from, mixed precision on CUDA and the loss logged to MLflow.

Reproducibility: the step-``k`` batch is the same whatever the number of processes. The
dataset's item ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` (see
:class:`EpochSeeded`); one process takes items ``k*B .. k*B+B-1`` at step ``k``, and with
``W`` processes rank ``r`` takes ``B/W`` of them (a ``DistributedSampler`` without
shuffling over a dataset already in its epoch's order). The loss is a mean over samples, so
the averaged gradient of ``W`` processes equals the one-process gradient.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

__all__ = [
    "Distributed",
    "EpochSeeded",
    "TrainResult",
    "item_rng",
    "run_training",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device) and make cuDNN deterministic (MONAI's
    ``set_determinism``)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed % (2**32))


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of dataset item ``index`` in ``epoch`` (the same in every
    process)."""
    return np.random.default_rng([seed, epoch, index])


class EpochSeeded(Protocol):
    """A dataset whose items depend on the epoch (set before each epoch)."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Distributed:
    """This process's place among the data-parallel processes (one when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else one
        process. gloo on CPU, NCCL on CUDA."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: optimiser steps taken in total (including those before a resume).
        losses: the loss of every step this run took (this process's batch).
        samples_per_s: training samples per second over this run (all processes).
        checkpoint: the last checkpoint written (main process), if any.
    """

    steps: int
    losses: list[float]
    samples_per_s: float
    checkpoint: Path | None


def _latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_training(
    *,
    network: nn.Module,
    dataset: EpochSeeded,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
    steps: int,
    batch_size: int,
    device: torch.device,
    parallel: Distributed,
    seed: int,
    checkpoint_dir: Path,
    checkpoint_every: int,
    resume: bool,
    amp: bool,
    prepare_batch: Callable[..., Any],
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``network`` for ``steps`` optimiser steps with MONAI's ``SupervisedTrainer``.

    Args:
        network: the network (on CPU; moved to ``device``); wrapped in DDP when distributed.
        dataset: items as dicts; its length, the samples of one epoch, must be
            ``checkpoint_every * batch_size``.
        loss_function: mean over samples (so that data-parallel gradients add up).
        optimizer_factory: parameters -> optimiser.
        steps: total optimiser steps, rounded up to whole checkpoint intervals (a resumed
            run continues to this number).
        batch_size: samples per step over all processes (divisible by the world size).
        device: where to train.
        parallel: the data-parallel processes.
        seed: the run's seed.
        checkpoint_dir: where checkpoints go (network, optimiser, trainer state).
        checkpoint_every: steps per epoch; a checkpoint is written at every epoch's end.
        resume: continue from the latest checkpoint in ``checkpoint_dir``.
        amp: mixed precision (CUDA only).
        prepare_batch: MONAI ``prepare_batch`` callable (batch, device, non_blocking) ->
            (inputs, targets).
        on_step: called on the main process with (step, loss) after every step.
    """
    import time

    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.handlers import CheckpointLoader, CheckpointSaver

    if batch_size % parallel.world_size:
        raise ValueError(
            f"batch size {batch_size} is not divisible by {parallel.world_size} processes"
        )
    local_batch = batch_size // parallel.world_size
    epoch_steps = len(dataset) // batch_size
    if epoch_steps < 1:
        raise ValueError(f"the dataset holds {len(dataset)} samples, fewer than one batch")
    seed_everything(seed)
    network = network.to(device)
    model: nn.Module = network
    if parallel.active:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = optimizer_factory(model.parameters())
    # Rank r of W takes its share of items k*B .. k*B+B-1 at step k, so that together the
    # ranks take exactly the one-process batch.
    loader = DataLoader(
        _AsTorch(dataset),
        batch_size=local_batch,
        sampler=_StepShare(len(dataset), batch_size, parallel) if parallel.active else None,
        shuffle=False,
        num_workers=0,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    # Checkpoints are written at epoch ends only: ignite restarts an interrupted epoch's data
    # from its first batch, so only a resume from an epoch boundary repeats a straight run.
    # An epoch is ``checkpoint_every`` steps; ``steps`` is rounded up to whole epochs.
    if epoch_steps != checkpoint_every:
        raise ValueError(
            f"the dataset holds {epoch_steps} steps per epoch; it must hold checkpoint_every"
            f" ({checkpoint_every}) x batch size samples"
        )
    max_epochs = math.ceil(steps / epoch_steps)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        epoch_length=epoch_steps,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=loss_function,
        prepare_batch=prepare_batch,
        amp=amp and device.type == "cuda",
        decollate=False,
    )
    losses: list[float] = []

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch(engine: Any) -> None:
        dataset.set_epoch(int(engine.state.epoch) - 1)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine: Any) -> None:
        output = engine.state.output
        loss = float((output[0] if isinstance(output, list) else output)["loss"].detach())
        losses.append(loss)
        if on_step is not None and parallel.main:
            on_step(int(engine.state.iteration), loss)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_dict = {"network": network, "optimizer": optimizer, "trainer": trainer}
    if resume:
        latest = _latest_checkpoint(checkpoint_dir)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {checkpoint_dir}")
        CheckpointLoader(load_path=str(latest), load_dict=save_dict).attach(trainer)
    # On every process: ignite's Checkpoint takes part in a collective to learn the rank,
    # and writes on rank 0 only.
    CheckpointSaver(
        save_dir=str(checkpoint_dir),
        save_dict=save_dict,
        save_interval=1,
        epoch_level=True,
        n_saved=2,
        save_final=True,
        final_filename="checkpoint_final.pt",
    ).attach(trainer)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    parallel.barrier()
    done = int(trainer.state.iteration)
    rate = len(losses) * batch_size / seconds if seconds > 0 else float("nan")
    return TrainResult(
        steps=done,
        losses=losses,
        samples_per_s=rate,
        checkpoint=_latest_checkpoint(checkpoint_dir) if parallel.main else None,
    )


class _AsTorch(Dataset[dict[str, Any]]):
    def __init__(self, inner: EpochSeeded) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.inner[index]


class _StepShare(torch.utils.data.Sampler[int]):
    """Rank ``r`` of ``W`` takes items ``k*B + r*(B/W) .. k*B + (r+1)*(B/W) - 1`` at step
    ``k``: together the ranks take exactly the one-process batch."""

    def __init__(self, n: int, batch_size: int, parallel: Distributed) -> None:
        self.n = n - n % batch_size
        self.batch = batch_size
        self.share = batch_size // parallel.world_size
        self.rank = parallel.rank

    def __len__(self) -> int:
        return self.n // self.batch * self.share

    def __iter__(self) -> Iterator[int]:
        for start in range(0, self.n, self.batch):
            first = start + self.rank * self.share
            yield from range(first, first + self.share)


def weights_file(network: nn.Module, path: Path) -> str:
    """Save a network's state dict the way published weights are (``torch.save`` of a plain
    tensor dict, loadable with ``weights_only=True``); return its sha256."""
    import hashlib
    import io

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()
