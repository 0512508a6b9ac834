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
# # Quickstart: two demo studies through the models
#
# This notebook writes two demo studies into a temporary folder, a synthetic head CT with an
# acute haemorrhage and a real (public, de-identified) chest radiograph, and analyses them
# with the code path `triage predict` uses (`triage.analysis.Analyzer`): every installed model
# that accepts a series of the study runs, each failing open on its own. It then shows the
# findings, explains their fields, and draws the key image of each overlay.
#
# **Not for diagnostic use.** The head CT is a synthetic phantom (`triage.demo.phantom`); the
# findings say what the models make of it, nothing about a patient.
#
# The models need their weights: set `TRIAGE_MODEL_MIRROR` to a folder holding
# `<model>/<file>` (e.g. `blast-ct-v1/model_7.pt`) before starting Jupyter. Without it the
# notebook still writes the studies and shows which model would read which series, and says
# that it skipped the model cells.

# %% tags=["parameters"]
# Parameters. CI runs this notebook with TRIAGE_NOTEBOOK_SMALL=1 (see tests/notebooks).
# ruff: noqa: E402 (each cell imports what it uses, as a reader meets it)
import os
import tempfile
from pathlib import Path

SMALL = os.environ.get("TRIAGE_NOTEBOOK_SMALL") == "1"
WORK = Path(tempfile.mkdtemp(prefix="triage-quickstart-"))  # everything is written here
KEEP_FILES = not SMALL  # leave WORK on disk at the end (to open the files in a viewer)
BLEED = "iph"  # the phantom's haemorrhage: "iph" (intraparenchymal) or "sdh" (subdural)
BLEED_ML = 25.0  # its target blood volume, ml (2 to 120)
SEED = 1  # the phantom's seed (head shape, bleed site, noise)
DEVICE = "cpu" if SMALL else "auto"  # "auto" uses a CUDA GPU when there is one
MEMBERS = 1 if SMALL else None  # ensemble members; None: the site default (all 12 on a GPU)
MIRROR = os.environ.get("TRIAGE_MODEL_MIRROR")  # a folder holding <model>/<file> weights
# The models run when the haemorrhage model's weights are in the mirror. Set RUN_MODELS = True
# to let the model store download them instead (needs the internet).
RUN_MODELS = bool(MIRROR) and Path(MIRROR, "blast-ct-v1").is_dir()

# %% [markdown]
# ## 1. Two demo studies
#
# * A non-contrast head CT: 52 axial slices of 2.5 mm, 256 × 256 at 0.9 mm, built to look like
#   an adult head to the haemorrhage model, with an acute bleed (~66 HU) of `BLEED_ML` ml.
# * A chest radiograph: David Clunie's public CR test image (shipped by `pydicom-data`),
#   copied with fresh UIDs and a synthetic patient.
#
# Each is written as DICOM files, as a scanner would send them.

# %%
from IPython.display import Markdown, display

from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.demo.xray import write_demo_radiograph

STUDIES = WORK / "studies"
phantom = PhantomSpec(haemorrhage=True, kind=BLEED, seed=SEED, bleed_volume_ml=BLEED_ML)
ct_files = write_head_ct_series(STUDIES / "head-ct", phantom)
cr_files = write_demo_radiograph(STUDIES / "chest-cr")
display(
    Markdown(
        f"Wrote {len(ct_files)} CT slices ({phantom.label}, {BLEED_ML:g} ml) and "
        f"{len(cr_files)} radiograph under `{STUDIES}`."
    )
)

# %% [markdown]
# ## 2. Which model reads which series
#
# `group_files` groups the files by study and series from their headers, as `triage predict`
# does with the folders it is given. The router then reads each series' headers (modality,
# body part, orientation, slice thickness, number of images) and each model's acceptance
# rules (its spec, `triage/models/specs/*.json`) and picks, per model, the series it reads or
# says why none. This needs no weights.

# %%
import pandas as pd

from triage.analysis import Analyzer, group_files
from triage.analysis.analyzer import route_series
from triage.config import Settings

# Settings come from the TRIAGE_* environment (TRIAGE_MODEL_MIRROR among them), as in the CLI.
settings = Settings(data_dir=WORK / "triage-data", device=DEVICE, ensemble_members=MEMBERS)
analyzer = Analyzer.from_settings(settings)  # builds nothing yet: models load on first use
studies = group_files([STUDIES])
rows = []
for n, series in enumerate(studies.values(), start=1):
    decision, _ = route_series(series, analyzer.registry)
    for entry in decision.to_json()["models"]:
        rows.append(
            {"study": n, "model": entry["model"], "runs": entry["run"], "why": entry["reason"]}
        )
pd.DataFrame(rows)

# %% [markdown]
# ## 3. The analysis
#
# `Analyzer.analyze` is what the background worker of `triage serve` and `triage predict` run
# on every study: route, then run each chosen model (prepare → predict → interpret) on its
# series. A model whose weights are missing, or that cannot read its series, ends `failed`
# with the reason; the other models' findings still count.
#
# On a CPU the haemorrhage model takes about half a minute to a minute per head CT.

# %%
analyses = {}
if RUN_MODELS:
    for uid, series in studies.items():
        analyses[uid] = analyzer.analyze(uid, series)
else:
    display(
        Markdown(
            "**Skipped the model cells:** no model weights. Set `TRIAGE_MODEL_MIRROR` to a "
            "folder holding `blast-ct-v1/model_*.pt` (or set `RUN_MODELS = True` to download "
            "them) and run the notebook again."
        )
    )


def short(text: str | None, n: int = 160) -> str:
    """A long message cut to ``n`` characters for a table cell."""
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def table(rows: list[dict], columns: list[str]) -> pd.DataFrame | Markdown:
    """The rows as a table, or a line saying there is nothing to show."""
    if not rows:
        return Markdown("_Nothing to show: the models did not run._")
    return pd.DataFrame(rows, columns=columns)


table(
    [
        {
            "study": n,
            "model": run.model,
            "version": run.version,
            "status": run.status.value,
            "seconds": round(sum(run.timing_s.values()), 1),
            "error": short(run.error),
        }
        for n, analysis in enumerate(analyses.values(), start=1)
        for run in analysis.runs
    ],
    ["study", "model", "version", "status", "seconds", "error"],
)

# %% [markdown]
# ## 4. The findings
#
# One row per finding (`triage predict --json` prints the same objects, `Finding.to_json()`):
#
# * `finding`: the finding code (`intracranial_haemorrhage`, `pneumothorax`, …).
# * `flag`: the model considers the finding present; a flagged finding raises the study on
#   the worklist.
# * `score`: the model's confidence in [0, 1] (how it is computed:
#   `details["score_definition"]`).
# * `volumes_ml`: segmentation models only, the volume of each output class in ml. BLAST-CT's
#   classes: IPH (intraparenchymal), EAH (extra-axial: subdural, epidural, subarachnoid),
#   oedema (not blood) and IVH (intraventricular).
# * `severity`: `high` or `standard` where the model grades it (large volume, IVH extension),
#   else empty.
# * `threshold`: the operating threshold the flag used (BLAST-CT: the blood volume in ml,
#   `details["threshold_ml"]`; a classifier: its score).
# * `model`, `version`, `weights`: which model, which version and which weight files (sha256,
#   first 12 digits here) produced the finding, so that every finding can be traced to the
#   exact weights that made it.
#
# `max_probability` holds the highest voxel probability of each class, and `details` the rest
# (ensemble members, device, precision, timing per stage).

# %%
finding_rows = []
for n, analysis in enumerate(analyses.values(), start=1):
    for f in analysis.findings:
        finding_rows.append(
            {
                "study": n,
                "finding": f.finding,
                "flag": f.flag,
                "score": round(f.score, 3),
                "volumes_ml": {k: round(v, 2) for k, v in f.volumes_ml.items()},
                "severity": f.severity or "",
                "threshold": f.details.get("threshold_ml", f.details.get("threshold")),
                "model": f.model.name,
                "version": f.model.version,
                "weights": ", ".join(s[:12] for s in f.model.weights_sha256),
            }
        )
table(
    finding_rows,
    [
        "study",
        "finding",
        "flag",
        "score",
        "volumes_ml",
        "severity",
        "threshold",
        "model",
        "version",
        "weights",
    ],
)

# %% [markdown]
# The study-level outcome: `ai_status` is `ok` (every model that applies ran), `partial`
# (some ran, some failed), `failed`, `incomplete_series` (a model would read the study but its
# series is too short, e.g. a transfer still under way) or `no_applicable_model`.

# %%
table(
    [
        {
            "study": n,
            "ai_status": a.ai_status.value,
            "findings": len(a.findings),
            "flagged": sum(f.flag for f in a.findings),
            "error": short(a.error),
        }
        for n, a in enumerate(analyses.values(), start=1)
    ],
    ["study", "ai_status", "findings", "flagged", "error"],
)

# %% [markdown]
# ## 5. The key images
#
# Each finding with an overlay draws what the model marked: a segmentation model's label map
# on the slice with the most lesion voxels (brain window, level 40 / width 80 HU, on the
# model's 1 mm grid; the patient's left on the image's right), or a classifier's saliency map
# over the radiograph. These are the pictures `triage serve` shows as previews, banner and all:
# an aid to find what the model saw, not a diagnosis.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from triage.serve.preview import CLASS_COLOURS, brain_window, key_slice

colours = [tuple(c / 255 for c in CLASS_COLOURS[v]) for v in sorted(CLASS_COLOURS)]
shown = 0
for n, analysis in enumerate(analyses.values(), start=1):
    for code, overlay in analysis.overlays.items():
        fig, ax = plt.subplots(figsize=(6, 6))
        if overlay.kind == "labels":
            z = key_slice(overlay.data)
            ax.imshow(brain_window(overlay.background[z]), cmap="gray", interpolation="nearest")
            labels = np.ma.masked_equal(overlay.data[z], 0)
            ax.imshow(
                labels,
                cmap=ListedColormap(colours),
                vmin=1,
                vmax=len(colours),
                alpha=0.55,
                interpolation="nearest",
            )
            ax.legend(
                handles=[
                    Patch(color=colours[i], label=name) for i, name in enumerate(overlay.classes)
                ],
                loc="lower right",
                fontsize=8,
            )
            where = f"key slice {z} of {overlay.data.shape[0]}"
        else:
            ax.imshow(overlay.background, cmap="gray")
            heat = np.ma.masked_less(overlay.data.astype(np.float32), 0.2)
            ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            where = "saliency (Grad-CAM)"
        ax.set_title(f"study {n}: {code}, {where}\nAI OVERLAY, NOT FOR DIAGNOSTIC USE", fontsize=9)
        ax.axis("off")
        plt.show()
        shown += 1
if not shown:
    display(Markdown("No overlay to show (the models did not run, or marked nothing)."))

# %% [markdown]
# ## 6. The same from the command line
#
# ```
# TRIAGE_MODEL_MIRROR=/path/to/weights triage predict <folder> [--json] [--masks out/]
# ```
#
# prints the same findings (`--json`: the whole `StudyAnalysis.to_json()` per study, with the
# routing decision and each model run); `--masks` also writes each label map as NIfTI or DICOM
# Segmentation for scoring outside the product. Next: `02_evaluate` measures a model on a
# folder of studies.

# %%
import shutil

if not KEEP_FILES:
    shutil.rmtree(WORK, ignore_errors=True)
