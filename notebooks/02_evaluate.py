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
# # Evaluating a model on a folder of studies
#
# This notebook measures a model version on a dataset in the generic format
# (`training/format.py`: `dicom/`, optional `masks/`, `labels.csv`, `dataset.json`): it runs
# the model on every labelled study exactly as serving does (same router, same preprocessing,
# same `prepare → predict → interpret`), then reports AUROC with its confidence interval,
# sensitivity and specificity at the operating threshold, calibration, Dice and volume error
# against the masks, and the detection limit by lesion size, with plots.
#
# By default it makes a small **synthetic** dataset (`training.synth.ct`: phantom heads with
# inserted haemorrhages). **Synthetic data measure nothing clinical**: they show how the
# evaluation works and that the code runs; they say nothing about how the model performs on
# patients. To measure that, point `DATASET` below at a folder of real, labelled studies (for
# instance one made by `triage-train import` or `triage-train export-feedback`).
#
# The model needs its weights: set `TRIAGE_MODEL_MIRROR` to a folder holding
# `blast-ct-v1/model_*.pt` before starting Jupyter; without it the model cells are skipped.

# %% tags=["parameters"]
# Parameters. CI runs this notebook with TRIAGE_NOTEBOOK_SMALL=1 (see tests/notebooks).
# ruff: noqa: E402 (each cell imports what it uses, as a reader meets it)
import os
import tempfile
from pathlib import Path

SMALL = os.environ.get("TRIAGE_NOTEBOOK_SMALL") == "1"
WORK = Path(tempfile.mkdtemp(prefix="triage-evaluate-"))  # everything is written here
KEEP_FILES = not SMALL  # leave WORK on disk at the end
DATASET: str | None = None  # your dataset folder; None: make a synthetic one in WORK
SPLIT = "all"  # the studies measured: "all", or a split ("test" for a frozen test set)
MODEL = "blast-ct-v1"  # an installed model (`triage models`)
N_STUDIES = 2 if SMALL else 24  # synthetic studies (the model runs once per study)
SYNTH_SIZE = "small" if SMALL else "full"  # "small": 128² at 1.8 mm, 5 mm slices
SYNTH_BASE = "phantom" if SMALL else "auto"  # "auto": the real CQ500 head when in ../shared
SEED = 0
N_BOOT = 200 if SMALL else 1000  # bootstrap resamples of the AUROC interval
DEVICE = "cpu" if SMALL else "auto"
# "auto" runs as serving does: bf16 where the CPU or GPU computes it natively (about 3 times
# faster than fp32 on such a CPU), else fp32; "fp32" as `triage-train evaluate` runs.
PRECISION = "auto"
MIRROR = os.environ.get("TRIAGE_MODEL_MIRROR")  # a folder holding <model>/<file> weights
# The model runs when its weights are in the mirror. Set RUN_MODELS = True to let the model
# store download them instead (needs the internet).
RUN_MODELS = bool(MIRROR) and Path(MIRROR, MODEL).is_dir()

# %% [markdown]
# ## 1. The dataset
#
# The synthetic studies alternate normal heads and heads with one inserted acute haemorrhage
# (intraparenchymal, subdural, epidural, subarachnoid or intraventricular) of a set volume,
# each with its voxel mask, so Dice and volume error can be measured too. The table shows
# what `labels.csv` says about each study (UIDs and patient IDs are left out).

# %%
import pandas as pd
from IPython.display import Image, Markdown, display

from training.data.dataset import read_dataset
from training.synth.ct import synth_ct_dataset
from training.workflows import split_records

if DATASET is None:
    root = WORK / "synth-ct"
    synth_ct_dataset(
        root,
        n_studies=N_STUDIES,
        seed=SEED,
        size=SYNTH_SIZE,
        base=SYNTH_BASE,
        normal_fraction=0.5,
    )
else:
    root = Path(DATASET)
dataset = read_dataset(root)
records = dataset.studies if SPLIT == "all" else split_records(dataset, SEED)[SPLIT]
synthetic = dataset.meta.get("source") == "synth"
pd.DataFrame(
    [
        {
            "study": i,
            "labels": r.labels,
            "subtype": r.subtype or "normal",
            "volume_ml": r.volume_ml,
            "mask": r.mask is not None,
            "split": r.split or "",
        }
        for i, r in enumerate(records, start=1)
    ]
)

# %% [markdown]
# ## 2. Running the model
#
# `build_model` builds the model with serving's own factory (`triage.models.registry`), its
# weights verified against the sha256 in its spec; `evaluate` runs it study by study. A study
# the model cannot read is kept with its error and left out of the metrics. On a CPU each head
# CT takes about half a minute to a minute.

# %%
from training.evaluate import build_model, evaluate, write_per_study
from triage.config import Settings
from triage.models.catalog import load_specs
from triage.models.store import ModelStore

settings = Settings(data_dir=WORK / "triage-data", device=DEVICE, precision=PRECISION)
spec = next(s for s in load_specs(settings.model_specs_dir, []) if s.name == MODEL)
finding = spec.findings[0]
evaluation = None
if RUN_MODELS:
    store = ModelStore(
        settings.resolved_model_cache_dir, settings.model_mirror, pins=settings.weight_sha256
    )
    progress = display(Markdown(f"0 of {len(records)} studies"), display_id=True)
    evaluation = evaluate(
        build_model(spec, store, device=settings.device, precision=settings.precision),
        records,
        finding=finding.code,
        synthetic=synthetic,
        plots_dir=WORK / "evaluation",
        n_boot=N_BOOT,
        seed=SEED,
        progress=lambda done, total: progress.update(Markdown(f"{done} of {total} studies")),
    )
    write_per_study(evaluation, WORK / "evaluation" / "per_study.csv")
else:
    display(
        Markdown(
            f"**Skipped the model cells:** no weights for {MODEL}. Set `TRIAGE_MODEL_MIRROR` "
            f"to a folder holding `{MODEL}/model_*.pt` (or set `RUN_MODELS = True` to download "
            "them) and run the notebook again."
        )
    )

# %% [markdown]
# ## 3. The metrics
#
# For the haemorrhage model the score ranked and thresholded is the predicted blood volume
# (ml), the quantity its flag threshold applies to; the [0, 1] confidence is what the
# reliability curve checks. With few studies most intervals are wide and some metrics are
# undefined (`nan`): the lines under the table say why.

# %%
MEANING = {
    "n": "studies measured",
    "n_positive": "studies with the finding",
    "auroc": "area under the ROC curve of the score",
    "auroc_ci_low": "its 95% bootstrap interval, low",
    "auroc_ci_high": "its 95% bootstrap interval, high",
    "threshold": "the operating threshold the flags used",
    "sensitivity": "flagged positives / positives, at the threshold",
    "specificity": "unflagged negatives / negatives, at the threshold",
    "ppv": "positives / flagged, at the threshold",
    "dice_mean": "overlap of predicted and true blood masks (positives with a mask)",
    "volume_abs_error_ml_mean": "mean |predicted - true| blood volume, ml",
    "ece_confidence": "expected calibration error of the [0, 1] confidence",
    "failed": "studies the model could not read",
}
if evaluation is not None:
    metrics = evaluation.metrics
    display(
        Markdown(
            f"**{evaluation.model} {evaluation.version}**, finding `{evaluation.finding}`, "
            f"threshold {evaluation.threshold:g} {finding.unit or ''}, "
            f"{len(evaluation.studies)} studies"
            + (" (synthetic: demonstration only, nothing clinical)" if synthetic else "")
        )
    )
    display(
        pd.DataFrame(
            [
                {"metric": k, "value": round(metrics.get(k, float("nan")), 4), "meaning": v}
                for k, v in MEANING.items()
            ]
        )
    )
    display(Markdown("\n".join(f"* {line}" for line in evaluation.summary.reasons) or "-"))

# %% [markdown]
# One row per study (also written as `per_study.csv` beside the plots):

# %%
if evaluation is not None:
    display(
        pd.DataFrame(
            [
                {
                    "study": i,
                    "label": s.label,
                    "subtype": s.subtype or "normal",
                    "score": s.score,
                    "flagged": s.flagged,
                    "true_ml": s.true_volume_ml,
                    "predicted_ml": s.pred_volume_ml,
                    "dice": s.dice,
                    "error": s.error or "",
                }
                for i, s in enumerate(evaluation.studies, start=1)
            ]
        )
    )

# %% [markdown]
# ## 4. The plots
#
# * **ROC**: sensitivity against 1 − specificity as the threshold moves; the dot is the
#   operating threshold. With synthetic data the title says "demonstration data".
# * **Reliability**: among studies given a confidence near *p*, the share that truly have the
#   finding; a calibrated model lies on the diagonal.
# * **Detection limit**: sensitivity by true lesion volume, the smallest bleeds being the
#   hardest.
# * **Volumes**: predicted against true blood volume.

# %%
if evaluation is not None:
    for name, path in evaluation.plots.items():
        display(Markdown(f"**{name}** (`{path.name}`)"), Image(filename=str(path), width=480))

# %% [markdown]
# ## 5. The same from the command line
#
# ```
# triage-train synth ct --out data/synth-ct --studies 24
# triage-train evaluate --dataset data/synth-ct --split all --out runs/eval
# ```
#
# `--version N` (or `--alias champion`) measures a version from the MLflow registry instead of
# the built-in weights; `03_finetune_register_promote` makes such a version.

# %%
import shutil

if not KEEP_FILES:
    shutil.rmtree(WORK, ignore_errors=True)
