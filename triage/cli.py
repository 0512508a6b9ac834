"""The ``triage`` command (typer)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from triage.config import Settings

if TYPE_CHECKING:
    from triage.db import Database

app = typer.Typer(
    add_completion=False, help="Radiology triage: DICOM in, prioritised worklist out."
)
console = Console()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings from pydicom can quote attribute values (patient data): route warnings
    # through logging and keep them out of the log.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def _open_db(settings: Settings) -> Database:
    """The configured database, migrated to the newest schema."""
    from triage.db import Database

    db = Database(settings.resolved_database_url)
    db.migrate()
    return db


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@app.command()
def serve(verbose: Verbose = False) -> None:
    """Run the DICOM listener, the AI worker and the web server (settings: TRIAGE_*)."""
    _setup_logging(verbose)
    from triage.models.spec import SpecError
    from triage.serve.server import TriageService

    settings = Settings()
    try:
        service = TriageService(settings)
    except SpecError as exc:
        console.print(f"[red]model configuration:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(
        f"[bold]triage[/] DICOM {settings.ae_title}@{settings.dicom_host}:{settings.dicom_port}"
        f"  web http://{settings.http_host}:{settings.http_port}/  data {settings.data_dir}",
        highlight=False,
    )
    service.serve_forever()


def _finding_text(f: dict[str, Any]) -> str:
    """One flagged finding in a few words: its name, its measure, its severity."""
    name = str(f["finding"]).replace("_", " ")
    blood = f.get("details", {}).get("blood_volume_ml")
    measure = f"{blood:.1f} ml" if blood is not None else f"score {f['score']:.2f}"
    severity = f" [{f['severity']}]" if f.get("severity") == "high" else ""
    return f"{name} {measure}{severity}"


def print_worklist(doc: dict[str, Any]) -> None:
    """The worklist as a table; study text is shown as text (never as console markup), and
    each failed model's reason is listed under the table."""
    from rich.text import Text

    table = Table(title="Reading worklist")
    for col in ("#", "Study", "Modality", "AI", "Flagged", "Class / due", "Reader", "Why here"):
        table.add_column(col)
    errors: list[str] = []
    for item in doc["items"]:
        flagged = [_finding_text(f) for f in item["findings"] if f["flag"]]
        read = [f for f in item["findings"] if not f["flag"]]
        summary = "; ".join(flagged) or ("no flag" if read else "-")
        style = "bold red" if item.get("priority_class") == "critical" else None
        if item.get("ai_error"):
            errors.append(f"#{item['rank']}: {item['ai_error']}")
        table.add_row(
            str(item["rank"]),
            Text(item.get("StudyDescription") or item["StudyInstanceUID"][-16:]),
            "/".join(item.get("ModalitiesInStudy") or []),
            item["ai_status"] + (" (see below)" if item.get("ai_error") else ""),
            Text(summary),
            f"{item.get('priority_class', '')} {str(item.get('deadline', ''))[11:16]}",
            Text(item.get("claimed_by") or ""),
            ", ".join(item["reasons"]),
            style=style,
        )
    console.print(table)
    for line in errors:
        console.print(Text(line), highlight=False)


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the installed models: what each reads, its findings and thresholds, the state of
    its weights and the device it would run on."""
    from triage.analysis import Analyzer
    from triage.models.device import cpu_info
    from triage.models.spec import SpecError

    settings = Settings()
    try:
        registry = Analyzer.from_settings(settings).registry
        models = registry.inventory()
    except (SpecError, ValueError) as exc:
        console.print(f"[red]model configuration:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    cpu = cpu_info()
    doc = {"models": models, "cpu": cpu, "mirror": settings.model_mirror}
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(title="Installed models")
    for column in ("model", "reads", "findings (threshold, class)", "weights", "runs on"):
        table.add_column(column)
    for m in models:
        findings = "\n".join(
            f"{f['code']} >= {f['threshold']:g} {f['unit']}"
            + (f" -> {f['escalate_to']}" if f["escalate_to"] else "")
            for f in m["findings"]
        )
        runtime = m["runtime"]
        members = runtime.get("members")
        runs_on = f"{runtime.get('device', '?')} {runtime.get('precision', '')}".strip()
        if members:
            runs_on += f", members {','.join(str(n) for n in members)}"
        table.add_row(
            f"{m['name']}\n{m['version']}", m["accepts"], findings, m["weights_state"], runs_on
        )
    console.print(table)
    console.print(
        f"CPU: {cpu['model']} (AMX {'yes' if cpu['amx'] else 'no'}, "
        f"AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'})",
        highlight=False,
    )


@app.command()
def worklist(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON document.")] = False,
) -> None:
    """Print the reading worklist from the database (the same document as GET /api/worklist)."""
    from triage.worklist.priority import load_policy
    from triage.worklist.service import worklist as build

    settings = Settings()
    doc = build(_open_db(settings), config=load_policy(settings.policy_file))
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        print_worklist(doc)


@app.command("import")
def import_cmd(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    verbose: Verbose = False,
) -> None:
    """Import DICOM files through the same validation and storage as the DICOM listener.

    Files that are rejected are kept in quarantine with the reason (see ``triage quarantine``).
    A running ``triage serve`` on the same data directory picks the studies up for analysis.
    """
    _setup_logging(verbose)
    from rich.progress import Progress

    from triage.ingest.store import Ingestor

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or folder:[/] {', '.join(missing)}")
        raise typer.Exit(2)
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    settings = Settings()
    settings.ensure_dirs()
    ingestor = Ingestor.from_settings(settings, _open_db(settings))
    counts = {"stored": 0, "with warning": 0, "duplicate": 0, "rejected": 0}
    rejected: list[tuple[Path, str]] = []
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("importing", total=len(files))
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as exc:
                counts["rejected"] += 1
                rejected.append((f, f"cannot read the file: {exc.strerror}"))
                progress.advance(task)
                continue
            outcome = ingestor.ingest(data, source="import")
            if not outcome.ok:
                key = "rejected"
                rejected.append((f, f"0x{int(outcome.status):04X} {outcome.reason}"))
            elif outcome.duplicate:
                key = "duplicate"
            else:
                key = "stored" if outcome.status == 0 else "with warning"
            counts[key] += 1
            progress.advance(task)
    for path, reason in rejected[:20]:
        console.print(f"[red]rejected[/] {path}: {reason}", markup=True, highlight=False)
    if len(rejected) > 20:
        console.print(f"... and {len(rejected) - 20} more")
    console.print(
        f"{len(files)} file(s): {counts['stored']} stored, {counts['with warning']} stored with"
        f" a warning, {counts['duplicate']} already stored, {counts['rejected']} rejected"
        " (kept in quarantine: `triage quarantine`)"
    )
    if counts["rejected"]:
        raise typer.Exit(1)


@app.command("quarantine")
def quarantine_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON document.")] = False,
) -> None:
    """List rejected input kept in quarantine, newest first (the same as GET /api/quarantine)."""
    from triage.ingest.store import quarantine_listing

    db = _open_db(Settings())
    doc = quarantine_listing(db)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(title="Quarantine")
    for col in ("#", "received", "source", "status", "reason", "sha256"):
        table.add_column(col)
    for item in doc["items"]:
        table.add_row(
            str(item["id"]),
            str(item["received_at"])[:19],
            str(item["source"]),
            str(item["status"]),
            str(item["reason"]),
            str(item["sha256"])[:12],
        )
    console.print(table)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Run preprocessing and the models on DICOM files without a server."""
    _setup_logging(verbose)
    from triage.analysis import Analyzer, group_files

    settings = Settings()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or folder:[/] {', '.join(missing)}")
        raise typer.Exit(2)
    from triage.models.spec import SpecError

    try:
        analyzer = Analyzer.from_settings(settings)
    except SpecError as exc:
        console.print(f"[red]model configuration:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    studies = group_files(paths)
    if not studies:
        console.print("[red]no DICOM files found[/]")
        raise typer.Exit(2)
    results = [analyzer.analyze(uid, series).to_json() for uid, series in studies.items()]
    doc = {"studies": results}
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    for r in results:
        console.print(f"[bold]{r['StudyInstanceUID']}[/]: {r['ai_status']} {r['error'] or ''}")
        for run in r["runs"]:
            if run["error"]:
                console.print(f"  {run['model']}: {run['status']} {run['error']}")
        for f in r["findings"]:
            vols = ", ".join(f"{k} {v:.2f} ml" for k, v in f["volumes_ml"].items())
            extra = f" severity={f['severity']}" if f.get("severity") else ""
            console.print(
                f"  {f['finding']} ({f['model']['name']}): flag={f['flag']} "
                f"score={f['score']:.3f}{extra}" + (f" ({vols})" if vols else "")
            )


@app.command("simulate")
def simulate_cmd(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Simulation settings, TOML or JSON (see docs/simulation.md)."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for simulation.json, simulation.md and PNGs.")
    ] = Path("simulation"),
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the first day (overrides the config).")
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", min=1, help="Days to simulate (seeds seed, seed+1, ...).")
    ] = 1,
) -> None:
    """Simulate a reading service: FIFO vs the triage policy on the same studies."""
    from pydantic import ValidationError
    from rich.markup import escape

    from triage.simulate.config import load_config
    from triage.simulate.model import run_experiment
    from triage.simulate.report import goal_lines, rich_table, write_outputs

    try:
        cfg = load_config(config)
    except (OSError, ValueError, ValidationError) as exc:
        console.print(f"[red]cannot read the simulation settings {config}:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    exp = run_experiment(cfg, runs)
    summ, paths = write_outputs(exp, out)
    console.print(rich_table(exp, summ))
    for line in goal_lines(exp, summ):
        console.print(line, highlight=False, markup=False)
    console.print(
        f"simulated in {exp.seconds:.2f} s; wrote {', '.join(str(p) for p in paths)}",
        highlight=False,
    )


@app.command()
def demo(
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving/--exit", help="Keep serving the page afterwards.")
    ] = True,
    verbose: Verbose = False,
) -> None:
    """Start the server, send demo studies over DICOM, wait for the AI, show the worklist."""
    _setup_logging(verbose)
    from triage.demo.run import run_demo

    run_demo(Settings(), console=console, keep_serving=keep_serving, print_worklist=print_worklist)


if __name__ == "__main__":
    app()
