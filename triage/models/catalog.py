"""The installed models, as data: one JSON spec file per model.

The product's own specs ship in ``triage/models/specs/``; a site adds or replaces models with
a folder of its own (``TRIAGE_MODEL_SPECS_DIR``: a file there with the name of a shipped spec
replaces it) and chooses which run (``TRIAGE_MODELS``). This is the one place the rest of the
code learns the model and finding names from. No torch here: the worklist and the CLI read it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from triage.models.spec import FindingSpec, ModelSpec, SpecError

__all__ = ["builtin_spec", "builtin_specs", "critical_findings", "finding_specs", "load_specs"]


def _parse(text: str, source: str) -> ModelSpec:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: a spec is a JSON object")
    return ModelSpec.from_json(doc, source=source)


@functools.cache
def builtin_specs() -> tuple[ModelSpec, ...]:
    """The specs shipped with the product, by name."""
    folder = resources.files("triage.models") / "specs"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return tuple(_parse(f.read_text(encoding="utf-8"), f"specs/{f.name}") for f in files)


def load_specs(
    extra_dir: Path | None = None, enabled: Sequence[str] | None = None
) -> tuple[ModelSpec, ...]:
    """The installed set: shipped specs, then a site folder's (same name replaces).

    Args:
        extra_dir: a folder of ``*.json`` spec files, or None.
        enabled: names of the models to run (None or empty: all).

    Raises:
        SpecError: a spec file is invalid, the folder is missing, or ``enabled`` names a
            model that is not installed (the message lists those that are).
    """
    by_name = {spec.name: spec for spec in builtin_specs()}
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise SpecError(f"model spec folder {extra_dir} does not exist")
        for path in sorted(extra_dir.glob("*.json")):
            spec = _parse(path.read_text(encoding="utf-8"), str(path))
            by_name[spec.name] = spec
    if enabled:
        unknown = [n for n in enabled if n not in by_name]
        if unknown:
            raise SpecError(
                f"TRIAGE_MODELS names {unknown}, which are not installed "
                f"(installed: {sorted(by_name)})"
            )
        return tuple(by_name[n] for n in enabled)
    return tuple(by_name.values())


def finding_specs(specs: Iterable[ModelSpec] | None = None) -> dict[str, FindingSpec]:
    """Every finding the models raise, by code (the first model naming a code wins)."""
    found: dict[str, FindingSpec] = {}
    for spec in builtin_specs() if specs is None else specs:
        for f in spec.findings:
            found.setdefault(f.code, f)
    return found


def critical_findings(specs: Iterable[ModelSpec] | None = None) -> tuple[str, ...]:
    """Codes of the findings that lift a study to ``critical``."""
    return tuple(code for code, f in finding_specs(specs).items() if f.critical)


def builtin_spec(name: str) -> ModelSpec:
    """The shipped spec called ``name``.

    Raises:
        KeyError: no shipped spec has that name.
    """
    for spec in builtin_specs():
        if spec.name == name:
            return spec
    raise KeyError(f"no shipped model spec {name!r}")
