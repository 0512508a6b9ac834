"""A local, verified cache of pinned model weight files.

Resolution order for ``<spec name>/<filename>``:

1. the cache (``<cache_dir>/<spec name>/<filename>``), used when its sha256 matches;
2. the mirror, when configured: a local directory or an ``http(s)://`` / ``file://`` URL
   prefix holding ``<mirror>/<spec name>/<filename>``;
3. the artifact's pinned upstream URL.

Every candidate is written to a temporary file next to its final place, flushed with
``fsync``, checked against the expected sha256 and only then renamed into the cache, so a
crash or a concurrent fetch never leaves a partial file under the final name. A cached file
whose hash no longer matches is fetched again. When nothing works, :class:`ModelWeightsError`
says which file, what each source answered (including expected vs actual sha256) and how to
fix it.

The expected sha256 of a file is, in this order: the one in the model's spec (published or
pinned by us), the site's pin (``TRIAGE_WEIGHT_SHA256``, ``{"<model>/<file>": "<sha256>"}``),
or the one recorded at the first verified download (``<cache>/<model>/<file>.sha256.json``).
A file with none of these (upstream publishes no hash) is taken only after the model's own
check (it loads as the expected network), and its hash is then recorded: every later copy
with another hash is refused (trust on first use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from triage.models.spec import WeightArtifact

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
MIRROR_HINT = (
    "set TRIAGE_MODEL_MIRROR to a directory (or http(s) URL) holding "
    "<model name>/<file>, e.g. blast-ct-v1/model_N.pt"
)


class ModelWeightsError(RuntimeError):
    """Model weights could not be obtained or failed verification (message is user-facing)."""


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, lower-case hex."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme in ("http", "https", "file")


class _SourceFailed(Exception):
    """One source could not deliver a verified file (reason in the message)."""


Validator = Callable[[Path], None]
"""Checks an unpinned weight file before it is trusted (raises on a bad file)."""


class ModelStore:
    """Resolve pinned weight files into a local cache, verified by sha256.

    Args:
        cache_dir: directory for verified weight files (created on demand).
        mirror: optional mirror, a local directory or an http(s)/file URL prefix, holding
            ``<spec name>/<filename>``. Tried before the upstream URL.
        timeout_s: network timeout per request, seconds.
        allow_download: when False, the upstream URL is never tried (offline sites).
        pins: the site's sha256 per ``"<model>/<file>"`` for files whose spec has none.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        mirror: str | Path | None = None,
        *,
        timeout_s: float = 60.0,
        allow_download: bool = True,
        pins: Mapping[str, str] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.mirror = str(mirror) if mirror is not None and str(mirror) != "" else None
        self.timeout_s = timeout_s
        self.allow_download = allow_download
        self.pins = {k: v.strip().lower() for k, v in (pins or {}).items()}

    def __repr__(self) -> str:
        return f"ModelStore(cache_dir={str(self.cache_dir)!r}, mirror={self.mirror!r})"

    def cache_path(self, spec_name: str, artifact: WeightArtifact) -> Path:
        """Where the verified file lives in the cache."""
        return self.cache_dir / spec_name / artifact.filename

    def record_path(self, spec_name: str, artifact: WeightArtifact) -> Path:
        """Where the hash of an unpinned file's first verified download is recorded."""
        return self.cache_dir / spec_name / f"{artifact.filename}.sha256.json"

    def expected_sha256(self, spec_name: str, artifact: WeightArtifact) -> tuple[str | None, str]:
        """The sha256 a file must have and who said so (``spec``, ``site pin``,
        ``first download``); ``(None, "none")`` while an unpinned file was never fetched."""
        if artifact.sha256:
            return artifact.sha256, "spec"
        pin = self.pins.get(f"{spec_name}/{artifact.filename}")
        if pin:
            return pin, "site pin"
        try:
            record = json.loads(self.record_path(spec_name, artifact).read_text("utf-8"))
            return str(record["sha256"]), "first download"
        except (OSError, ValueError, KeyError, TypeError):
            return None, "none"

    def state(self, spec_name: str, artifact: WeightArtifact) -> dict[str, Any]:
        """The weight file's state for ``triage models``: ``verified`` (cached, hash as
        expected), ``corrupt`` (cached, another hash), ``in mirror`` (not cached yet; checked
        on first use), ``missing``; with the expected hash and who set it."""
        expected, by = self.expected_sha256(spec_name, artifact)
        target = self.cache_path(spec_name, artifact)
        state = "missing"
        if target.is_file():
            state = "verified" if expected and sha256_file(target) == expected else "corrupt"
        elif self.mirror is not None and not _is_url(self.mirror):
            if (Path(self.mirror) / spec_name / artifact.filename).is_file():
                state = "in mirror"
        return {
            "file": f"{spec_name}/{artifact.filename}",
            "state": state,
            "sha256": expected,
            "sha256_from": by,
            "path": str(target),
        }

    def fetch(
        self, spec_name: str, artifact: WeightArtifact, validate: Validator | None = None
    ) -> Path:
        """Return the path of a verified local copy of ``artifact``.

        Args:
            spec_name: the model's store folder name (e.g. ``blast-ct-v1``).
            artifact: the file.
            validate: for a file with no expected sha256 yet (see the module doc), the model's
                check that it is the expected network; the hash is recorded once it passes.

        Returns:
            Path of the cached file; its sha256 matched the expected one.

        Raises:
            ModelWeightsError: no source delivered a file with the expected sha256 (or, for an
                unpinned file, one that passed ``validate``).
        """
        target = self.cache_path(spec_name, artifact)
        label = f"{spec_name}/{artifact.filename}"
        expected, by = self.expected_sha256(spec_name, artifact)
        if target.is_file():
            actual = sha256_file(target)
            if expected is not None and actual == expected:
                return target
            logger.warning(
                "cached %s is not the expected file (sha256 %s, expected %s from %s); "
                "fetching it again",
                label,
                actual,
                expected,
                by,
            )
        failures: list[str] = []
        for kind, source in self._sources(spec_name, artifact):
            try:
                self._install(source, target, expected, by, validate)
            except _SourceFailed as exc:
                failures.append(f"{kind} {source}: {exc}")
                logger.warning("model weights %s not taken from %s: %s", label, source, exc)
                continue
            logger.info("model weights %s fetched from %s", label, source)
            return target
        if not failures:  # no mirror and downloads disabled
            failures.append("no mirror configured and downloads are disabled")
        raise ModelWeightsError(
            f"model weights {label} (sha256 {expected or 'not pinned'}) are not available. "
            f"To fix: {MIRROR_HINT}. Tried: " + "; ".join(failures)
        )

    def read_verified(
        self, spec_name: str, artifact: WeightArtifact, validate: Validator | None = None
    ) -> tuple[bytes, str]:
        """Fetch ``artifact`` and return its bytes and sha256, verified against the expected
        sha256 (see :meth:`fetch` for ``validate``).

        The hash is checked on the very bytes returned, so nothing can change the file
        between verification and loading.

        Raises:
            ModelWeightsError: the file is unavailable or its content does not match.
        """
        path = self.fetch(spec_name, artifact, validate)
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        expected, _by = self.expected_sha256(spec_name, artifact)
        if actual != expected:
            raise ModelWeightsError(
                f"model weights {spec_name}/{artifact.filename} changed on disk at {path}: "
                f"sha256 mismatch (expected {expected}, got {actual}); delete the file "
                "and retry"
            )
        return data, actual

    def _sources(self, spec_name: str, artifact: WeightArtifact) -> list[tuple[str, str]]:
        """``(kind, location)`` pairs to try, in order."""
        sources: list[tuple[str, str]] = []
        if self.mirror is not None:
            if _is_url(self.mirror):
                base = self.mirror.rstrip("/")
                sources.append(("mirror", f"{base}/{spec_name}/{artifact.filename}"))
            else:
                sources.append(("mirror", str(Path(self.mirror) / spec_name / artifact.filename)))
        if self.allow_download:
            sources.append(("upstream", artifact.url))
        return sources

    def _install(
        self,
        source: str,
        target: Path,
        expected: str | None,
        by: str,
        validate: Validator | None,
    ) -> None:
        """Copy ``source`` into ``target`` atomically, after checking its sha256 (or, with no
        expected sha256, after ``validate`` passed: then the hash is recorded)."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".part", dir=target.parent
            )
        except OSError as exc:
            raise ModelWeightsError(
                f"cannot write to the model cache {target.parent}: {exc.strerror or exc}"
            ) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = self._copy_from(source, out)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and actual != expected:
                hint = {
                    "first download": (
                        "the file differs from the one first downloaded and verified here; "
                        "if the site means to change it, pin the new hash in "
                        "TRIAGE_WEIGHT_SHA256 or delete the record "
                        f"{target.name}.sha256.json"
                    ),
                    "site pin": "the file is not the one pinned in TRIAGE_WEIGHT_SHA256",
                }.get(by, "the file is corrupt or not the pinned version")
                raise _SourceFailed(
                    f"sha256 mismatch (expected {expected} from {by}, got {actual}); {hint}"
                )
            if expected is None:
                if validate is None:
                    raise _SourceFailed(
                        "no sha256 is pinned for this file and nothing can verify it; pin one "
                        "in TRIAGE_WEIGHT_SHA256"
                    )
                try:
                    validate(tmp)
                except Exception as exc:
                    raise _SourceFailed(f"not the expected network: {exc}") from exc
            os.replace(tmp, target)
            if expected is None:
                self._record(target, actual, source)
            _fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_from(self, source: str, out: BinaryIO) -> str:
        """Stream ``source`` into ``out``; return the sha256 of what was written."""
        digest = hashlib.sha256()
        try:
            if _is_url(source):
                with urllib.request.urlopen(source, timeout=self.timeout_s) as response:
                    _pump(response, out, digest)
            else:
                path = Path(source)
                if not path.is_file():
                    raise _SourceFailed("not found")
                with path.open("rb") as fh:
                    _pump(fh, out, digest)
        except _SourceFailed:
            raise
        except urllib.error.HTTPError as exc:
            raise _SourceFailed(f"download failed: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise _SourceFailed(f"download failed: {exc.reason}") from exc
        except (OSError, ValueError) as exc:  # timeouts, resets, bad URLs, read errors
            raise _SourceFailed(f"read failed: {exc}") from exc
        return digest.hexdigest()

    def _record(self, target: Path, sha256: str, source: str) -> None:
        """Record the hash of an unpinned file's first verified download (atomically)."""
        record = target.with_name(f"{target.name}.sha256.json")
        doc = {
            "sha256": sha256,
            "source": source,
            "recorded_at": datetime.now(UTC).isoformat(),
            "note": "trust on first use: later copies with another sha256 are refused",
        }
        tmp = record.with_name(f".{record.name}.part")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, record)
        logger.info("recorded sha256 %s of %s (first verified download)", sha256, target.name)


def _pump(src: BinaryIO, out: BinaryIO, digest: hashlib._Hash) -> None:
    shutil.copyfileobj(_Hashing(src, digest), out, _CHUNK)


class _Hashing:
    """A minimal file-like reader that hashes what passes through it."""

    def __init__(self, src: BinaryIO, digest: hashlib._Hash) -> None:
        self._src = src
        self._digest = digest

    def read(self, size: int = -1) -> bytes:
        block = self._src.read(size)
        self._digest.update(block)
        return block


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
