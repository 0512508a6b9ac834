# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tune, register, promote, serve
#
# The retraining loop on a small scale, in a temporary MLflow store:
#
# 1. **fit**: fine-tune the haemorrhage model (BLAST-CT) from its published weights on the
#    training split of a dataset, choose its operating threshold on the validation split,
#    measure it on the test split, log the run to MLflow and register the result as a new
#    version of the registered model `blast-ct-v1` (`training.workflows.fit`, the code behind
#    `triage-train fit`);
# 2. **promote**: compare the candidate with the version serving now (the `champion` alias's
#    version, or the built-in weights while there is none) on the same frozen test set, write
#    the decision on the candidate's model version, and move the alias only if the candidate
#    is not worse (`training.promote.promote`, behind `triage-train promote`);
# 3. **serve**: `triage serve` pointed at the registry (`TRIAGE_MODEL_REGISTRY_URI`) asks
#    which version holds the alias and serves it (`triage.models.mlflow_registry`).
#
# The data are **synthetic** (`training.synth.ct`): a model fine-tuned on them is a
# demonstration of the mechanics, not a clinical model, and its metrics measure nothing
# clinical. Never register such a version in a registry that serves patients.
#
# The base weights are needed: set `TRIAGE_MODEL_MIRROR` to a folder holding
# `blast-ct-v1/model_*.pt` before starting Jupyter; without it the model cells are skipped.

# %% tags=["parameters"]
# Parameters. CI runs this notebook with TRIAGE_NOTEBOOK_SMALL=1 (see tests/notebooks).
# ruff: noqa: E402 (each cell imports what it uses, as a reader meets it)
import os
import tempfile
from pathlib import Path

SMALL = os.environ.get("TRIAGE_NOTEBOOK_SMALL") == "1"
WORK = Path(tempfile.mkdtemp(prefix="triage-retrain-"))  # everything is written here
KEEP_FILES = not SMALL  # leave WORK (data, run, MLflow store) on disk at the end
MODEL = "blast-ct-v1"  # the registered model has the installed model's name
ALIAS = "champion"  # the alias serving reads (TRIAGE_MODEL_REGISTRY_ALIAS)
N_STUDIES = 3 if SMALL else 40  # synthetic studies
SYNTH_SIZE = "small" if SMALL else "full"  # "small": 128² at 1.8 mm, 5 mm slices
SYNTH_BASE = "phantom" if SMALL else "auto"  # "auto": the real CQ500 head when in ../shared
STEPS = 2 if SMALL else 200  # optimiser steps
BATCH_SIZE = 2  # patches per step
LR = 1e-4
SEED = 0
# How the threshold is chosen on the validation split ("keep": the base version's; the
# small run has no validation split).
THRESHOLD_RULE = "keep" if SMALL else "sensitivity"
N_BOOT = 200 if SMALL else 1000  # bootstrap resamples of the AUROC interval
DEVICE = "cpu" if SMALL else "auto"
MIRROR = os.environ.get("TRIAGE_MODEL_MIRROR")  # a folder holding <model>/<file> weights
# The model cells run when the base weights are in the mirror. Set RUN_MODELS = True to let
# the model store download them instead (needs the internet).
RUN_MODELS = bool(MIRROR) and Path(MIRROR, MODEL).is_dir()

# %% [markdown]
# ## 1. The dataset and its frozen test set
#
# Splits group studies by patient (never the same patient in training and test). Writing the
# split into `labels.csv` (`freeze_splits`) keeps the test set the same when the dataset
# grows, so that every candidate is compared on the same studies; its fingerprint names it.
#
# Each model run costs about half a minute to a minute per study on a CPU, so the small run
# freezes one patient with a haemorrhage as the test set and trains on the rest.

# %%
import logging
from collections import defaultdict

import pandas as pd
from IPython.display import Markdown, display

from training.data.dataset import read_dataset
from training.data.splits import assign_splits, fingerprint, freeze_splits
from training.format import HAEMORRHAGE
from training.synth.ct import synth_ct_dataset
from training.workflows import split_records

logging.basicConfig(level=logging.WARNING)

root = WORK / "synth-ct"
synth_ct_dataset(root, n_studies=N_STUDIES, seed=SEED, size=SYNTH_SIZE, base=SYNTH_BASE)
dataset = read_dataset(root)
if SMALL:
    by_patient = defaultdict(list)
    for r in dataset.studies:
        by_patient[r.patient_id].append(r)
    positive = [p for p, rs in by_patient.items() if any(r.label(HAEMORRHAGE) for r in rs)]
    test_patient = min(positive, key=lambda p: len(by_patient[p]))
    assignment = {
        r.study_uid: "test" if r.patient_id == test_patient else "train" for r in dataset.studies
    }
else:
    assignment = assign_splits(dataset.studies, seed=SEED)
freeze_splits(root, assignment)
dataset = read_dataset(root)
parts = split_records(dataset, SEED)
test_records = parts["test"]
display(
    Markdown(
        f"{len(parts['train'])} train, {len(parts['val'])} validation and {len(test_records)}"
        f" test studies; frozen test set `{fingerprint(test_records)[:12]}`."
    )
)
pd.DataFrame(
    [
        {
            "study": i,
            "split": r.split,
            "subtype": r.subtype or "normal",
            "label": r.label(HAEMORRHAGE),
            "volume_ml": r.volume_ml,
        }
        for i, r in enumerate(dataset.studies, start=1)
    ]
)

# %% [markdown]
# ## 2. A temporary MLflow store
#
# Runs and registered models go to a SQLite file in `WORK` (artifacts beside it). A site uses
# its own store or tracking server, the one `TRIAGE_MODEL_REGISTRY_URI` names for serving
# (`training.tracking.default_uri`: that setting, else `<data dir>/mlflow/mlflow.db`).

# %%
import mlflow

from training.tracking import client
from triage.config import Settings
from triage.models.catalog import load_specs
from triage.models.store import ModelStore

# No MLflow progress bars in the outputs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
(WORK / "mlflow").mkdir()
URI = f"sqlite:///{WORK / 'mlflow' / 'mlflow.db'}"
settings = Settings(data_dir=WORK / "triage-data", device=DEVICE)
base = next(s for s in load_specs(None, []) if s.name == MODEL)  # the built-in version
store = ModelStore(  # the published weights, verified against the spec's sha256
    settings.resolved_model_cache_dir, settings.model_mirror, pins=settings.weight_sha256
)
for quiet in ("mlflow", "alembic"):  # after `import mlflow`, which sets up its loggers
    logging.getLogger(quiet).setLevel(logging.ERROR)
mlflow_client = client(URI)
display(
    Markdown(f"MLflow {mlflow.__version__} store `{URI}`; base model {base.name} {base.version}.")
)

# %% [markdown]
# ## 3. Fine-tune and register
#
# `fit` preprocesses the training studies with serving's own code, trains on patches around
# the masks (batch-norm statistics stay as published), writes a candidate folder (spec +
# weights, sha256 in the spec), chooses the threshold, measures the candidate on the test
# split, logs parameters, losses, metrics and plots to an MLflow run, and registers the
# candidate as the next version of `blast-ct-v1`. The metrics on the frozen test set are
# kept on the version, so promotion does not run the candidate again.

# %%
from training.workflows import FitOptions, fit

outcome = None
if RUN_MODELS:
    status = display(Markdown("starting"), display_id=True)
    outcome = fit(
        FitOptions(
            dataset=root,
            out=WORK / "run",
            steps=STEPS,
            batch_size=BATCH_SIZE,
            lr=LR,
            seed=SEED,
            device=DEVICE,
            checkpoint_every=min(50, STEPS),
            threshold_rule=THRESHOLD_RULE,
            uri=URI,
            register=True,
            n_boot=N_BOOT,
        ),
        base=base,
        store=store,
        on_step=lambda step, loss: status.update(
            Markdown(f"step {step} of {STEPS}, loss {loss:.4f}")
        ),
        on_stage=lambda text: status.update(Markdown(text)),
    )
    assert outcome.spec is not None and outcome.test is not None
    display(
        pd.DataFrame(
            [
                {"": "registered version", "value": outcome.version},
                {"": "spec version", "value": outcome.spec.version},
                {"": "MLflow run", "value": outcome.run_id},
                {"": "model URI", "value": outcome.model_uri},
                {"": "threshold (ml)", "value": outcome.threshold},
                {"": "how", "value": outcome.threshold_reason},
                {"": "training losses", "value": [round(x, 4) for x in outcome.train.losses]},
            ]
        )
    )
else:
    display(
        Markdown(
            f"**Skipped the model cells:** no weights for {MODEL}. Set `TRIAGE_MODEL_MIRROR` "
            f"to a folder holding `{MODEL}/model_*.pt` (or set `RUN_MODELS = True` to download "
            "them) and run the notebook again."
        )
    )

# %% [markdown]
# The run in MLflow: its parameters say where the candidate came from (base version, dataset
# fingerprint, steps, seed), its metrics how it did on the test split.

# %%
if outcome is not None:
    run = mlflow_client.get_run(outcome.run_id)
    display(pd.DataFrame([{"param": k, "value": v} for k, v in sorted(run.data.params.items())]))
    test_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    display(
        pd.DataFrame(
            [{"metric": k, "value": round(v, 4)} for k, v in sorted(test_metrics.items())][:12]
        )
    )

# %% [markdown]
# ## 4. Promote against the model serving now
#
# No version holds the alias yet, so the candidate is compared with the built-in weights
# (`built-in 1.0.0`). Both are measured on the frozen test set, each with its own threshold;
# the candidate is promoted if, on every declared metric (AUROC, sensitivity, specificity),
# it is at least the champion's value minus the tolerance. A metric undefined on both sides
# (with one test study, AUROC and specificity) is not compared.

# %%
from training.promote import promote

decision = None
if outcome is not None:
    decision, ev_candidate, ev_champion = promote(
        uri=URI,
        name=MODEL,
        candidate=outcome.version,
        records=test_records,
        finding=HAEMORRHAGE,
        builtin=base,
        builtin_store=store,
        cache_dir=WORK / "registry-cache",
        alias=ALIAS,
        synthetic=True,
    )
    verdict = "promoted" if decision.promoted else "refused: " + "; ".join(decision.reasons)
    display(
        Markdown(
            f"**{MODEL} version {decision.candidate}: {verdict}** (compared with "
            f"{decision.champion} on {decision.studies} studies)"
        )
    )
    display(
        pd.DataFrame(
            [
                {"metric": m, "candidate": a, decision.champion: b}
                for m, (a, b) in decision.metrics.items()
            ]
        )
    )

# %% [markdown]
# ## 5. The registry entry
#
# The decision is written on the candidate's model version whatever it is: tags
# `promotion.decision`, `promotion.compared_with`, `promotion.frozen_set`,
# `promotion.metrics`, `promotion.at`, the metrics on the frozen set (`evaluation.<set>`),
# the spec version and the run that made it, and a description in words. The alias moved only
# on promotion.

# %%
if outcome is not None:
    mv = mlflow_client.get_model_version(MODEL, outcome.version)
    display(Markdown(f"**{MODEL} version {mv.version}** ({mv.status}): {mv.description}"))
    display(pd.DataFrame([{"tag": k, "value": v} for k, v in sorted(mv.tags.items())]))
    aliases = mlflow_client.get_registered_model(MODEL).aliases
    display(Markdown(f"aliases of {MODEL}: `{dict(aliases)}`"))

# %% [markdown]
# ## 6. How serving picks it
#
# `triage serve` with `TRIAGE_MODEL_REGISTRY_URI` set builds a `RegistrySource` on that store
# and a `RegistryWatcher` over its models. Every `TRIAGE_MODEL_REGISTRY_POLL_SECONDS` the
# watcher asks which version holds the alias (`alias_version`); when it moved, it downloads
# that version (`fetch`: spec + weights, each file checked against the spec's sha256), builds
# the model with the same factory as the built-in one, loads its weights and only then swaps
# it in, so a version that cannot load never replaces the running one. Findings then carry
# the version `<spec version>+registry.<N>`.
#
# The cell below does what the server does at start-up (`check_once`), without a server.

# %%
from triage.analysis import Analyzer
from triage.models.mlflow_registry import RegistrySource, RegistryWatcher

if outcome is not None:
    serving = Settings(
        data_dir=WORK / "serve-data", device=DEVICE, models=[MODEL], model_registry_uri=URI
    )
    analyzer = Analyzer.from_settings(serving)  # the built-in weights until the watcher acts
    source = RegistrySource(
        serving.model_registry_uri,
        alias=serving.model_registry_alias,
        cache_dir=serving.resolved_model_cache_dir / "registry",
    )
    served = source.alias_version(MODEL)
    display(Markdown(f"`alias_version({MODEL!r})` → `{served}` (@{serving.model_registry_alias})"))
    if served is not None:
        registered = source.fetch(MODEL, served)
        display(
            pd.DataFrame(
                [
                    {"": "spec version served", "value": registered.spec.version},
                    {"": "weights", "value": [w.filename for w in registered.spec.weights]},
                    {"": "sha256", "value": [w.sha256[:16] for w in registered.spec.weights]},
                    {
                        "": "threshold (ml)",
                        "value": registered.spec.finding(HAEMORRHAGE).threshold,
                    },
                    {"": "downloaded to", "value": str(registered.path)},
                ]
            )
        )
    before = analyzer.registry.spec(MODEL).version
    watcher = RegistryWatcher(
        analyzer.registry, source, poll_seconds=serving.model_registry_poll_seconds
    )
    changed = watcher.check_once()  # download, build, load, swap
    after = analyzer.registry.spec(MODEL).version
    display(
        Markdown(
            f"Serving {MODEL}: `{before}` before the check, `{after}` after it"
            f" (changed: {changed or 'nothing; the alias is unset'})."
        )
    )

# %% [markdown]
# ## 7. The same from the command line
#
# ```
# export TRIAGE_MODEL_REGISTRY_URI=sqlite:////srv/mlflow/mlflow.db
# triage-train synth ct --out data/synth-ct --studies 40
# triage-train fit --dataset data/synth-ct --out runs/ft1 --steps 200
# triage-train promote --model blast-ct-v1 --version 1 --dataset data/synth-ct
# triage serve   # serves the @champion version, and the next one within the poll interval
# ```

# %%
import shutil

if not KEEP_FILES:
    shutil.rmtree(WORK, ignore_errors=True)
