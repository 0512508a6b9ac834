"""``triage simulate --replay-setup DIR`` and ``triage simulate --replay URL`` (called by
:func:`triage.cli.simulate_cmd`; a :class:`~triage.simulate.replay_setup.ReplayError` becomes one
line on stderr and exit status 2 there)."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.console import Console

from triage.simulate.config import SimulationConfig
from triage.simulate.replay import run_replay
from triage.simulate.replay_model import MODEL_NAME
from triage.simulate.replay_setup import (
    ReplayError,
    check_speed,
    load_tokens,
    prepare_replay,
    reader_count,
)


def setup_main(
    config: SimulationConfig,
    directory: Path,
    speed: float,
    *,
    data_dir: Path | None,
    config_path: Path | None,
    console: Console,
) -> None:
    """Write the replay server's set-up and print how to start the server and the replay."""
    setup = prepare_replay(directory, config, speed, data_dir=data_dir)
    env_path = shlex.quote(str(setup.env_path.resolve()))
    config_arg = f" --config {shlex.quote(str(config_path))}" if config_path else ""
    tokens = shlex.quote(str(setup.tokens_path.resolve())) if setup.tokens_path else "TOKENS"
    lines = [
        f"wrote the replay set-up for --speed {speed:g} to {directory}:",
        f"  policy (service levels / {speed:g}, digest {setup.policy_digest}):"
        f" {setup.env['TRIAGE_POLICY_FILE']}",
        f"  replay model spec (SIMULATION ONLY, {MODEL_NAME}):"
        f" {setup.env['TRIAGE_MODEL_SPECS_DIR']}",
        f"  server settings: {setup.env_path}",
        f"  tokens ({reader_count(config)} readers and one ingest account, in the database of"
        f" {setup.data_dir}): {setup.tokens_path}",
        "start the server (in its own shell; a fresh data folder, nothing else sent to it):",
        f"  set -a && . {env_path} && set +a && triage serve",
        "then replay the day (same --config and --seed):",
        f"  triage simulate --replay http://127.0.0.1:8000 --tokens {tokens} --speed {speed:g}"
        f"{config_arg} --seed {config.seed} [--out DIR]",
        "(TRIAGE_HTTP_PORT and the other usual settings apply; use the server's URL.)",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def replay_main(
    config: SimulationConfig,
    url: str,
    tokens_path: Path | None,
    speed: float,
    *,
    out: Path,
    console: Console,
    wide: Console,
) -> None:
    """Replay the day against ``url``, print the comparison, write replay.json and .md."""
    from triage.simulate.replay_report import lines, rich_table, write_outputs

    check_speed(speed)
    if tokens_path is None:
        raise ReplayError(
            "--replay needs --tokens FILE (written by `triage simulate --replay-setup DIR`)"
        )
    if not url.startswith(("http://", "https://")):
        raise ReplayError(f"--replay needs the server's URL (http://HOST:PORT), got {url!r}")
    tokens = load_tokens(tokens_path)

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    result = run_replay(url, tokens, config, speed, progress=say)
    summ, paths = write_outputs(result, out)
    wide.print(rich_table(result, summ))
    for line in lines(result, summ):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"wrote {', '.join(str(p) for p in paths)}", highlight=False, markup=False, soft_wrap=True
    )
