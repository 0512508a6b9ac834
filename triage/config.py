"""The one settings object. Nothing else in ``triage`` reads the environment."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All runtime settings, from ``TRIAGE_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("triage-data"), description="Root of the file store.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: SQLite file <data_dir>/triage.db.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    ae_title: str = "TRIAGE"
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate (JSON list); empty allows any.",
    )
    model_mirror: str | None = Field(
        default=None,
        description="Directory or URL prefix holding <model>/<file> weight files (offline use).",
    )
    model_cache_dir: Path | None = Field(
        default=None, description="Where verified weights are cached; default <data_dir>/models."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ensemble_members: int | None = Field(
        default=None,
        ge=1,
        le=12,
        description="Haemorrhage ensemble size; default 1 on CPU, 12 on CUDA.",
    )
    series_quiet_seconds: float = Field(default=2.0, gt=0)
    worker_poll_seconds: float = Field(default=0.5, gt=0)
    ich_threshold_ml: float | None = Field(
        default=None, ge=0, description="Override the haemorrhage flag threshold (ml)."
    )

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or (self.data_dir / "models")

    def ensure_dirs(self) -> None:
        for d in (
            self.data_dir,
            self.store_dir,
            self.incoming_dir,
            self.quarantine_dir,
            self.results_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
