"""The steps of ``triage-train`` as functions: fit a candidate, evaluate, register.

``fit`` reads a dataset (generic format), splits it by patient (or by ``labels.csv``),
fine-tunes from the pretrained weights on the training split, chooses the operating
threshold on the validation split, measures the candidate on the test split, and (on the
main process) logs everything to an MLflow run and registers the version.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from training.candidate import candidate_spec, read_candidate, write_candidate
from training.card import model_card
from training.data.dataset import Dataset, StudyRecord, read_dataset
from training.data.samples import (
    HAS_MASK,
    IMAGE,
    LABEL,
    chest_augmentation,
    chest_dataset,
    haemorrhage_dataset,
    warm_cache,
)
from training.data.splits import assign_splits, fingerprint
from training.evaluate import Evaluation, build_model, evaluate, write_per_study
from training.fit.chest import (
    ChestSamples,
    chest_loss,
    load_chest_network,
    prepare_chest_batch,
    save_chest_weights,
)
from training.fit.engine import Distributed, TrainResult, run_training, weights_file
from training.fit.haemorrhage import (
    HaemorrhagePatches,
    Volume,
    load_member,
    patch_loss,
    prepare_patch_batch,
)
from training.format import HAEMORRHAGE, PNEUMOTHORAX
from training.metrics import choose_threshold
from training.promote import record_evaluation
from training.tracking import client, ensure_experiment, log_metrics, log_model_version
from triage.models.device import resolve_device
from triage.models.spec import ModelSpec
from triage.models.store import ModelStore

log = logging.getLogger(__name__)

__all__ = ["FitOptions", "FitOutcome", "fit", "split_records"]


@dataclass
class FitOptions:
    """What ``triage-train fit`` does (see the CLI's help for each)."""

    dataset: Path
    out: Path
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    seed: int = 0
    init: Literal["pretrained", "random"] = "pretrained"
    member: int | None = None
    device: str = "auto"
    checkpoint_every: int = 50
    resume: bool = False
    threshold_rule: Literal["youden", "sensitivity", "specificity", "keep"] = "sensitivity"
    threshold_target: float | None = 0.9
    uri: str | None = None
    register: bool = True
    experiment: str = "triage"
    n_boot: int = 1000


@dataclass
class FitOutcome:
    """What a fit produced (main process; other ranks get only ``train``)."""

    train: TrainResult
    candidate: Path | None = None
    spec: ModelSpec | None = None
    threshold: float | None = None
    threshold_reason: str = ""
    validation: Evaluation | None = None
    test: Evaluation | None = None
    run_id: str = ""
    model_uri: str = ""
    version: str = ""
    card: Path | None = None
    notes: list[str] = field(default_factory=list)


def split_records(dataset: Dataset, seed: int) -> dict[str, list[StudyRecord]]:
    """Train/val/test by patient (``labels.csv`` splits kept)."""
    splits = assign_splits(dataset.studies, seed=seed)
    out: dict[str, list[StudyRecord]] = {"train": [], "val": [], "test": []}
    for r in dataset.studies:
        out[splits[r.study_uid]].append(r)
    return out


def _volumes(records: list[StudyRecord], spec: ModelSpec, cache: Path) -> list[Volume]:
    ds = haemorrhage_dataset(records, spec, cache_dir=cache)
    volumes = []
    for i in warm_cache(ds):
        item = ds[i]
        if not item[HAS_MASK]:
            continue  # a positive study without a mask cannot teach segmentation
        volumes.append(Volume(item[IMAGE][0].numpy(), item[LABEL][0].numpy().astype(np.uint8)))
    return volumes


#: Dataset task -> the finding it labels.
TASK_FINDINGS: dict[str, str] = {
    "haemorrhage": HAEMORRHAGE,
    HAEMORRHAGE: HAEMORRHAGE,
    "chest": PNEUMOTHORAX,
    PNEUMOTHORAX: PNEUMOTHORAX,
}


@dataclass
class _Task:
    """What one model kind trains with."""

    network: nn.Module
    origin: str
    dataset: Any
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prepare_batch: Callable[..., Any]
    save: Callable[[nn.Module, Path], str]


def _setup_haemorrhage(
    base: ModelSpec,
    train: list[StudyRecord],
    cache: Path,
    samples: int,
    options: FitOptions,
    store: ModelStore | None,
) -> _Task:
    volumes = _volumes(train, base, cache)
    if not volumes:
        raise ValueError("no training study has a mask (or is negative): nothing to fit")
    patches = HaemorrhagePatches(
        volumes, samples=samples, seed=options.seed, value_range=base.input.value_range
    )
    net, origin = load_member(base, store, options.member, seed=options.seed)
    return _Task(
        net, origin, patches, patch_loss(len(base.outputs)), prepare_patch_batch, weights_file
    )


def _setup_chest(
    base: ModelSpec,
    train: list[StudyRecord],
    cache: Path,
    samples: int,
    options: FitOptions,
    store: ModelStore | None,
) -> _Task:
    ds = chest_dataset(train, base, cache_dir=cache)
    items = [ds[i] for i in warm_cache(ds)]
    if not items:
        raise ValueError("no training radiograph could be read: nothing to fit")
    data = ChestSamples(
        items, seed=options.seed, samples=samples, augmentation=chest_augmentation()
    )
    net, origin = load_chest_network(base, store, seed=options.seed)
    return _Task(net, origin, data, chest_loss(), prepare_chest_batch, save_chest_weights)


def fit(
    options: FitOptions,
    *,
    base: ModelSpec,
    store: ModelStore,
    on_step: Callable[[int, float], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> FitOutcome:
    """Fine-tune a model (the haemorrhage network from masks, the chest classifier from
    labels; see the module docstring).

    Args:
        options: what to do.
        base: the installed spec the candidate is a new version of.
        store: where the pretrained weights come from (verified).
        on_step: (step, loss) after every step (main process).
        on_stage: a line when a stage starts (main process).
    """

    def stage(text: str) -> None:
        if on_stage is not None and parallel.main:
            on_stage(text)

    device = resolve_device(options.device)
    parallel = Distributed.from_environment(device)
    if device.type == "cuda" and parallel.active:
        device = torch.device("cuda", parallel.local_rank)
        torch.cuda.set_device(device)
    dataset = read_dataset(options.dataset)
    finding = TASK_FINDINGS.get(dataset.task)
    if finding is None or not any(f.code == finding for f in base.findings):
        raise ValueError(
            f"dataset task {dataset.task!r}: {base.name} is trained on"
            f" {', '.join(f.code for f in base.findings)}"
        )
    parts = split_records(dataset, options.seed)
    stage(
        f"dataset {dataset.name}: {len(parts['train'])} train, {len(parts['val'])} val,"
        f" {len(parts['test'])} test studies"
    )
    cache = options.out / "cache"
    samples = options.checkpoint_every * options.batch_size
    pretrained = store if options.init == "pretrained" else None
    # Preprocess once (main process first, so that the others read the cache).
    setup = _setup_chest if base.kind == "xrv-densenet" else _setup_haemorrhage
    if parallel.main:
        stage("preprocessing the training studies (serving's preprocessing)")
        task = setup(base, parts["train"], cache, samples, options, pretrained)
    parallel.barrier()
    if not parallel.main:
        task = setup(base, parts["train"], cache, samples, options, pretrained)
    stage(f"fine-tuning from {task.origin} for {options.steps} steps on {device}")
    result = run_training(
        network=task.network,
        dataset=task.dataset,
        loss_function=task.loss,
        optimizer_factory=lambda params: torch.optim.Adam(params, lr=options.lr),
        steps=options.steps,
        batch_size=options.batch_size,
        device=device,
        parallel=parallel,
        seed=options.seed,
        checkpoint_dir=options.out / "checkpoints",
        checkpoint_every=options.checkpoint_every,
        resume=options.resume,
        amp=device.type == "cuda",
        prepare_batch=task.prepare_batch,
        on_step=on_step,
    )
    net = task.network
    origin = task.origin
    outcome = FitOutcome(train=result)
    if not parallel.main:
        parallel.close()
        return outcome
    weights = options.out / "weights.pt"
    sha256 = task.save(net.cpu().eval(), weights)
    filename = f"{base.name}-ft-{sha256[:12]}.pt"
    provenance: dict[str, Any] = {
        "base_version": base.version,
        "started_from": origin,
        "dataset": dataset.name,
        "dataset_fingerprint": fingerprint(dataset.studies),
        "steps": result.steps,
        "seed": options.seed,
        "synthetic": bool(dataset.meta.get("source") == "synth"),
    }
    version = f"{base.version}-ft.{sha256[:8]}"
    spec = candidate_spec(
        base, version=version, weights=[(filename, sha256)], provenance=provenance
    )
    candidate = options.out / "candidate"
    write_candidate(spec, {filename: weights}, candidate)
    synthetic = bool(provenance["synthetic"])
    # The operating threshold, chosen on the validation split.
    stage("choosing the operating threshold on the validation split")
    cspec, cstore = read_candidate(candidate)
    model = build_model(cspec, cstore)
    threshold, why, val = _choose(model, parts["val"], options, synthetic, finding)
    outcome.validation, outcome.threshold, outcome.threshold_reason = val, threshold, why
    spec = candidate_spec(
        base,
        version=version,
        weights=[(filename, sha256)],
        thresholds={finding: threshold},
        provenance={**provenance, "threshold": {"value": threshold, "how": why}},
    )
    write_candidate(spec, {filename: weights}, candidate)
    outcome.candidate, outcome.spec = candidate, spec
    stage("measuring the candidate on the test split")
    cspec, cstore = read_candidate(candidate)
    test = evaluate(
        build_model(cspec, cstore),
        parts["test"],
        finding=finding,
        synthetic=synthetic,
        plots_dir=options.out / "plots",
        n_boot=options.n_boot,
    )
    outcome.test = test
    card = model_card(
        spec,
        evaluation=test,
        dataset_meta=dataset.meta,
        provenance={
            **provenance,
            "splits": {k: len(v) for k, v in parts.items()},
            "test_fingerprint": fingerprint(parts["test"]),
            "batch_size": options.batch_size,
            "lr": options.lr,
            "init": options.init,
            "device": str(device),
        },
        synthetic=synthetic,
    )
    outcome.card = options.out / "model_card.md"
    outcome.card.write_text(card, "utf-8")
    if options.uri:
        stage("logging the run to MLflow and registering the version")
        _log(options, outcome, provenance, parts, device)
    parallel.close()
    return outcome


def _choose(
    model: Any, records: list[StudyRecord], options: FitOptions, synthetic: bool, finding: str
) -> tuple[float, str, Evaluation | None]:
    base = float(model.spec.finding(finding).threshold)
    if options.threshold_rule == "keep" or not records:
        return base, "kept the base version's threshold", None
    val = evaluate(model, records, finding=finding, synthetic=synthetic, n_boot=100)
    y, s = val.summary.y_true, val.summary.y_score
    if y.size == 0 or y.min() == y.max():
        return base, "kept the base threshold: the validation split lacks a class", val
    target = None if options.threshold_rule == "youden" else options.threshold_target
    op = choose_threshold(y, s, rule=options.threshold_rule, target=target)
    if not math.isfinite(op.threshold) or op.threshold <= 0:
        return base, "kept the base threshold: no positive threshold on validation", val
    how = (
        f"{options.threshold_rule} rule (target {options.threshold_target}) on {y.size}"
        f" validation studies: sensitivity {op.sensitivity:.3f}, specificity"
        f" {op.specificity:.3f}"
    )
    return round(float(op.threshold), 4), how, val


def _log(
    options: FitOptions,
    outcome: FitOutcome,
    provenance: dict[str, Any],
    parts: dict[str, list[StudyRecord]],
    device: torch.device,
) -> None:
    assert options.uri and outcome.candidate and outcome.test and outcome.spec
    c = client(options.uri)
    experiment = ensure_experiment(options.uri, options.experiment)
    run = c.create_run(experiment, run_name=f"fit {outcome.spec.name} {outcome.spec.version}")
    run_id = run.info.run_id
    params = {
        "task": outcome.spec.task,
        "base_model": outcome.spec.name,
        "base_version": provenance["base_version"],
        "started_from": provenance["started_from"],
        "dataset": provenance["dataset"],
        "dataset_fingerprint": provenance["dataset_fingerprint"],
        "test_fingerprint": fingerprint(parts["test"]),
        "train_studies": len(parts["train"]),
        "val_studies": len(parts["val"]),
        "test_studies": len(parts["test"]),
        "steps": outcome.train.steps,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "seed": options.seed,
        "init": options.init,
        "device": str(device),
        "threshold": outcome.threshold,
        "threshold_how": outcome.threshold_reason[:500],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for key, value in params.items():
        c.log_param(run_id, key, str(value))
    for step, loss in enumerate(outcome.train.losses, start=1):
        c.log_metric(run_id, "train_loss", loss, step=step)
    c.log_metric(run_id, "train_samples_per_s", outcome.train.samples_per_s)
    log_metrics(c, run_id, outcome.test.metrics, prefix="test_")
    if outcome.validation is not None:
        log_metrics(c, run_id, outcome.validation.metrics, prefix="val_")
    for path in outcome.test.plots.values():
        c.log_artifact(run_id, str(path), artifact_path="plots")
    per_study = write_per_study(outcome.test, options.out / "test_per_study.csv")
    c.log_artifact(run_id, str(per_study))
    c.set_tag(run_id, "synthetic_data", str(provenance["synthetic"]).lower())
    if provenance["synthetic"]:
        c.set_tag(
            run_id, "note", "trained on synthetic data: a demonstration, not a clinical model"
        )
    if outcome.card is not None:
        c.log_artifact(run_id, str(outcome.card))
    uri, version = log_model_version(run_id, outcome.candidate, register=options.register)
    if version:
        # promote compares on this same frozen test split without running it again.
        record_evaluation(c, outcome.spec.name, version, fingerprint(parts["test"]), outcome.test)
    c.set_terminated(run_id)
    outcome.run_id, outcome.model_uri, outcome.version = run_id, uri, version
