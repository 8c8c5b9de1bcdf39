"""The one settings object, read from the environment with the `LORAQ_` prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEMO_MODEL = "tiny-sd"
# The generated demo models (`make run` writes them under data_dir/models) and their families.
DEMO_MODELS = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-flux": "flux", "tiny-sd3": "sd3"}


class Settings(BaseSettings):
    """Service configuration; defaults give a working single-machine setup under `var/`."""

    model_config = SettingsConfigDict(env_prefix="LORAQ_", extra="ignore")

    data_dir: Path = Path("var")
    database_url: str | None = None  # default: SQLite at {data_dir}/loraq.db
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 8000
    # uvicorn worker processes serving the API (`make run`, the Dockerfile's command): each has
    # its own connection pool; event streams and key revocations reach every one through Redis.
    api_workers: int = Field(default=1, ge=1, le=64)

    # Base models a job may name: hub ids, local folders or single-file .safetensors checkpoints,
    # plus the generated demo models and those admins add at run time (stored in the database).
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Per family, the config folder (or cached hub id) a single-file checkpoint of that family is
    # loaded with when it names none itself: LORAQ_MODEL_CONFIGS="sdxl=/srv/sdxl-base,sd=/srv/sd15".
    model_configs: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

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
    # A worker's SIGTERM/SIGINT: checkpoint, hand the job back, exit within this many seconds.
    shutdown_grace_s: float = 30.0
    worker_device: str = "auto"
    # The latent cache the workers' training runs share (trainer/latent_cache.py); default
    # {data_dir}/cache/latents. Past the size limit, least recently used segments go.
    cache_dir: Path | None = None
    cache_max_bytes: int = 50 * 1024**3
    queue_name: str = "train"
    # The fleet (README "Fleets, routing and priorities"). What this worker offers: its GPU class
    # (unset: detected, `cpu` on the CPU), how many GPUs a job may use here (unset: detected, 1 on
    # the CPU; LORAQ_WORKER_GPUS=2 lets CPU workers run two-process jobs over gloo) and each GPU's
    # memory in GB (unset: detected; unknown on the CPU, so min_gpu_memory_gb jobs never fit it).
    # It consumes `{queue_name}` and `{queue_name}.{gpu_class}`.
    worker_gpu_class: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    worker_gpus: int | None = Field(default=None, ge=1, le=64)
    worker_gpu_memory_gb: float | None = Field(default=None, gt=0)
    # The highest `priority` a non-admin key may give a job (admins: up to MAX_PRIORITY).
    max_job_priority: int = 10
    # A queued job whose wake-up was never sent (Redis was down at submit) gets one after this
    # many seconds; one sent longer ago than reannounce_s is sent again (Redis lost it).
    announce_sweep_s: float = Field(default=30.0, gt=0)
    reannounce_s: float = Field(default=900.0, gt=0)

    # Limits on a job's size (loraq/limits.py): a submission over one is a 422 naming the option
    # and the limit. 0 turns a limit off. Admin keys are exempt from the size limits unless
    # limits_exempt_admins is false; the wall-clock limit applies to every job (the worker
    # cannot tell whose key queued it).
    max_resolution: int = 2048
    max_train_batch_size: int = 64
    max_rank: int = 256
    max_train_steps: int = 100_000  # the run's total optimizer steps, however they are asked for
    max_validation_images: int = 16
    # Each attempt's training time; past it the training checkpoints at its next step and the job
    # fails saying so (the checkpoints stay, so a retry resumes). Attempts never run past
    # loraq.queue.MAX_ATTEMPT_S (8 h) whatever this says.
    max_job_seconds: float = 6 * 3600
    limits_exempt_admins: bool = True

    # GET /metrics (Prometheus; api/services/metrics.py): not behind the API key. metrics_port
    # serves it from a separate small server in the API process (on metrics_host, default host)
    # instead of the main app.
    metrics_enabled: bool = True
    metrics_port: int | None = None
    metrics_host: str | None = None

    # Webhooks (loraq/webhooks.py): a job's webhook_url may not reach loopback, link-local or
    # private addresses unless allowed (tests, a receiver on the same private network). A failed
    # delivery is retried after retry_base_s, doubling each time, up to max_attempts attempts.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_retry_base_s: float = Field(default=10.0, gt=0)

    # Where datasets and artifacts live (loraq/object_store.py): unset, the data directory (as
    # always); `s3://bucket/prefix`, an S3-compatible store (credentials from boto3's chain:
    # AWS_ACCESS_KEY_ID etc.), data_dir then being each host's cache. s3_presign: downloads
    # answer 307 to a presigned URL instead of streaming through the API.
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_presign: bool = False
    s3_presign_expires_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    s3_multipart_bytes: int = Field(default=64 * 1024**2, ge=5 * 1024**2)  # S3's smallest part: 5 MiB

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value):
        if isinstance(value, str):  # LORAQ_MODELS="org/model-a,/srv/models/b"
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value):
        from loraq.object_store import parse_url  # no import cycle at module load

        parse_url(value)  # ValueError naming the problem
        return value

    @field_validator("model_configs", mode="before")
    @classmethod
    def _split_model_configs(cls, value):
        if isinstance(value, str):  # LORAQ_MODEL_CONFIGS="sdxl=/srv/sdxl-base,sd=/srv/sd15"
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("expected family=folder pairs separated by commas")
            return {family.strip(): folder.strip() for family, folder in pairs}
        return value

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loraq.db').resolve()}"

    @property
    def latent_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache" / "latents"

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir / "models" / DEMO_MODEL

    def demo_dir(self, name: str) -> Path:
        return self.data_dir / "models" / name

    def allowed_models(self) -> dict[str, str]:
        """Model name as a job gives it -> what the trainer loads (hub id, local folder or file),
        for the demo models and LORAQ_MODELS; loraq.registry adds the ones admins added."""
        allowed = {name: str(self.demo_dir(name).resolve()) for name in DEMO_MODELS}
        for entry in self.models:
            path = Path(entry)
            if path.is_dir():
                allowed[path.name] = entry
            elif entry.lower().endswith(".safetensors"):
                allowed[path.stem] = entry
            else:
                allowed[entry] = entry
        return allowed
