"""Request and response bodies. Paged collections (jobs, datasets) come as {"items", "total", "limit",
"offset"}; the others (metrics, artifacts, models) as plain JSON lists."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from loraq.auth import OWNER_PATTERN
from loraq.models import ArtifactKind, JobState


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time the API shows is UTC, marked as such."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f]*$"
MAX_INT32 = 2**31 - 1  # integer columns: bounds for steps, sequence numbers and offsets
MAX_OFFSET = 10**9


class ErrorDetail(BaseModel):
    status: int
    message: str


class ErrorBody(BaseModel):
    """Every error: `{"error": {"status": 404, "message": "job abc not found"}}`."""

    error: ErrorDetail


ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 409, 413, 415, 422, 429)}
# Every /v1 route may answer these: a missing, unknown or revoked key, or an admin route.
AUTH_ERRORS = {status: {"model": ErrorBody} for status in (401, 403)}


# --------------------------------------------------------------------------------------------
# Datasets


class RefusedFile(BaseModel):
    file: str
    reason: str


class LongCaptions(BaseModel):
    """Captions over CLIP's context (77 tokens with start and end), counted as a lower bound."""

    limit: int
    count: int
    files: list[str] = Field(description="up to 20 of them")
    estimate: bool = True
    note: str


class BucketCount(BaseModel):
    width: int
    height: int
    images: int


class BucketPlan(BaseModel):
    """The aspect-ratio buckets (enable_bucket, trainer/buckets.py) the images fall into."""

    resolution: int
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    buckets: list[BucketCount] = Field(description="bucket sizes (width, height) and image counts, most images first")


class DatasetReport(BaseModel):
    """The pre-flight check of an upload."""

    image_count: int
    captioned_count: int
    uncaptioned_count: int
    min_size: tuple[int, int] | None = Field(description="(width, height) of the smallest image by area")
    max_size: tuple[int, int] | None = Field(description="(width, height) of the largest image by area")
    smaller_than: dict[str, int] = Field(description="images whose short side is under 512, 768, 1024 px")
    long_captions: LongCaptions
    duplicates: list[list[str]] = Field(description="groups of byte-identical images")
    refused: list[RefusedFile] = Field(description="files left out of the dataset, with the reason")
    warnings: list[str]
    bucket_plans: list[BucketPlan] = Field(
        default_factory=list,
        description="with enable_bucket and the default bucket options, the buckets at resolution 512 (the SD, "
                    "Flux and SD3 default) and 1024 (SDXL's); a job's own plan is in its start event")


class CaptionPreview(BaseModel):
    file: str
    caption: str


class DatasetSummary(BaseModel):
    id: str
    owner: str = Field(description="who the dataset belongs to (only an admin sees others')")
    name: str
    image_count: int
    captioned_count: int
    total_bytes: int
    content_hash: str = Field(description="sha256 of the uploaded files' names and bytes (loraq_client.fingerprint); "
                                          "an identical upload by the same owner reuses the dataset")
    created_at: UtcDatetime


class DatasetDetail(DatasetSummary):
    report: DatasetReport
    thumbnails: list[str] = Field(description="URLs of up to 4 small PNG previews")
    captions: list[CaptionPreview] = Field(description="the first captions, shortened")


class DatasetUploaded(DatasetDetail):
    """The answer to an upload: a new dataset (201), or the owner's identical one (200)."""

    reused: bool = Field(description="true when an identical dataset of the same owner answered instead of a new "
                                     "copy (status 200, header X-Loraq-Dataset-Reused: true)")


class DatasetList(BaseModel):
    items: list[DatasetSummary]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------------------------
# Jobs


MAX_PRIORITY = 1_000_000  # any key's bound; LORAQ_MAX_JOB_PRIORITY bounds non-admin keys


class JobCreate(BaseModel):
    """A training job: a dataset, an allowed base model and trainer options (their names)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    base_model: str = Field(min_length=1, max_length=300, pattern=NO_CONTROL_CHARS,
                            description="a name GET /v1/models lists")
    name: str | None = Field(default=None, max_length=200, pattern=NO_CONTROL_CHARS)
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="trainer options, e.g. {\"resolution\": 512, \"rank\": 8}")
    webhook_url: str | None = Field(default=None, max_length=2000,
                                    description="POSTed the job on each state change, signed with the owner's "
                                                "secret (GET /v1/webhook-secret); http or https, no private addresses")
    # The fleet (README "Fleets, routing and priorities").
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
                          description="higher runs first among the jobs a worker fits; above LORAQ_MAX_JOB_PRIORITY "
                                      "only with an admin key")
    num_gpus: int = Field(default=1, ge=1, le=64, description="training processes, one per GPU, on one worker")
    gpu_class: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                                  description="run only on workers of this class (e.g. a100-80gb, 4090)")
    min_gpu_memory_gb: float | None = Field(default=None, gt=0, le=10_000,
                                            description="run only on workers whose GPUs have this much memory")


class JobCheck(BaseModel):
    """What a submission would train, without queueing it."""

    total_steps: int
    config: dict[str, Any] = Field(description="the validated trainer options with every default filled in")


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: UtcDatetime
    status_code: int | None = Field(description="the receiver's HTTP status; null when it did not answer")
    ok: bool
    error: str | None


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header: the same on every retry")
    state: str = Field(description="the state change this delivery announces")
    event_seq: int
    status: str = Field(description="pending (will be tried at next_attempt_at), delivered or failed")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None
    next_attempt_at: UtcDatetime | None
    history: list[WebhookAttemptOut]


class WorkerJobOut(BaseModel):
    id: str
    state: str
    step: int
    total_steps: int


class WorkerOut(BaseModel):
    name: str = Field(description="host:pid of the worker process")
    host: str | None
    pid: int | None
    queue: str | None = Field(description="the Celery queue it takes jobs from")
    gpu_class: str = Field(description="the accelerator it trains on (cpu, or the GPU's model, e.g. h100-80gb-hbm3)")
    device: str | None = Field(description="its LORAQ_WORKER_DEVICE (auto, cpu, cuda)")
    busy: bool = Field(description="training a job now")
    current_job: WorkerJobOut | None = Field(description="the job it trains; shown to admins and the job's owner")
    last_heartbeat: UtcDatetime
    started_at: UtcDatetime | None


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="whsec_ + base64 of the HMAC-SHA256 key; see the README's Webhooks section")
    created_at: UtcDatetime


class JobOut(BaseModel):
    id: str
    name: str | None
    state: JobState
    step: int
    total_steps: int
    progress: float = Field(description="step / total_steps, 1.0 once succeeded")
    last_loss: float | None
    dataset_id: str
    base_model: str
    config: dict[str, Any] = Field(description="the validated trainer options (service-owned ones left out)")
    queued_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    error: str | None
    attempt: int
    worker: str | None
    queue_position: int | None = Field(description="1-based place among the queued jobs that compete with it for "
                                                   "workers, in claim order (priority, then age); null unless queued")
    priority: int = 0
    num_gpus: int = 1
    gpu_class: str | None = None
    min_gpu_memory_gb: float | None = None
    images_per_s: float | None = Field(default=None, description="training speed at the last step; null unless running")
    eta_s: float | None = Field(default=None, description="seconds left at the pace of the last steps; null unless running")
    webhook_url: str | None = Field(default=None, description="where state changes are POSTed (GET /v1/jobs/{id} only)")
    best_checkpoint: str | None = Field(default=None, description="the checkpoint with the lowest validation loss "
                                       "(its artifact's name; GET /v1/jobs/{id} only; download: /v1/jobs/{id}/best_checkpoint)")
    webhook_deliveries: list[WebhookDeliveryOut] | None = Field(
        default=None, description="each state change's delivery to webhook_url (GET /v1/jobs/{id} only)")


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class MetricOut(BaseModel):
    step: int
    loss: float | None
    lr: float | None
    grad_norm: float | None
    epoch: int | None
    images_per_s: float | None
    validation_loss: float | None = None
    time: UtcDatetime



class ArtifactOut(BaseModel):
    kind: ArtifactKind | str
    name: str
    size: int
    sha256: str
    step: int | None
    url: str
    metadata: dict[str, str] | None = Field(
        default=None, description="a LoRA file's training metadata (kohya's ss_* and modelspec.* keys); "
                                  "null for other artifacts")



# --------------------------------------------------------------------------------------------
# Models and health


class ModelOut(BaseModel):
    name: str = Field(description="what a job gives as base_model")
    source: str = Field(description="hub id, local folder or single-file .safetensors checkpoint the trainer loads")
    available: bool = Field(description="present on this machine (local folder or file, or hub cache) "
                                        "and of a supported family")
    family: str | None = Field(default=None, description="the model family detected from its files (sd, sdxl); "
                                                         "null when it cannot be read or is not supported")
    kind: str | None = Field(default=None, description="folder, hub or single_file")
    config: str | None = Field(default=None, description="a single file's config folder")
    origin: str = Field(default="settings", description="demo, settings (LORAQ_MODELS) or added (by an admin)")
    problem: str | None = Field(default=None, description="why a job cannot train on it here, e.g. an "
                                                          "unsupported pipeline or a missing folder")


class ModelCreate(BaseModel):
    """An admin's new base model: a server-side folder or .safetensors file, or a cached hub id."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=1000, pattern=NO_CONTROL_CHARS,
                        description="a pipeline folder, a single-file .safetensors checkpoint, or a hub id "
                                    "in the server's cache (never downloaded)")
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=NO_CONTROL_CHARS,
                             description="what jobs give as base_model; default: the folder or file name, or the hub id")
    config: str | None = Field(default=None, min_length=1, max_length=1000, pattern=NO_CONTROL_CHARS,
                               description="a single file's config: a pipeline folder or cached hub id of its "
                                           "family (default: LORAQ_MODEL_CONFIGS for the family)")



# --------------------------------------------------------------------------------------------
# API keys


class WhoAmI(BaseModel):
    owner: str
    admin: bool
    key_id: str


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=64, pattern=f"^{OWNER_PATTERN.pattern}$",
                       description="who the key acts for: lowercase letters, digits, '_', '.', '-'")
    name: str | None = Field(default=None, max_length=200, pattern=NO_CONTROL_CHARS,
                             description="a note to tell keys apart, e.g. 'laptop'")
    admin: bool = False


class ApiKeyOut(BaseModel):
    id: str
    owner: str
    name: str | None
    prefix: str = Field(description="the key's first characters, to recognise it")
    admin: bool
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None
    revoked_at: UtcDatetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the secret: shown once, only its hash is stored")


class Health(BaseModel):
    database: str
    redis: str
    workers: int | None = Field(description="live Celery workers; null when the broker cannot be asked")
