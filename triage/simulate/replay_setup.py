"""The set-up of a replay server: the scaled policy, the replay model's spec, the settings,
the accounts and their tokens (``triage simulate --replay-setup DIR``), and the tokens file.

A replay (:mod:`triage.simulate.replay`) plays a simulated day ``speed`` times faster than
real time against a ``triage serve`` of its own. That server needs:

* the simulation's policy with every service-level time divided by ``speed``
  (:func:`scaled_policy`, written as ``replay-policy.json`` for ``TRIAGE_POLICY_FILE``);
* the replay model, alone (``model-specs/simulation-replay.json`` for
  ``TRIAGE_MODEL_SPECS_DIR``, ``TRIAGE_MODELS='["simulation-replay"]'``);
* a short assembly quiet period and poll, so that the AI result arrives about
  ``ai_latency_minutes`` (scaled) after the study (:func:`server_timing`);
* an integration account to send the studies and one radiologist account per reader, with
  a token each (``tokens.json``).

:func:`prepare_replay` writes all of it (and ``replay.env`` with the settings) and makes the
accounts in the server's database before the server starts.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triage.domain import location_class
from triage.simulate.config import SimulationConfig
from triage.simulate.replay_model import MODEL_NAME, spec_document
from triage.worklist.priority import PolicyConfig

__all__ = [
    "ENV_FILE",
    "POLICY_FILE",
    "SPEC_DIR",
    "TOKENS_FILE",
    "ReplayError",
    "ReplaySetup",
    "ReplayTokens",
    "check_config",
    "check_speed",
    "load_tokens",
    "prepare_replay",
    "reader_count",
    "scaled_policy",
    "server_env",
    "server_timing",
]

MIN_SPEED = 1.0
MAX_SPEED = 6000.0
"""``--speed`` bounds: real time up to 100 simulated minutes per real second (at 6,000 a
critical deadline of 15 min is 0.15 s, of the order of one HTTP round trip and the server's
analysis: faster replays measure the server's latency, not its ordering)."""

POLICY_FILE = "replay-policy.json"
SPEC_DIR = "model-specs"
ENV_FILE = "replay.env"
TOKENS_FILE = "tokens.json"
INGEST_ACCOUNT = "replay-ingest"
READER_ACCOUNT = "replay-reader-{:02d}"


# What the replay writes as CurrentPatientLocation for each simulated location; the server's
# ingest reads it back with triage.domain.location_class (checked before a replay starts).
LOCATION_TEXT: dict[str, str] = {
    "emergency": "EMERGENCY DEPARTMENT",
    "inpatient": "INPATIENT WARD",
}
OUTPATIENT = "outpatient"  # the simulator's name for "no location class"


class ReplayError(Exception):
    """A mistake the user can fix (server unreachable, bad token, wrong policy...); the
    message is one line."""


# -- set-up --------------------------------------------------------------------------------


def check_speed(speed: float) -> None:
    """Raise :class:`ReplayError` unless ``MIN_SPEED <= speed <= MAX_SPEED``."""
    if not math.isfinite(speed) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ReplayError(f"--speed must be from {MIN_SPEED:g} to {MAX_SPEED:g}, got {speed:g}")


def scaled_policy(policy: PolicyConfig, speed: float) -> PolicyConfig:
    """The policy with every service-level time divided by ``speed`` (real minutes on a
    server replaying ``speed`` times faster); aging, finding and location rules unchanged."""
    data = policy.model_dump(mode="json")
    data["sla_minutes"] = {k: float(v) / speed for k, v in policy.sla_minutes.items()}
    return PolicyConfig.model_validate(data)


def reader_count(config: SimulationConfig) -> int:
    """Readers the day needs: the roster's largest hour, else ``radiologists``."""
    if config.radiologists_by_hour is not None:
        return max(config.radiologists_by_hour)
    return config.radiologists


def server_timing(config: SimulationConfig, speed: float) -> tuple[float, float]:
    """(TRIAGE_SERIES_QUIET_SECONDS, TRIAGE_WORKER_POLL_SECONDS) for a replay server.

    The simulated AI result is on the worklist ``ai_latency_minutes`` after arrival; on the
    server it is there after the series is quiet, the next assembly round and the analysis.
    A replayed study is one instance, so the quiet period can be short: quiet + one poll is
    set to the scaled latency (at least 0.05 s + 0.02 s: the server's analysis and the
    rounds take some tens of milliseconds anyway; the report counts the studies claimed
    before their AI result on the server and in the simulation).
    """
    target = config.ai_latency_minutes * 60.0 / speed
    poll = min(0.5, max(0.02, target / 5.0))
    quiet = max(0.05, target - poll)
    return round(quiet, 3), round(poll, 3)


def server_env(
    directory: Path, data_dir: Path, config: SimulationConfig, speed: float
) -> dict[str, str]:
    """The TRIAGE_* settings of a server started for a replay (see :func:`prepare_replay`)."""
    quiet, poll = server_timing(config, speed)
    return {
        "TRIAGE_DATA_DIR": str(data_dir.resolve()),
        "TRIAGE_POLICY_FILE": str((directory / POLICY_FILE).resolve()),
        "TRIAGE_MODEL_SPECS_DIR": str((directory / SPEC_DIR).resolve()),
        "TRIAGE_MODELS": json.dumps([MODEL_NAME]),
        "TRIAGE_SERIES_QUIET_SECONDS": f"{quiet:g}",
        "TRIAGE_WORKER_POLL_SECONDS": f"{poll:g}",
    }


@dataclass(frozen=True)
class ReplaySetup:
    """What :func:`prepare_replay` wrote and how to start the server with it."""

    directory: Path
    data_dir: Path
    env: dict[str, str]
    policy_digest: str
    tokens_path: Path | None
    readers: tuple[str, ...]

    @property
    def env_path(self) -> Path:
        return self.directory / ENV_FILE


def _audit(db: Any, action: str, kind: str, target: str, **detail: object) -> None:
    from triage.audit.chain import AuditEvent, append

    try:
        actor = f"cli:{getpass.getuser()}"[:64]
    except Exception:
        actor = "cli:unknown"
    append(
        db,
        AuditEvent(
            action=action,
            actor=actor,
            target_kind=kind,
            target=target,
            source_address="local",
            detail={**detail, "by": "triage simulate --replay-setup"},
        ),
    )


def _account_token(db: Any, username: str, role: Any) -> str:
    """A new token of ``username`` (the account made first when it does not exist)."""
    from triage.auth.accounts import create_account, get_account
    from triage.auth.tokens import create_token

    account = get_account(db, username)
    if account is None:
        account = create_account(db, username, role, display_name="simulation replay")
        _audit(db, "account_create", "account", username, role=account.role.value)
    elif account.role != role or account.disabled:
        raise ReplayError(
            f"the account {username} exists with role {account.role.value}"
            f"{' (disabled)' if account.disabled else ''}: use a fresh data folder for a replay"
        )
    token, info = create_token(db, username, "simulation replay")
    _audit(db, "token_create", "token", str(info.id), account=username, name=info.name)
    return token


def prepare_replay(
    directory: Path,
    config: SimulationConfig,
    speed: float,
    *,
    data_dir: Path | None = None,
    make_tokens: bool = True,
) -> ReplaySetup:
    """Write a replay server's set-up into ``directory`` and make its accounts and tokens.

    Writes ``replay-policy.json`` (the simulation's policy scaled by ``speed``),
    ``model-specs/simulation-replay.json`` (the replay model's spec, alone in its folder),
    ``replay.env`` (the TRIAGE_* settings, for ``set -a; . replay.env``) and, with
    ``make_tokens``, ``tokens.json`` (mode 0600: one integration account's token to send
    the studies, one radiologist account's token per reader), the accounts made in the
    database of ``data_dir`` (``TRIAGE_DATABASE_URL`` when set).

    Args:
        directory: the folder to write (made when missing).
        config: the simulation settings (policy, readers, AI latency).
        speed: the replay's ``--speed``.
        data_dir: the server's data folder; default ``directory / "data"``.
        make_tokens: make the accounts and tokens (False: only the files the server reads).

    Raises:
        ReplayError: a bad speed, a folder that cannot be written, an account that exists
            with another role, a database that cannot be opened.
    """
    check_speed(speed)
    check_config(config)
    data_dir = data_dir if data_dir is not None else directory / "data"
    policy = scaled_policy(config.policy, speed)
    try:
        (directory / SPEC_DIR).mkdir(parents=True, exist_ok=True)
        (directory / POLICY_FILE).write_text(
            json.dumps(policy.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )
        (directory / SPEC_DIR / f"{MODEL_NAME}.json").write_text(
            json.dumps(spec_document(), indent=2) + "\n", encoding="utf-8"
        )
        env = server_env(directory, data_dir, config, speed)
        lines = [
            "# TRIAGE_* settings of a server started for `triage simulate --replay`"
            f" (--speed {speed:g}, policy {policy.digest()}).",
            "# SIMULATION ONLY: the replay model reports simulated findings; never install it"
            " on a server that reads patients' studies.",
            *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
        ]
        (directory / ENV_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"cannot write the replay set-up to {directory}: {exc}") from None
    readers = tuple(READER_ACCOUNT.format(k + 1) for k in range(reader_count(config)))
    tokens_path = None
    if make_tokens:
        tokens_path = directory / TOKENS_FILE
        doc = _make_tokens(data_dir, readers)
        try:
            fd = os.open(tokens_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            raise ReplayError(f"cannot write {tokens_path}: {exc}") from None
    return ReplaySetup(directory, data_dir, env, policy.digest(), tokens_path, readers)


def _make_tokens(data_dir: Path, readers: Sequence[str]) -> dict[str, Any]:
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from triage.auth.accounts import AccountError
    from triage.auth.roles import Role
    from triage.config import Settings
    from triage.db import Database

    try:
        settings = Settings(data_dir=data_dir)
        settings.ensure_dirs()
    except (ValidationError, OSError) as exc:
        raise ReplayError(f"the replay server's data folder {data_dir}: {exc}") from None
    try:
        db = Database(settings.resolved_database_url)
        db.migrate()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ReplayError(f"cannot open the replay server's database: {reason}") from None
    try:
        ingest = _account_token(db, INGEST_ACCOUNT, Role.integration)
        tokens = [
            {"account": name, "token": _account_token(db, name, Role.radiologist)}
            for name in readers
        ]
    except AccountError as exc:
        raise ReplayError(f"replay accounts: {exc}") from None
    finally:
        db.engine.dispose()
    return {"ingest": ingest, "readers": tokens}


# -- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayTokens:
    """The bearer tokens of a replay: one that may store (``ingest``), one per reader."""

    ingest: str
    readers: tuple[str, ...]


def load_tokens(path: Path) -> ReplayTokens:
    """Read a tokens file: ``{"ingest": "trg_...", "readers": ["trg_...", ...]}`` (a reader
    may also be ``{"account": NAME, "token": "trg_..."}``, as ``--replay-setup`` writes).

    Raises:
        ReplayError: the file is missing, not JSON, or lacks a token.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReplayError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReplayError(f"the tokens file {path} is not JSON: {exc}") from None
    problem = f"the tokens file {path} needs {{'ingest': TOKEN, 'readers': [TOKEN, ...]}}"
    if not isinstance(doc, dict) or not isinstance(doc.get("ingest"), str):
        raise ReplayError(problem)
    readers = []
    for item in doc.get("readers") or []:
        token = item.get("token") if isinstance(item, dict) else item
        if not isinstance(token, str) or not token:
            raise ReplayError(problem)
        readers.append(token)
    if not readers:
        raise ReplayError(problem)
    return ReplayTokens(doc["ingest"], tuple(readers))


def check_config(config: SimulationConfig) -> None:
    """The server must be able to receive what the day holds (locations, priorities)."""
    for name in config.location_mix:
        if name == OUTPATIENT:
            continue
        if name not in LOCATION_TEXT or location_class(LOCATION_TEXT[name]) != name:
            raise ReplayError(
                f"location_mix names {name!r}; a server reads only the locations"
                f" {sorted(LOCATION_TEXT)} (and {OUTPATIENT!r}: none), so it cannot be replayed"
            )
    for name in config.order_priority_mix:
        if len(name.strip()) > 16 or not name.strip():
            raise ReplayError(
                f"order_priority_mix names {name!r}: a DICOM priority is 1 to 16 characters"
            )
