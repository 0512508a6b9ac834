"""The ``triage`` command (typer)."""

from __future__ import annotations

import errno
import json
import logging
import socket
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from triage.config import Settings

if TYPE_CHECKING:
    from triage.analysis import SeriesFiles, StudyAnalysis
    from triage.db import Database

app = typer.Typer(
    add_completion=False,
    help="Radiology triage: DICOM in, prioritised worklist out. Settings come from TRIAGE_*"
    " environment variables (or a .env file); the data folder (database, DICOM store,"
    " results) is TRIAGE_DATA_DIR, default ./triage-data, or --data-dir.",
)
console = Console()

# Never written to the terminal as they are: they come from DICOM headers and other input
# and could move the cursor, retitle the window or reorder what is shown.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _shown(ch: str) -> str:
    if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS:
        return ch.encode("unicode_escape").decode("ascii")  # ESC -> \x1b, newline -> \n
    return ch


def printable(value: object) -> str:
    """``value`` as text that is safe to write to a terminal: control characters (ESC and
    every other C0/C1 control, DEL, line separators, bidirectional overrides) are shown as
    escapes such as ``\\x1b``. Print the result as :class:`rich.text.Text` (or with
    ``markup=False``) so that brackets in it are not read as console markup."""
    text = str(value)
    return text if text.isprintable() else "".join(_shown(ch) for ch in text)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    typer.echo(f"error: {printable(message)}", err=True)
    raise typer.Exit(code)


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The data folder (database, DICOM store, results, model cache). Default: the"
        " TRIAGE_DATA_DIR environment variable, else ./triage-data.",
        show_default=False,
        file_okay=False,
    ),
]


def _settings(data_dir: Path | None) -> Settings:
    """The settings, with ``--data-dir`` (when given) in place of TRIAGE_DATA_DIR."""
    from pydantic import ValidationError

    try:
        return Settings(data_dir=data_dir) if data_dir is not None else Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"TRIAGE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        _fail(f"invalid setting: {problems}")


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


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL (None: not SQLite, or in memory)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _open_db(settings: Settings, *, create: bool = True) -> Database:
    """The configured database, migrated to the newest schema.

    Args:
        settings: the settings.
        create: make a new SQLite database when there is none (commands that store data);
            False for commands that only read: a missing database is then an error naming
            the folder (TRIAGE_DATA_DIR, ``--data-dir``), and no empty database is left there.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from triage.db import Database

    url = settings.resolved_database_url
    shown = make_url(url).render_as_string(hide_password=True)
    file = _sqlite_file(url)
    if not create and file is not None and not file.is_file():
        if settings.database_url is None:
            _fail(
                f"no triage database in {settings.data_dir.resolve()} (no {file.name} there):"
                " give the data folder with --data-dir or TRIAGE_DATA_DIR, or create it with"
                " `triage import` or `triage serve`"
            )
        _fail(f"the database {shown} (TRIAGE_DATABASE_URL) does not exist")
    try:
        db = Database(url)
        db.migrate()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        _fail(f"cannot open the database {shown}: {reason}")
    return db


def _port_in_use(host: str, port: int, what: str, setting: str, host_setting: str) -> None:
    """Exit with one line naming the port and its setting when ``host:port`` cannot be
    listened on (e.g. another ``triage serve`` holds it). Binds a test socket the way the
    servers do (SO_REUSEADDR), so a port left in TIME_WAIT counts as free."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        _fail(f"cannot listen for {what} on {host}: unknown address ({exc}); check {host_setting}")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                _fail(
                    f"the {what} port {port} on {host} is already in use (another triage"
                    f" serve?): stop that program or set {setting} to a free port"
                )
            _fail(
                f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc};"
                f" check {host_setting} and {setting}"
            )


def _check_ports(settings: Settings) -> None:
    """The DICOM and HTTP ports can be listened on (one line and exit 2 when not)."""
    if settings.dicom_port == settings.http_port:
        _fail(
            f"TRIAGE_DICOM_PORT and TRIAGE_HTTP_PORT are both {settings.http_port}:"
            " give them different ports"
        )
    _port_in_use(
        settings.dicom_host, settings.dicom_port, "DICOM", "TRIAGE_DICOM_PORT", "TRIAGE_DICOM_HOST"
    )
    _port_in_use(
        settings.http_host, settings.http_port, "web (HTTP)", "TRIAGE_HTTP_PORT", "TRIAGE_HTTP_HOST"
    )


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@app.command()
def serve(data_dir: DataDir = None, verbose: Verbose = False) -> None:
    """Run the DICOM listener, the AI worker and the web server (settings: TRIAGE_*; ports
    TRIAGE_DICOM_PORT and TRIAGE_HTTP_PORT; TRIAGE_EMBEDDED_WORKER=false leaves the AI to
    `triage worker` processes)."""
    _setup_logging(verbose)
    from triage.auth.ldap import LdapConfigError
    from triage.auth.oidc import OidcConfigError
    from triage.models.mlflow_registry import RegistryError
    from triage.models.spec import SpecError
    from triage.serve.server import TriageService

    settings = _settings(data_dir)
    _check_ports(settings)
    try:
        service = TriageService(settings)
    except SpecError as exc:
        console.print(f"[red]model configuration:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except (LdapConfigError, OidcConfigError) as exc:
        _fail(f"sign-in settings: {exc}")
    except RegistryError as exc:
        _fail(f"model registry: {exc}")
    where = (
        f"DICOM {settings.ae_title}@{settings.dicom_host}:{settings.dicom_port}"
        f"  web http://{settings.http_host}:{settings.http_port}/  data {settings.data_dir}"
    )
    console.print(f"[bold]triage[/] {escape(printable(where))}", highlight=False)
    try:
        service.serve_forever()
    except OSError as exc:
        # The ports were free a moment ago; another program took one since (the DICOM
        # listener raises; the web server logs its own error and exits 1).
        if exc.errno != errno.EADDRINUSE:
            raise
        _fail(
            f"the DICOM port {settings.dicom_port} on {settings.dicom_host} is already in use:"
            " stop that program or set TRIAGE_DICOM_PORT to a free port"
        )


@app.command("worker")
def worker_cmd(
    data_dir: DataDir = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Where the models run: auto, cpu, cuda or cuda:N (one GPU per worker)."
            " Default: TRIAGE_DEVICE.",
            show_default=False,
        ),
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="This worker's name in the jobs table, unique per process. Default:"
            " <host name>:<process id>.",
            show_default=False,
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0,
            help="On SIGTERM or Ctrl-C, seconds the study being analysed may take to finish"
            " before it is given back to the queue (a second signal gives it back at once).",
        ),
    ] = 30.0,
    verbose: Verbose = False,
) -> None:
    """Run the AI worker alone: assemble quiet studies and analyse queued ones, with no DICOM
    or web listener. Any number share one database and file store with the `triage serve`
    processes (TRIAGE_EMBEDDED_WORKER=false there; docs/deployment.md)."""
    import re

    _setup_logging(verbose)
    settings = _settings(data_dir)
    if device is not None:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device):
            _fail(f"--device {device}: use auto, cpu, cuda or cuda:N")
        settings = settings.model_copy(update={"device": device})
    if worker_id is not None and not 0 < len(worker_id) <= 128:
        _fail("--id: 1 to 128 characters")
    if not settings.store_dir.is_dir():
        _fail(
            f"no DICOM store at {settings.store_dir.resolve()}: a worker reads the files that"
            " `triage serve` stores; give the shared data folder with --data-dir or"
            " TRIAGE_DATA_DIR (the same path as the serve processes)"
        )
    db = _open_db(settings, create=False)
    from triage.jobs.process import WorkerProcess, WorkerSetupError

    try:
        process = WorkerProcess(settings, db, worker_id=worker_id)
    except WorkerSetupError as exc:
        _fail(str(exc))
    where = f"worker {process.worker.worker_id} on {process.device}  data {settings.data_dir}"
    console.print(f"[bold]triage[/] {escape(printable(where))}", highlight=False)
    raise typer.Exit(process.run(grace_seconds=grace))


def _finding_text(f: dict[str, Any]) -> str:
    """One flagged finding in a few words: its name, its measure, its severity."""
    name = str(f["finding"]).replace("_", " ")
    blood = f.get("details", {}).get("blood_volume_ml")
    measure = f"{blood:.1f} ml" if blood is not None else f"score {f['score']:.2f}"
    severity = f" [{f['severity']}]" if f.get("severity") == "high" else ""
    return f"{name} {measure}{severity}"


def _cell(value: object) -> Text:
    """A table cell from data: printable text, never console markup."""
    return Text(printable(value))


def print_worklist(doc: dict[str, Any]) -> None:
    """The worklist as a table; every value from the database is shown as text (never as
    console markup, control characters escaped), and each failed model's reason is listed
    under the table."""
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
            _cell(item["rank"]),
            _cell(item.get("StudyDescription") or item["StudyInstanceUID"][-16:]),
            _cell("/".join(item.get("ModalitiesInStudy") or [])),
            _cell(item["ai_status"] + (" (see below)" if item.get("ai_error") else "")),
            _cell(summary),
            _cell(f"{item.get('priority_class', '')} {str(item.get('deadline', ''))[11:16]}"),
            _cell(item.get("claimed_by") or ""),
            _cell(", ".join(item["reasons"])),
            style=style,
        )
    console.print(table)
    total = doc.get("total", len(doc["items"]))
    if total > len(doc["items"]):
        first = doc.get("offset", 0) + 1
        shown = f"{first}-{first + len(doc['items']) - 1}" if doc["items"] else "none"
        console.print(_cell(f"studies {shown} of {total} (--limit, --offset)"), highlight=False)
    for line in errors:
        console.print(_cell(line), highlight=False)


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List the installed models: what each reads, its findings and thresholds, the state of
    its weights and the device it would run on."""
    from triage.analysis import Analyzer
    from triage.models.device import cpu_info
    from triage.models.spec import SpecError

    settings = _settings(data_dir)
    try:
        registry = Analyzer.from_settings(settings).registry
        models = registry.inventory()
    except (SpecError, ValueError) as exc:
        console.print(f"[red]model configuration:[/] {escape(str(exc))}", highlight=False)
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
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Show the first N studies in reading order.")
    ] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many first.")] = 0,
    data_dir: DataDir = None,
) -> None:
    """Print one page of the reading worklist from the database in the data folder (the same
    document as GET /api/worklist)."""
    from triage.worklist.priority import load_policy
    from triage.worklist.service import worklist as build

    settings = _settings(data_dir)
    try:
        policy = load_policy(settings.policy_file)
    except (OSError, ValueError) as exc:
        _fail(f"cannot read the policy file {settings.policy_file} (TRIAGE_POLICY_FILE): {exc}")
    doc = build(_open_db(settings, create=False), config=policy, limit=limit, offset=offset)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        print_worklist(doc)


@app.command("import")
def import_cmd(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    data_dir: DataDir = None,
    verbose: Verbose = False,
) -> None:
    """Import DICOM files into the data folder through the same validation and storage as the
    DICOM listener.

    Files that are rejected are kept in quarantine with the reason (see ``triage quarantine``).
    A running ``triage serve`` on the same data directory picks the studies up for analysis.
    """
    _setup_logging(verbose)
    from rich.progress import Progress

    from triage.ingest.store import Ingestor

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or folder:[/] {escape(printable(', '.join(missing)))}")
        raise typer.Exit(2)
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    settings = _settings(data_dir)
    try:
        settings.ensure_dirs()
    except OSError as exc:
        _fail(f"cannot create the data folder {settings.data_dir}: {exc.strerror or exc}")
    ingestor = Ingestor.from_settings(settings, _open_db(settings))
    counts = {"stored": 0, "with warning": 0, "duplicate": 0, "rejected": 0, "not stored": 0}
    rejected: list[tuple[Path, str, str]] = []  # (file, what happened, why)
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("importing", total=len(files))
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as exc:
                counts["not stored"] += 1
                rejected.append((f, "not stored", f"cannot read the file: {exc.strerror}"))
                progress.advance(task)
                continue
            outcome = ingestor.ingest(data, source="import")
            if not outcome.ok:
                # Refused input is kept in quarantine; what was not even kept there (the
                # disk or the database failing, 0xA7xx) is for the user to import again.
                key = "rejected" if outcome.quarantine_id is not None else "not stored"
                why = f"0x{int(outcome.status):04X} {outcome.reason}"
                rejected.append((f, key, why))
            elif outcome.duplicate:
                key = "duplicate"
            else:
                key = "stored" if outcome.status == 0 else "with warning"
            counts[key] += 1
            progress.advance(task)
    for path, what, reason in rejected[:20]:
        line = Text.assemble((what, "red"), f" {printable(path)}: {printable(reason)}")
        console.print(line, highlight=False)
    if len(rejected) > 20:
        console.print(f"... and {len(rejected) - 20} more")
    console.print(
        f"{len(files)} file(s): {counts['stored']} stored, {counts['with warning']} stored with"
        f" a warning, {counts['duplicate']} already stored, {counts['rejected']} rejected"
        " (kept in quarantine: `triage quarantine`)"
        + (
            f", {counts['not stored']} not stored (not kept either: import them again)"
            if counts["not stored"]
            else ""
        )
    )
    if counts["rejected"] or counts["not stored"]:
        raise typer.Exit(1)


@app.command("quarantine")
def quarantine_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON document.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List rejected input kept in quarantine in the data folder, newest first (the same as
    GET /api/quarantine)."""
    from triage.ingest.store import quarantine_listing

    db = _open_db(_settings(data_dir), create=False)
    doc = quarantine_listing(db)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(title="Quarantine")
    for col in ("#", "received", "source", "status", "reason", "sha256"):
        table.add_column(col)
    for item in doc["items"]:
        table.add_row(
            _cell(item["id"]),
            _cell(str(item["received_at"])[:19]),
            _cell(item["source"]),
            _cell(item["status"]),
            _cell(item["reason"]),
            _cell(str(item["sha256"])[:12]),
        )
    console.print(table)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks",
            help="Also write each label finding's mask (and a JSON sidecar) under"
            " <folder>/<StudyInstanceUID>/<model>__<finding>.*, for scoring outside the product.",
            show_default=False,
        ),
    ] = None,
    mask_format: Annotated[
        Literal["nifti", "seg"] | None,
        typer.Option(
            "--mask-format",
            help="nifti: a uint8 label map (.nii.gz, class indices as the model's outputs);"
            " seg: the product's DICOM Segmentation (.dcm). Default: nifti.",
            show_default=False,
        ),
    ] = None,
    mask_grid: Annotated[
        Literal["model", "source"] | None,
        typer.Option(
            "--mask-grid",
            help="NIfTI grid: model (the model's 1 mm grid, exact) or source (the source CT"
            " series' voxels, nearest neighbour). Default: model.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = None,
    verbose: Verbose = False,
) -> None:
    """Run preprocessing and the models on DICOM files without a server (weights are cached
    under the data folder). Exits 1 when no study could be analysed (ok or partial), or
    when a mask asked for with --masks could not be written."""
    _setup_logging(verbose)
    from triage.analysis import Analyzer, group_files

    settings = _settings(data_dir)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or folder:[/] {escape(printable(', '.join(missing)))}")
        raise typer.Exit(2)
    _check_mask_options(masks, mask_format, mask_grid)
    from triage.models.spec import SpecError

    try:
        analyzer = Analyzer.from_settings(settings)
    except SpecError as exc:
        console.print(f"[red]model configuration:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    studies = group_files(paths)
    if not studies:
        console.print("[red]no DICOM files found[/]")
        raise typer.Exit(2)
    results: list[dict[str, Any]] = []
    for uid, series in studies.items():
        analysis = analyzer.analyze(uid, series)
        result = analysis.to_json()
        if masks is not None:
            result["masks"] = _export_masks(masks, analysis, series, mask_format, mask_grid)
        results.append(result)
    doc = {"studies": results}
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for r in results:
            head = Text.assemble(
                (printable(r["StudyInstanceUID"]), "bold"),
                f": {r['ai_status']} {printable(r['error'] or '')}",
            )
            console.print(head, highlight=False)
            for run in r["runs"]:
                if run["error"]:
                    line = f"  {run['model']}: {run['status']} {run['error']}"
                    console.print(_cell(line), highlight=False)
            for f in r["findings"]:
                vols = ", ".join(f"{k} {v:.2f} ml" for k, v in f["volumes_ml"].items())
                extra = f" severity={f['severity']}" if f.get("severity") else ""
                line = (
                    f"  {f['finding']} ({f['model']['name']}): flag={f['flag']} "
                    f"score={f['score']:.3f}{extra}" + (f" ({vols})" if vols else "")
                )
                console.print(_cell(line), highlight=False)
    if masks is not None:
        _print_masks(masks, results, to_stderr=as_json)
    if not any(r["ai_status"] in ("ok", "partial") for r in results):
        _fail(f"no study was analysed: {_why_not_analysed(results)}", 1)
    failed = [m for r in results for m in r.get("masks", []) if m["error"]]
    if failed:
        _fail(f"{len(failed)} mask(s) not written: {failed[0]['error']}", 1)


def _check_mask_options(masks: Path | None, mask_format: str | None, mask_grid: str | None) -> None:
    """Refuse mask options that do not go together (exit 2); create the --masks folder and
    check that it takes files, before any model runs."""
    from triage.mask_export import MaskExportError, prepare_out_dir

    if masks is None:
        if mask_format or mask_grid:
            _fail("--mask-format and --mask-grid need --masks <folder>")
        return
    if mask_format == "seg" and mask_grid == "model":
        _fail("a DICOM Segmentation lies on the source images: --mask-grid model does not apply")
    try:
        prepare_out_dir(masks)
    except MaskExportError as exc:
        _fail(str(exc))


def _export_masks(
    masks: Path,
    analysis: StudyAnalysis,
    series: list[SeriesFiles],
    mask_format: Literal["nifti", "seg"] | None,
    mask_grid: Literal["model", "source"] | None,
) -> list[dict[str, Any]]:
    """The masks of one analysed study written under ``masks``, as JSON entries."""
    from triage.mask_export import export_study_masks

    files = export_study_masks(
        masks,
        study_uid=analysis.StudyInstanceUID,
        findings=analysis.findings,
        overlays=analysis.overlays,
        series_paths={se.SeriesInstanceUID: se.paths for se in series},
        mask_format=mask_format or "nifti",
        grid=mask_grid or "model",
    )
    return [f.to_json() for f in files]


def _print_masks(masks: Path, results: list[dict[str, Any]], *, to_stderr: bool) -> None:
    """One summary line saying where the masks went (stderr under --json, so that stdout
    stays the JSON document), and one line per mask that could not be written."""
    entries = [m for r in results for m in r.get("masks", [])]
    written = [m for m in entries if m["path"]]
    empty = [m for m in entries if not m["path"] and not m["error"]]
    kinds = sorted({f"{m['format']}, {m['grid']} grid" for m in entries})
    line = f"masks: {len(written)} written to {masks}" + (f" ({'; '.join(kinds)})" if kinds else "")
    if empty:
        line += f", {len(empty)} without a labelled pixel (sidecar only)"
    if not entries:
        line += " (no finding with a label map)"
    lines = [line] + [
        f"  {m['model']} {m['finding']}: mask not written: {m['error']}"
        for m in entries
        if m["error"]
    ]
    for text in lines:
        if to_stderr:
            typer.echo(printable(text), err=True)
        else:
            console.print(_cell(text), highlight=False)


def _why_not_analysed(results: list[dict[str, Any]]) -> str:
    """Why none of the studies was analysed: each outcome with its count and first reason
    (the models' error, else the router's reason)."""
    outcomes: dict[str, tuple[int, str | None]] = {}
    for r in results:
        count, reason = outcomes.get(r["ai_status"], (0, None))
        reason = reason or r.get("error") or (r.get("routing") or {}).get("reason")
        outcomes[r["ai_status"]] = (count + 1, reason)
    parts = []
    for status, (count, reason) in outcomes.items():
        if status == "no_applicable_model":
            reason = "; ".join(filter(None, [reason, "the installed models: `triage models`"]))
        parts.append(f"{count} {status.replace('_', ' ')}" + (f" ({reason})" if reason else ""))
    return "; ".join(parts)


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
        int | None,
        typer.Option(
            "--runs",
            min=1,
            help="Days to simulate (seeds seed, seed+1, ...). Default 50 (enough for a stable"
            " verdict on the headline, see docs/simulation.md); with --sweep, 10 per cell.",
            show_default=False,
        ),
    ] = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="NAME=v1,v2,...: simulate every combination of the values (at most 2"
            " parameters, 36 cells, 400 days in all; default 10 days per cell, so a 3x3 sweep"
            " of 2,000-study days takes about 30 s here) and write sweep.json, sweep.md and"
            " sweep.png. NAME: prevalence, sensitivity, specificity, radiologists,"
            " studies_per_day, ai_latency_minutes. Repeat for a second parameter.",
        ),
    ] = None,
    replay: Annotated[
        str | None,
        typer.Option(
            "--replay",
            help="URL of a running server started with --replay-setup's settings: replay the"
            " day (seed) through its HTTP API, readers as clients, and compare its ordering"
            " with the simulated ones (replay.json, replay.md).",
        ),
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option("--tokens", help="With --replay: the tokens file --replay-setup wrote."),
    ] = None,
    speed: Annotated[
        float,
        typer.Option("--speed", help="With --replay(-setup): simulated minutes per real minute."),
    ] = 600.0,
    replay_setup: Annotated[
        Path | None,
        typer.Option(
            "--replay-setup",
            help="Write a replay server's settings to this folder (the policy scaled by"
            " --speed, the SIMULATION-ONLY replay model's spec, replay.env, accounts and"
            " tokens.json) and print how to start it.",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Simulate a reading service: FIFO vs the triage policy on the same studies."""
    from pydantic import ValidationError
    from rich.markup import escape

    from triage.simulate.config import (
        DEFAULT_RUNS,
        SWEEP_DEFAULT_RUNS,
        load_config,
        parse_sweep,
        sweep_grid,
    )
    from triage.simulate.model import run_experiment, run_sweep
    from triage.simulate.report import (
        goal_lines,
        goals_table,
        rich_table,
        sweep_table,
        write_outputs,
        write_sweep_outputs,
    )

    try:
        cfg = load_config(config)
    except (OSError, ValueError, ValidationError) as exc:
        console.print(f"[red]cannot read the simulation settings {config}:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    # The tables are wider than 80 columns (the width rich assumes off a terminal).
    wide = console if console.width >= 130 else Console(width=130)
    if replay is not None or replay_setup is not None:
        from triage.simulate.replay import ReplayError
        from triage.simulate.replay_cli import replay_main, setup_main

        try:
            if sweep or (replay is not None and replay_setup is not None):
                raise ReplayError("--replay, --replay-setup and --sweep go one at a time")
            if data_dir is not None and replay_setup is None:
                raise ReplayError("--data-dir goes with --replay-setup (the server's data folder)")
            if replay_setup is not None:
                setup_main(
                    cfg, replay_setup, speed, data_dir=data_dir, config_path=config, console=console
                )
            else:
                assert replay is not None
                replay_main(cfg, replay, tokens, speed, out=out, console=console, wide=wide)
        except ReplayError as exc:
            _fail(str(exc))
        return
    if sweep:
        try:
            parameters = [parse_sweep(spec) for spec in sweep]
            cells = sweep_grid(cfg, parameters, runs or SWEEP_DEFAULT_RUNS)
        except ValueError as exc:
            _fail(str(exc))
        result = run_sweep(cells, parameters, runs or SWEEP_DEFAULT_RUNS)
        rows, paths = write_sweep_outputs(result, out)
        wide.print(sweep_table(result, rows))
        console.print(
            f"simulated in {result.seconds:.1f} s; wrote {', '.join(str(p) for p in paths)}",
            highlight=False,
        )
        return
    exp = run_experiment(cfg, runs or DEFAULT_RUNS)
    summ, paths = write_outputs(exp, out)
    wide.print(rich_table(exp, summ))
    wide.print(goals_table(exp, summ))
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
    data_dir: DataDir = None,
    verbose: Verbose = False,
) -> None:
    """Start the server, send demo studies over DICOM, wait for the AI, show the worklist.
    Exits 1 when the AI could analyse none of them (the reason is printed)."""
    _setup_logging(verbose)
    from triage.auth.ldap import LdapConfigError
    from triage.auth.oidc import OidcConfigError
    from triage.demo.run import DemoError, run_demo
    from triage.models.spec import SpecError

    settings = _settings(data_dir)
    _check_ports(settings)
    try:
        run_demo(
            settings, console=console, keep_serving=keep_serving, print_worklist=print_worklist
        )
    except SpecError as exc:
        _fail(f"model configuration: {exc}")
    except (LdapConfigError, OidcConfigError) as exc:
        _fail(f"sign-in settings: {exc}")
    except DemoError as exc:
        _fail(str(exc), 1)


def _register_admin_commands() -> None:
    from triage.cli_admin import accounts_app, audit_app, tokens_app

    app.add_typer(accounts_app, name="accounts")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(audit_app, name="audit")


_register_admin_commands()

if __name__ == "__main__":
    app()
