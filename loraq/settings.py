"""The one settings object, read from the environment with the `LORAQ_` prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEMO_MODEL = "tiny-sd"


class Settings(BaseSettings):
    """Service configuration; defaults give a working single-machine setup under `var/`."""

    model_config = SettingsConfigDict(env_prefix="LORAQ_", extra="ignore")

    data_dir: Path = Path("var")
    database_url: str | None = None  # default: SQLite at {data_dir}/loraq.db
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 8000

    # Base models a job may name: hub ids or local folders, plus the generated demo model.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Uploads
    max_upload_bytes: int = 2 * 1024**3
    max_upload_files: int = 10_000
    max_file_bytes: int = 256 * 1024**2  # one image, caption or metadata file (in a zip or not)
    max_compression_ratio: float = 100.0  # a zip's expanded bytes over its compressed bytes
    max_image_pixels: int = 64 * 1024 * 1024

    # Per-owner limits
    max_queued_jobs: int = 50
    max_storage_bytes: int = 200 * 1024**3

    # Jobs
    max_attempts: int = 3
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    worker_device: str = "auto"
    queue_name: str = "train"

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value):
        if isinstance(value, str):  # LORAQ_MODELS="org/model-a,/srv/models/b"
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loraq.db').resolve()}"

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir / "models" / DEMO_MODEL

    def allowed_models(self) -> dict[str, str]:
        """Model name as a job gives it -> what the trainer loads (hub id or local folder)."""
        allowed = {DEMO_MODEL: str(self.demo_model_dir.resolve())}
        for entry in self.models:
            allowed[Path(entry).name if Path(entry).is_dir() else entry] = entry
        return allowed
