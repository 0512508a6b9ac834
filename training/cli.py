"""``triage-train``: the ML engineer's loop, one subcommand per step.

    triage-train synth ct --out data/synth-ct --studies 40
    triage-train fit --dataset data/synth-ct --out runs/ft1 --steps 200
    triage-train evaluate --dataset data/synth-ct --version 3
    triage-train promote --model blast-ct-v1 --version 3 --dataset data/synth-ct
    triage-train export-feedback --out data/feedback-2026-12
    triage-train import cq500 reads.csv /data/cq500 --out data/cq500

Settings come from the same ``TRIAGE_*`` environment as ``triage`` (data directory, weight
mirror and cache, ``TRIAGE_MODEL_REGISTRY_URI``). Multi-GPU or multi-process training:
``torchrun --nproc_per_node N -m training fit ...``.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from triage.cli import _fail, _settings  # one line on stderr and exit 2; TRIAGE_* settings
from triage.config import Settings

app = typer.Typer(
    help="Retraining: datasets, synthetic data, fine-tuning, evaluation, MLflow registry.",
    no_args_is_help=True,
    add_completion=False,
)
synth_app = typer.Typer(help="Synthetic datasets for tests, demos and CI.", no_args_is_help=True)
import_app = typer.Typer(help="Public datasets into the generic format.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
app.add_typer(import_app, name="import")
console = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="triage's data folder (default: TRIAGE_DATA_DIR).", file_okay=False
    ),
]
RegistryUri = Annotated[
    str | None,
    typer.Option(
        "--registry-uri",
        help="MLflow tracking/registry URI. Default: TRIAGE_MODEL_REGISTRY_URI, else"
        " sqlite:///<data dir>/mlflow/mlflow.db.",
    ),
]


@app.callback()
def _requirements() -> None:
    """Every subcommand needs the ``train`` extra; say so in one line when it is missing."""
    import importlib.util

    missing = [
        name
        for name in ("mlflow", "ignite", "dicognito", "nibabel", "sklearn")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        _fail(
            f"triage-train needs the train extra ({', '.join(missing)} missing):"
            " pip install 'triage[train]'"
        )


def _logging() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    for quiet in ("mlflow", "alembic", "ignite", "triage.models"):
        logging.getLogger(quiet).setLevel(logging.WARNING)


def _store(settings: Settings) -> Any:
    from triage.models.store import ModelStore

    return ModelStore(
        cache_dir=settings.resolved_model_cache_dir,
        mirror=settings.model_mirror,
        pins=settings.weight_sha256,
    )


def _spec(name: str) -> Any:
    from triage.models.catalog import load_specs

    for spec in load_specs(None, []):
        if spec.name == name:
            return spec
    _fail(f"no installed model is named {name}")


#: Dataset task -> the model trained on it.
TASK_MODELS = {
    "haemorrhage": "blast-ct-v1",
    "intracranial_haemorrhage": "blast-ct-v1",
    "chest": "xrv-densenet121-res224-all",
    "pneumothorax": "xrv-densenet121-res224-all",
}


def _model_for(dataset: Path) -> str:
    from training.data.dataset import DatasetError, read_meta

    try:
        task = str(read_meta(dataset).get("task", ""))
    except DatasetError as exc:
        _fail(str(exc))
    if task not in TASK_MODELS:
        _fail(
            f"dataset task {task!r}: give --model ({', '.join(sorted(set(TASK_MODELS.values())))})"
        )
    return TASK_MODELS[task]


def _uri(settings: Settings, given: str | None) -> str:
    from training.tracking import default_uri

    return given or default_uri(settings)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _metrics_table(title: str, columns: dict[str, dict[str, float]], names: list[str]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for c in columns:
        table.add_column(c, justify="right")
    for n in names:
        cells = []
        for values in columns.values():
            v = values.get(n)
            cells.append("—" if v is None or v != v else f"{v:.4g}")
        table.add_row(n, *cells)
    return table


_SHOWN = [
    "n",
    "n_positive",
    "auroc",
    "auroc_ci_low",
    "auroc_ci_high",
    "sensitivity",
    "specificity",
    "dice_mean",
    "volume_abs_error_ml_mean",
    "ece_confidence",
    "failed",
]


# --------------------------------------------------------------------------------------------
# synth


@synth_app.command("ct")
def synth_ct(
    out: Annotated[Path, typer.Option("--out", help="New dataset folder.")],
    studies: Annotated[int, typer.Option(min=1, max=10000)] = 20,
    seed: int = 0,
    base: Annotated[str, typer.Option(help="auto, cq500 (../shared) or phantom.")] = "auto",
    size: Annotated[str, typer.Option(help="full or small (fast, for CI).")] = "full",
    normal_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.3,
) -> None:
    """Head CTs with inserted haemorrhages (five types), masks and labels, as DICOM."""
    from training.synth.ct import synth_ct_dataset

    _logging()
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} exists and is not empty")
    with console.status(f"writing {studies} synthetic head CTs"):
        report = synth_ct_dataset(
            out,
            n_studies=studies,
            seed=seed,
            base=base,  # type: ignore[arg-type]
            size=size,  # type: ignore[arg-type]
            normal_fraction=normal_fraction,
        )
    table = Table(title=f"{report.dataset} (base: {report.base})")
    for col in ("study", "subtype", "volume ml", "label"):
        table.add_column(col)
    for i, s in enumerate(report.studies):
        table.add_row(str(i), s.subtype or "normal", f"{s.volume_ml:.1f}", str(s.label))
    console.print(table)


@synth_app.command("xray")
def synth_xray(
    out: Annotated[Path, typer.Option("--out", help="New dataset folder.")],
    studies: Annotated[int, typer.Option(min=1, max=10000)] = 20,
    seed: int = 0,
    prevalence: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    size: Annotated[str, typer.Option(help="full or small.")] = "full",
) -> None:
    """Chest radiographs with and without a synthetic pneumothorax, as DICOM."""
    from training.synth.xray import synth_xray_dataset

    _logging()
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} exists and is not empty")
    with console.status(f"writing {studies} synthetic radiographs"):
        report = synth_xray_dataset(
            out,
            n_studies=studies,
            seed=seed,
            prevalence=prevalence,
            size=size,  # type: ignore[arg-type]
        )
    console.print(
        f"{report.dataset}: {len(report.studies)} radiographs, {len(report.positives)} with a"
        f" pneumothorax (base: {report.base})"
    )


# --------------------------------------------------------------------------------------------
# import


@import_app.command("rsna")
def import_rsna(
    csv: Annotated[Path, typer.Argument(help="stage_2_train.csv", exists=True, dir_okay=False)],
    images: Annotated[
        Path, typer.Argument(help="Folder of ID_*.dcm", exists=True, file_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out")],
    copy: bool = False,
) -> None:
    """RSNA 2019 Intracranial Haemorrhage Detection."""
    from training.data.adapters import convert_rsna_ich

    _convert(convert_rsna_ich, csv, images, out, copy)


@import_app.command("cq500")
def import_cq500(
    csv: Annotated[Path, typer.Argument(help="reads.csv", exists=True, dir_okay=False)],
    images: Annotated[Path, typer.Argument(help="CQ500 folder", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out")],
    copy: bool = False,
) -> None:
    """CQ500 (qure.ai): three readers' ICH reads, majority vote."""
    from training.data.adapters import convert_cq500

    _convert(convert_cq500, csv, images, out, copy)


@import_app.command("siim")
def import_siim(
    csv: Annotated[Path, typer.Argument(help="train-rle.csv", exists=True, dir_okay=False)],
    images: Annotated[
        Path, typer.Argument(help="Folder of <ImageId>.dcm", exists=True, file_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out")],
    copy: bool = False,
) -> None:
    """SIIM-ACR pneumothorax (RLE masks decoded to NIfTI)."""
    from training.data.adapters import convert_siim_pneumothorax

    _convert(convert_siim_pneumothorax, csv, images, out, copy)


def _convert(fn: Any, csv: Path, images: Path, out: Path, copy: bool) -> None:
    from training.data.dataset import DatasetError

    _logging()
    try:
        rows = fn(csv, images, out, copy=copy)
    except (DatasetError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
    positives = sum(1 for r in rows if r.label == 1)
    console.print(f"{out}: {len(rows)} rows, {positives} positive")


# --------------------------------------------------------------------------------------------
# feedback


@app.command("export-feedback")
def export_feedback_cmd(
    out: Annotated[Path, typer.Option("--out", help="New dataset folder.")],
    data_dir: DataDir = None,
    since: Annotated[datetime | None, typer.Option(help="Only judgements from this time.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's findings.")] = None,
    finding: Annotated[str | None, typer.Option(help="Only this finding code.")] = None,
    salt_file: Annotated[
        Path | None,
        typer.Option(
            help="A secret file whose bytes seed pseudonyms, UIDs and date shifts (reuse it"
            " to link exports; keep it away from the data). Default: a new random salt."
        ),
    ] = None,
) -> None:
    """Readers' agree/disagree/missed judgements as a de-identified dataset (PS3.15 E)."""
    from training.feedback_export import ExportError, export_feedback

    _logging()
    settings = _settings(data_dir)
    salt = salt_file.read_bytes() if salt_file else secrets.token_bytes(32)
    try:
        report = export_feedback(
            settings, out, since=since, model=model, finding=finding, salt=salt
        )
    except ExportError as exc:
        _fail(str(exc))
    console.print(
        f"{report.out}: {report.studies} studies of {report.patients} patients, "
        f"{report.positives} positive / {report.negatives} negative, {report.ties} tied "
        f"(left out), {report.instances} instances; {len(report.missing)} missing files, "
        f"{report.burned_in} left out for burned-in annotation"
    )


# --------------------------------------------------------------------------------------------
# fit


@app.command()
def fit(
    dataset: Annotated[
        Path, typer.Option(help="Dataset folder (generic format).", exists=True, file_okay=False)
    ],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, candidate, plots).")],
    steps: Annotated[int, typer.Option(min=1)] = 200,
    batch_size: Annotated[int, typer.Option(min=1)] = 2,
    lr: float = 1e-4,
    seed: int = 0,
    init: Annotated[
        str, typer.Option(help="pretrained (the published weights) or random.")
    ] = "pretrained",
    member: Annotated[int | None, typer.Option(help="Ensemble member to start from.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 50,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    threshold_rule: Annotated[
        str, typer.Option(help="sensitivity, specificity, youden or keep.")
    ] = "sensitivity",
    threshold_target: float = 0.9,
    register: Annotated[bool, typer.Option(help="Register the version in the registry.")] = True,
    model: Annotated[
        str | None, typer.Option(help="Model to fine-tune (default: by the dataset's task).")
    ] = None,
    registry_uri: RegistryUri = None,
    data_dir: DataDir = None,
) -> None:
    """Fine-tune a model (the haemorrhage network from masks, the chest classifier from
    labels), choose its threshold on validation data, measure it on the test split, log it
    to MLflow and register it."""
    from training.data.dataset import DatasetError
    from training.workflows import FitOptions
    from training.workflows import fit as run_fit
    from triage.models.store import ModelWeightsError

    _logging()
    if init not in ("pretrained", "random"):
        _fail("--init must be pretrained or random")
    if threshold_rule not in ("sensitivity", "specificity", "youden", "keep"):
        _fail("--threshold-rule must be sensitivity, specificity, youden or keep")
    settings = _settings(data_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    options = FitOptions(
        dataset=dataset,
        out=out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        init=init,  # type: ignore[arg-type]
        member=member,
        device=device,
        checkpoint_every=checkpoint_every,
        resume=resume,
        threshold_rule=threshold_rule,  # type: ignore[arg-type]
        threshold_target=threshold_target,
        uri=_uri(settings, registry_uri) if main else None,
        register=register,
    )
    base = _spec(model or _model_for(dataset))
    progress = _progress()
    task = progress.add_task("training steps", total=steps)
    try:
        with progress:
            outcome = run_fit(
                options,
                base=base,
                store=_store(settings),
                on_step=lambda step, loss: progress.update(
                    task, completed=step, description=f"training (loss {loss:.3f})"
                ),
                on_stage=lambda text: progress.console.print(text),
            )
    except (DatasetError, ModelWeightsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if not main or outcome.test is None:
        return
    console.print(
        _metrics_table("candidate on the test split", {"candidate": outcome.test.metrics}, _SHOWN)
    )
    unit = outcome.spec.findings[0].unit if outcome.spec else ""
    console.print(f"threshold: {outcome.threshold} {unit} ({outcome.threshold_reason})")
    console.print(f"candidate: {outcome.candidate}  ({outcome.train.samples_per_s:.2f} samples/s)")
    if outcome.version:
        console.print(
            f"registered [bold]{outcome.spec.name if outcome.spec else ''}[/] version"
            f" [bold]{outcome.version}[/] (run {outcome.run_id}); promote it with"
            f" `triage-train promote --model {outcome.spec.name if outcome.spec else ''}"
            f" --version {outcome.version} --dataset {dataset}`"
        )


# --------------------------------------------------------------------------------------------
# evaluate


@app.command()
def evaluate(
    dataset: Annotated[Path, typer.Option(help="Dataset folder.", exists=True, file_okay=False)],
    model: Annotated[str, typer.Option(help="Model name.")] = "blast-ct-v1",
    version: Annotated[
        str | None, typer.Option(help="A registry version (default: the built-in weights).")
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="A registry alias instead of --version.")
    ] = None,
    split: Annotated[str, typer.Option(help="test, val, train or all.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Folder for plots and per_study.csv.")] = None,
    finding: Annotated[
        str | None, typer.Option(help="Finding code (default: the model's first).")
    ] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    members: Annotated[
        int | None, typer.Option(help="Ensemble members (default: the device's default).")
    ] = None,
    registry_uri: RegistryUri = None,
    data_dir: DataDir = None,
) -> None:
    """Measure a model version on a dataset: AUROC with CI, sensitivity/specificity,
    calibration, Dice and volume error, detection limit; plots as PNG."""
    from training.data.dataset import DatasetError, read_dataset
    from training.evaluate import build_model, write_per_study
    from training.evaluate import evaluate as run_eval
    from training.workflows import split_records
    from triage.models.mlflow_registry import RegistryError, RegistrySource

    _logging()
    settings = _settings(data_dir)
    try:
        ds = read_dataset(dataset)
    except DatasetError as exc:
        _fail(str(exc))
    records = ds.studies if split == "all" else split_records(ds, seed).get(split)
    if records is None:
        _fail("--split must be test, val, train or all")
    if version or alias:
        try:
            source = RegistrySource(
                _uri(settings, registry_uri),
                alias=alias or "champion",
                cache_dir=settings.resolved_model_cache_dir / "registry",
            )
            v = version or source.alias_version(model)
            if v is None:
                _fail(f"{model} has no version with the alias {alias}")
            registered = source.fetch(model, v)
        except RegistryError as exc:
            _fail(str(exc))
        spec, store = registered.spec, registered.store
    else:
        spec, store = _spec(model), _store(settings)
    code = finding or spec.findings[0].code
    progress = _progress()
    task = progress.add_task(f"{spec.name} {spec.version}", total=len(records))
    with progress:
        ev = run_eval(
            build_model(
                spec,
                store,
                device=device,
                members=members,
                precision="fp32" if device == "cpu" else "auto",
            ),
            records,
            finding=code,
            synthetic=ds.meta.get("source") == "synth",
            plots_dir=out,
            seed=seed,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    console.print(
        _metrics_table(f"{spec.name} {spec.version}: {split} split", {"value": ev.metrics}, _SHOWN)
    )
    for reason in ev.summary.reasons:
        console.print(f"[dim]{reason}[/]")
    if out is not None:
        write_per_study(ev, out / "per_study.csv")
        console.print(f"plots and per_study.csv in {out}")


# --------------------------------------------------------------------------------------------
# promote


@app.command()
def promote(
    model: Annotated[str, typer.Option(help="Registered model name.")],
    version: Annotated[str, typer.Option(help="The candidate's registry version.")],
    dataset: Annotated[
        Path,
        typer.Option(
            help="Dataset holding the frozen evaluation set.", exists=True, file_okay=False
        ),
    ],
    split: Annotated[str, typer.Option(help="The frozen split (test) or all.")] = "test",
    metric: Annotated[
        list[str] | None, typer.Option(help="Metrics it must not be worse on (repeat).")
    ] = None,
    tolerance: Annotated[float, typer.Option(min=0.0)] = 0.0,
    alias: str = "champion",
    out: Annotated[Path | None, typer.Option(help="Folder for both models' plots.")] = None,
    seed: int = 0,
    registry_uri: RegistryUri = None,
    data_dir: DataDir = None,
) -> None:
    """Compare a candidate with the alias's version (or the built-in model) on the frozen
    set; move the alias only if it is not worse. Exit 1 when refused."""
    from training.data.dataset import DatasetError, read_dataset
    from training.promote import promote as run_promote
    from training.workflows import split_records
    from triage.models.mlflow_registry import RegistryError

    _logging()
    settings = _settings(data_dir)
    try:
        ds = read_dataset(dataset)
    except DatasetError as exc:
        _fail(str(exc))
    records = ds.studies if split == "all" else split_records(ds, seed).get(split)
    if not records:
        _fail(f"the {split} split of {dataset} is empty")
    builtin = _spec(model)
    progress = _progress()
    tasks: dict[str, Any] = {}

    def report(which: str, done: int, total: int) -> None:
        if which not in tasks:
            tasks[which] = progress.add_task(which, total=total)
        progress.update(tasks[which], completed=done)

    try:
        with progress:
            decision, ev_c, ev_p = run_promote(
                uri=_uri(settings, registry_uri),
                name=model,
                candidate=version,
                records=records,
                finding=builtin.findings[0].code,
                builtin=builtin,
                builtin_store=_store(settings),
                cache_dir=settings.resolved_model_cache_dir / "registry",
                alias=alias,
                metrics=metric,
                tolerance=tolerance,
                synthetic=ds.meta.get("source") == "synth",
                plots_dir=out,
                progress=report,
            )
    except RegistryError as exc:
        _fail(str(exc))
    names = list(decision.metrics) + [m for m in _SHOWN if m not in decision.metrics]
    console.print(
        _metrics_table(
            f"frozen set {decision.frozen_set[:12]} ({decision.studies} studies)",
            {f"candidate v{version}": ev_c.metrics, decision.champion: ev_p.metrics},
            names,
        )
    )
    if decision.promoted:
        console.print(f"[green]promoted[/]: {model} version {version} is now @{alias}")
    else:
        console.print(f"[red]refused[/]: {'; '.join(decision.reasons)}")
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - entry point
    app()
