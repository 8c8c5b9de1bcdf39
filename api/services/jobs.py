"""Jobs: submit (validated with the trainer's own config, idempotent), read, cancel, retry, delete.

Every state change goes through `loraq.jobs.transition`; Celery messages and Redis stream entries
are sent only after the database commit (the row is the truth, a message only a wake-up).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import mimetypes
import shutil
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import redis as redis_lib
from celery import Celery
from sqlalchemy import Engine, Integer, Text, and_, bindparam, cast, delete, exists, func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import load_dataset
from api.services.models import resolve_for_job
from api.services.quotas import check_queued_jobs
from api.schemas import MAX_PRIORITY, JobCreate, JobOut, WebhookDeliveryOut
from loraq import events, object_store, storage, webhooks
from loraq.auth import Principal
from loraq.errors import Conflict, Invalid, NotFound
from loraq.jobs import queue_position as fleet_queue_position, transition
from loraq.limits import check_job_limits
from loraq.models import (ACTIVE_STATES, FINAL_STATES, Artifact, Dataset, Job, JobCount, JobEvent, JobMetric,
                          JobState, new_id)
from loraq.models import WebhookDelivery
from loraq.queue import enqueue_job, job_queue, mark_announced
from loraq.registry import ModelStatus
from loraq.settings import Settings
from trainer.config import ConfigError, TrainConfig, load_config

log = logging.getLogger("loraq.api.jobs")

# Options the service sets for every job; a submission may not.
SERVICE_FIELDS = frozenset({"pretrained_model_name_or_path", "pretrained_config_dir", "train_data_dir",
                            "output_dir", "resume_from_checkpoint", "device"})
# A dataset accepts uncaptioned images, so jobs train them with an empty caption unless told otherwise.
SERVICE_DEFAULTS = {"missing_captions": "empty"}
CANCEL_FLAG_TTL_S = 24 * 3600
MAX_STEPS = 10**9  # total_steps is a 32-bit column
DEVICES = ("auto", "cpu", "cuda")


def cancel_key(job_id: str) -> str:
    """The Redis flag a running attempt polls to stop early (the database state is the record)."""
    return f"loraq:jobs:{job_id}:cancel"


# --------------------------------------------------------------------------------------------
# Submitting


def request_hash(body: JobCreate) -> str:
    """The request's identity for Idempotency-Key: its canonical JSON (key order does not matter)."""
    # webhook_url left out when not given, so keys used before webhooks existed still replay.
    # Likewise the fleet fields (priority, num_gpus, ...) at their defaults.
    values = body.model_dump(mode="json", exclude={"webhook_url"} if body.webhook_url is None else None)
    for name, default in FLEET_DEFAULTS.items():
        if values.get(name) == default:
            values.pop(name)
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_base_model(settings: Settings, base_model: str, session: Session) -> ModelStatus:
    """The registered model `base_model` names, with its family; only names GET /v1/models lists pass."""
    if _is_path(base_model):
        raise Invalid(f"base_model: filesystem paths are not accepted ({base_model!r}); "
                      "name a model GET /v1/models lists")
    return resolve_for_job(session, settings, base_model)


def _is_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or ("/" in value and _exists(value))


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the filesystem is no path here either
        return False


def validate_options(settings: Settings, dataset: Dataset, model: ModelStatus, options: dict
                     ) -> tuple[TrainConfig, int]:
    """The model family's validated config for these options (service fields filled in) and its step count."""
    owned = sorted(SERVICE_FIELDS & options.keys())
    if owned:
        raise Invalid("; ".join(f"{name}: set by the service" for name in owned))
    vae = options.get("pretrained_vae_model_name_or_path")
    if isinstance(vae, str) and _is_path(vae):  # as for base_model: no reading the server's files by path
        raise Invalid(f"pretrained_vae_model_name_or_path: filesystem paths are not accepted ({vae!r}); "
                      "give a hub id in the server's cache")
    if options.get("validation_data_dir") is not None:  # a folder on the server: not the user's to name
        raise Invalid("validation_data_dir: filesystem paths are not accepted through the service; "
                      "hold out a share of the dataset with validation_split")
    not_finite = sorted(k for k, v in options.items() if isinstance(v, float) and not math.isfinite(v))
    if not_finite:  # JSON lets NaN and Infinity through; the trainer and PostgreSQL must not see them
        raise Invalid("; ".join(f"{name}: must be a finite number" for name in not_finite))
    device = settings.worker_device if settings.worker_device in DEVICES else "auto"
    values = {**SERVICE_DEFAULTS, **options, **model.trainer_values(),
              "train_data_dir": str(storage.dataset_dir(settings, dataset.id)),
              "output_dir": "output", "device": device}  # placeholders; the worker sets the real ones
    try:
        config = load_config(values, model.family)
    except ConfigError as error:
        raise Invalid(str(error)) from None
    steps = total_steps(config, dataset.image_count)
    if steps > MAX_STEPS:
        raise Invalid(f"max_train_steps: the run would take {steps} steps; the limit is {MAX_STEPS} "
                      "(lower num_train_epochs or max_train_steps)")
    missing = dataset.image_count - dataset.captioned_count
    if config.missing_captions == "error" and missing:
        raise Invalid(f"missing_captions: {missing} of the dataset's images have no caption; "
                      "use 'empty' to train them uncaptioned")
    return config, steps


def total_steps(config: TrainConfig, image_count: int) -> int:
    """Optimizer steps the trainer will run on one process (its own formula)."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    n = image_count if config.max_train_samples is None else min(image_count, config.max_train_samples)
    per_epoch = math.ceil(math.ceil(n / config.train_batch_size) / config.gradient_accumulation_steps)
    return config.num_train_epochs * per_epoch


def _by_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def _replay(job: Job, digest: str, key: str) -> Job:
    if job.request_hash != digest:
        raise Invalid(f"Idempotency-Key {key!r} was already used with a different request; "
                      "send a new key for a new job")
    return job


def check_submission(session: Session, settings: Settings, principal: Principal, body: JobCreate
                     ) -> tuple[Dataset, TrainConfig, int]:
    """What a submission would train (its dataset, validated config and step count), or the
    404/422 that submitting it would get."""
    dataset = load_dataset(session, principal, body.dataset_id)
    model = check_base_model(settings, body.base_model, session)
    config, steps = validate_options(settings, dataset, model, body.options)
    check_job_limits(settings, principal, config, steps)  # the operator's LORAQ_MAX_* (loraq/limits.py)
    check_priority(settings, principal, body.priority)
    webhooks.check_url(settings, body.webhook_url)
    return dataset, config, steps


FLEET_DEFAULTS = {"priority": 0, "num_gpus": 1, "gpu_class": None, "min_gpu_memory_gb": None}


def check_priority(settings: Settings, principal: Principal, priority: int) -> None:
    """Owners may order their jobs up to settings.max_job_priority; admins up to MAX_PRIORITY."""
    if priority > settings.max_job_priority and not principal.admin:
        raise Invalid(f"priority: at most {settings.max_job_priority} for a non-admin key (got {priority}); "
                      f"an admin key may set up to {MAX_PRIORITY}")


def checked_options(config: TrainConfig) -> dict:
    """The validated options as a job stores and shows them (service-owned ones left out)."""
    return config.model_dump(mode="json", exclude=set(SERVICE_FIELDS))


def submit_job(session: Session, settings: Settings, redis, celery: Celery, principal: Principal,
               body: JobCreate, key: str | None) -> tuple[Job, bool]:
    """Create and enqueue a job; with a key seen before, the same job again. Returns (job, created)."""
    owner = principal.owner
    digest = request_hash(body)
    if key is not None and (existing := _by_key(session, owner, key)) is not None:
        return _replay(existing, digest, key), False
    dataset, config, steps = check_submission(session, settings, principal, body)
    job = Job(id=new_id(), owner=owner, name=body.name, dataset_id=dataset.id, base_model=body.base_model,
              config=checked_options(config), total_steps=steps, state=JobState.queued.value,
              attempt=1, step=0, event_seq=0, idempotency_key=key, request_hash=digest,
              webhook_url=body.webhook_url, priority=body.priority, num_gpus=body.num_gpus,
              gpu_class=body.gpu_class, min_gpu_memory_gb=body.min_gpu_memory_gb)
    session.add(job)
    try:
        session.flush()
        check_queued_jobs(session, settings, owner)
        event = events.append_event(session, job.id, events.STATE, {"state": JobState.queued.value})
        webhooks.record(session, job.id, job.webhook_url, event)
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = _by_key(session, owner, key) if key is not None else None
        if existing is None:  # not a key race: the dataset went away meanwhile
            load_dataset(session, principal, body.dataset_id)
            raise
        return _replay(existing, digest, key), False
    _after_commit(redis, celery, [event], job.id, job.attempt, session=session, settings=settings)
    return job, True


def _after_commit(redis, celery: Celery | None, new_events: list[JobEvent], job_id: str,
                  attempt: int | None = None, *, session: Session | None = None,
                  settings: Settings | None = None) -> None:
    """Publish the events; for a queued attempt, send its wake-up to the job's queue and record
    that it went (announced_at). A failed send is left to the reaper's sweep (loraq/reaper.py)."""
    events.publish(redis, new_events)
    if celery is None or attempt is None:
        return
    queue = None
    try:
        if session is not None and settings is not None:
            queue = job_queue(settings, session.scalar(select(Job.gpu_class).where(Job.id == job_id)))
        enqueue_job(celery, job_id, attempt, queue)
    except Exception as error:  # noqa: BLE001 - the row stays queued, unannounced: the sweep re-sends it
        log.warning("job.enqueue_failed job=%s attempt=%s: %s", job_id, attempt, error)
        return
    if session is not None:
        try:
            mark_announced(session, job_id, attempt)
            session.commit()
        except Exception as error:  # noqa: BLE001 - unrecorded: the sweep sends one more wake-up, harmless
            session.rollback()
            log.warning("job.announce_unrecorded job=%s attempt=%s: %s", job_id, attempt, error)


# --------------------------------------------------------------------------------------------
# Reading


# Plain strings: an enum member's .value costs a descriptor call, and pages compare every row.
QUEUED, RUNNING, SUCCEEDED = JobState.queued.value, JobState.running.value, JobState.succeeded.value
_QUEUE_ORDER = tuple_(Job.queued_at, Job.id)
_QUEUED = Job.state == QUEUED


def _queue_key(name: str):
    """A bound (queued_at, id) to compare _QUEUE_ORDER with."""
    return tuple_(bindparam(f"{name}_at", type_=Job.queued_at.type), bindparam(f"{name}_id", type_=Job.id.type))


# Statements built once: with several jobs a page, building and hashing the expressions took
# longer than running them. Each reads a range of ix_jobs_state_queued_at and no row. The
# count ahead compares queued_at alone over the long range (SQLite compares a row value
# (queued_at, id) four times slower per index entry) and the id only among equal times.
#
# The jobs ahead of the first: every queued job (job_counts, kept by triggers) less those from
# it on, which on the pages people poll (the newest first) are few index entries, where
# counting those before it read nearly all 10,000. One statement: one snapshot for both.
_QUEUED_TOTAL = (select(func.coalesce(func.sum(JobCount.n), 0)).where(JobCount.state == QUEUED)
                 .scalar_subquery())
_FROM_FIRST = (select(func.count()).select_from(Job).where(
    _QUEUED, Job.queued_at >= bindparam("first_at", type_=Job.queued_at.type),  # a range of the index
    or_(Job.queued_at > bindparam("first_at"), Job.id >= bindparam("first_id", type_=Job.id.type)))
               .scalar_subquery())
_AHEAD = select(_QUEUED_TOTAL - _FROM_FIRST)
_SPAN = (select(Job.id).where(_QUEUED, _QUEUE_ORDER >= _queue_key("first"), _QUEUE_ORDER <= _queue_key("last"))
         .order_by(Job.queued_at, Job.id))


def _ahead_of(session: Session, job) -> int:
    return session.scalar(_AHEAD, {"first_at": job.queued_at, "first_id": job.id})


def queue_position(session: Session, job: Job) -> int | None:
    """1-based place among the queued jobs that compete with this one for workers, in their claim
    order (priority, then age; loraq.jobs.ahead_condition); None unless the job is queued."""
    if job.state != JobState.queued.value:
        return None
    return fleet_queue_position(session, job)


# Any queued job with a priority: then positions depend on more than the age. Two seeks into
# ix_jobs_state_priority_queued_at (`priority != 0` read every queued job: 7 ms of a page with
# 10,000 queued). Other jobs' GPU classes do not matter to a classless job: it waits behind every
# earlier job; a page's queued job with a class is seen on its row.
_PRIORITY_IN_PLAY = select(or_(exists().where(_QUEUED, Job.priority > 0), exists().where(_QUEUED, Job.priority < 0)))


def queue_positions(session: Session, jobs) -> dict[str, int]:
    """Queue positions of the queued jobs among `jobs` (Job objects or rows), in two queries
    whatever their number: the count ahead of the oldest, then the ids of the queued jobs from the
    oldest to the newest in queue order (on an unfiltered page exactly these jobs; a filtered
    page's may interleave with others'). Loading every queued id per request, as before, cost
    seconds with 10,000 queued."""
    queued = sorted((job for job in jobs if job.state == QUEUED), key=lambda job: (job.queued_at, job.id))
    if not queued:
        return {}
    if any(job.gpu_class is not None for job in queued) or session.scalar(_PRIORITY_IN_PLAY):  # one count per job
        return {job.id: fleet_queue_position(session, job) for job in queued}
    first, last = queued[0], queued[-1]
    ahead = _ahead_of(session, first)
    if len(queued) == 1:
        return {first.id: ahead + 1}
    span = session.scalars(_SPAN, {"first_at": first.queued_at, "first_id": first.id,
                                   "last_at": last.queued_at, "last_id": last.id})
    return {job_id: ahead + n for n, job_id in enumerate(span, start=1)}


SPEED_WINDOW = 20  # steps the ETA's pace is measured over

# The first and last metric of each job's window (steps after its current step - SPEED_WINDOW),
# for any number of jobs in one statement: the ends come from the (job_id, step) index alone.
_ENDS = (select(JobMetric.job_id, func.min(JobMetric.step).label("low"), func.max(JobMetric.step).label("high"))
         .join(Job, Job.id == JobMetric.job_id)
         .where(JobMetric.job_id.in_(bindparam("ids", expanding=True)), JobMetric.step > Job.step - SPEED_WINDOW)
         .group_by(JobMetric.job_id).subquery())
_WINDOW_ENDS = (select(JobMetric.job_id, JobMetric.step, JobMetric.time, JobMetric.images_per_s)
                .join(_ENDS, and_(JobMetric.job_id == _ENDS.c.job_id,
                                  or_(JobMetric.step == _ENDS.c.low, JobMetric.step == _ENDS.c.high)))
                .order_by(JobMetric.job_id, JobMetric.step))


def job_speed(session: Session, job: Job) -> tuple[float | None, float | None]:
    """(images/s at the last step, seconds left at the pace of the last steps) of a running job."""
    return job_speeds(session, [job]).get(job.id, (None, None))


def job_speeds(session: Session, jobs) -> dict[str, tuple[float | None, float | None]]:
    """`job_speed` of each running job among `jobs` (Job objects or rows), in one query whatever
    their number."""
    running = {job.id: job for job in jobs if job.state == RUNNING and job.step > 0}
    if not running:
        return {}
    ends: dict[str, list] = {}
    for row in session.execute(_WINDOW_ENDS, {"ids": list(running)}):
        ends.setdefault(row.job_id, []).append(row)
    speeds = {}
    for job_id, (first, *rest) in ends.items():
        job, last = running[job_id], (rest[-1] if rest else first)
        seconds = (last.time - first.time).total_seconds()
        eta = None
        if last.step > first.step and seconds > 0:
            eta = max(job.total_steps - job.step, 0) * seconds / (last.step - first.step)
        speeds[job_id] = (last.images_per_s, eta)
    return speeds


def _job_fields(job, position: int | None, speed: tuple[float | None, float | None]) -> dict:
    """JobOut's fields but `config`, from a Job or a row of its columns."""
    if job.state == SUCCEEDED:
        progress = 1.0
    else:
        progress = min(job.step / job.total_steps, 1.0) if job.total_steps else 0.0
    return dict(
        id=job.id, name=job.name, state=job.state, step=job.step, total_steps=job.total_steps,
        progress=progress, last_loss=job.last_loss, dataset_id=job.dataset_id, base_model=job.base_model,
        queued_at=job.queued_at, started_at=job.started_at, finished_at=job.finished_at,
        error=job.error, attempt=job.attempt, worker=job.worker, queue_position=position,
        priority=job.priority, num_gpus=job.num_gpus, gpu_class=job.gpu_class,
        min_gpu_memory_gb=job.min_gpu_memory_gb,
        images_per_s=speed[0], eta_s=speed[1],
    )


def job_out(job: Job, position: int | None, speed: tuple[float | None, float | None] = (None, None)) -> JobOut:
    return JobOut(**_job_fields(job, position, speed), config=job.config)


def show_job(session: Session, job: Job) -> JobOut:
    out = job_out(job, queue_position(session, job), job_speed(session, job))
    out.webhook_url = job.webhook_url
    out.best_checkpoint = job.best_checkpoint
    if job.webhook_url:
        out.webhook_deliveries = [WebhookDeliveryOut.model_validate(d, from_attributes=True)
                                  for d in webhooks.deliveries(session, job.id)]
    return out


# The columns a listed job shows, its config as the JSON text the database holds: decoding 50
# configs, validating and encoding them again was a third of a page's time (and each column
# read, a datetime above all, is converted in Python).
_LIST_COLUMNS = [Job.id, Job.name, Job.state, Job.step, Job.total_steps, Job.last_loss, Job.dataset_id,
                 Job.base_model, Job.queued_at, Job.started_at, Job.finished_at, Job.error, Job.attempt,
                 Job.worker, Job.priority, Job.num_gpus, Job.gpu_class, Job.min_gpu_memory_gb,
                 cast(Job.config, Text).label("config_json")]


_quote = json.encoder.encode_basestring_ascii  # the C escaper json.dumps itself uses
_UTC = timezone.utc


def _str(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _num(value: float | None) -> str:
    """A float as pydantic writes it: non-finite values as null (JobOut's config default)."""
    return "null" if value is None or not math.isfinite(value) else repr(float(value))


def _int(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def _time(value: datetime | None) -> str:
    """A UtcDatetime as pydantic writes it: ISO 8601 in UTC with a Z (SQLite's naive times are UTC)."""
    if value is None:
        return "null"
    if value.tzinfo is not None:
        value = value.astimezone(_UTC).replace(tzinfo=None)
    return f'"{value.isoformat()}Z"'


def _listed_job_json(row, position: int | None, speed: tuple[float | None, float | None]) -> str:
    """The JSON of JobOut for a listed row, as GET /v1/jobs/{id} would answer (the same fields and
    values; webhooks only there), with the stored config text put in as it is (every stored config
    is JSON that json.dumps wrote). Written directly: a JobOut built, validated and dumped per row
    was most of a page's Python (tests/api/test_jobs_api.py checks each item against its GET)."""
    if row.state == SUCCEEDED:
        progress = 1.0
    else:
        progress = min(row.step / row.total_steps, 1.0) if row.total_steps else 0.0
    return (f'{{"id":{_quote(row.id)},"name":{_str(row.name)},"state":{_quote(row.state)},"step":{_int(row.step)},'
            f'"total_steps":{_int(row.total_steps)},"progress":{_num(progress)},"last_loss":{_num(row.last_loss)},'
            f'"dataset_id":{_quote(row.dataset_id)},"base_model":{_quote(row.base_model)},'
            f'"config":{row.config_json},"queued_at":{_time(row.queued_at)},'
            f'"started_at":{_time(row.started_at)},"finished_at":{_time(row.finished_at)},'
            f'"error":{_str(row.error)},"attempt":{_int(row.attempt)},"worker":{_str(row.worker)},'
            f'"queue_position":{_int(position)},"priority":{_int(row.priority)},"num_gpus":{_int(row.num_gpus)},'
            f'"gpu_class":{_str(row.gpu_class)},"min_gpu_memory_gb":{_num(row.min_gpu_memory_gb)},'
            f'"images_per_s":{_num(speed[0])},"eta_s":{_num(speed[1])},"webhook_url":null,'
            f'"webhook_deliveries":null,"best_checkpoint":null}}')  # GET /v1/jobs/{id} only, as webhooks


def _listed_job_json_pydantic(row, position: int | None, speed: tuple[float | None, float | None]) -> str:
    """The same through JobOut (the reference _listed_job_json is checked against in tests)."""
    head = JobOut(**_job_fields(row, position, speed), config={}).model_dump_json(exclude={"config"})
    return f'{head[:-1]},"config":{row.config_json}}}'


@functools.cache
def _list_statements(admin: bool, by_state: bool, by_dataset: bool):
    """(page, count) statements of a listing with these filters, their values bound at execution:
    built once, since building and hashing them per request cost as much as running them."""
    where = [] if admin else [Job.owner == bindparam("owner")]
    if by_state:
        where.append(Job.state == bindparam("state"))
    if by_dataset:
        where.append(Job.dataset_id == bindparam("dataset_id"))
    page = (select(*_LIST_COLUMNS).where(*where).order_by(Job.queued_at.desc(), Job.id.desc())
            .limit(bindparam("limit", type_=Integer)).offset(bindparam("offset", type_=Integer)))
    if by_dataset:  # on the table and its index: a COUNT over a subquery of whole rows read every row
        return page, select(func.count()).select_from(Job).where(*where)
    counted = [] if admin else [JobCount.owner == bindparam("owner")]
    if by_state:
        counted.append(JobCount.state == bindparam("state"))
    return page, select(func.coalesce(func.sum(JobCount.n), 0)).where(*counted)


def list_jobs_json(session: Session, principal: Principal, state: JobState | None, limit: int, offset: int,
                   dataset_id: str | None = None) -> str:
    """The JobList JSON of a page of the jobs `principal` sees, most recently queued first, with
    `total` counting every match.

    Five queries at most, none per row: the page (an index range in queue order, see the jobs
    indexes in loraq.models), the total (from job_counts; skipped when a short page tells it),
    the page's queue positions (two) and its running jobs' speeds."""
    page, count = _list_statements(principal.admin, state is not None, dataset_id is not None)
    params = {"owner": principal.owner, "state": state.value if state is not None else None,
              "dataset_id": dataset_id, "limit": limit, "offset": offset}
    rows = session.execute(page, params).all()
    if 0 < len(rows) < limit or (offset == 0 and not rows):
        total = offset + len(rows)
    else:  # the kept counts (or, by dataset, the index)
        total = session.scalar(count, params)
    positions = queue_positions(session, rows)
    speeds = job_speeds(session, rows)
    items = ",".join(_listed_job_json(row, positions.get(row.id), speeds.get(row.id, (None, None))) for row in rows)
    return f'{{"items":[{items}],"total":{total},"limit":{limit},"offset":{offset}}}'


def page_of_jobs(factory: sessionmaker[Session], principal: Principal, state: JobState | None, limit: int,
                 offset: int, dataset_id: str | None = None) -> bytes:
    """`list_jobs_json` in a session of its own, encoded (run in one worker thread)."""
    with factory() as session:
        return list_jobs_json(session, principal, state, limit, offset, dataset_id).encode()


# --------------------------------------------------------------------------------------------
# Pages kept in memory


class PageCache:
    """The GET /v1/jobs pages this API process answered, answered again while nothing they show
    has changed: a request then costs a share of one small read instead of the page's six
    statements, 50 rows and their JSON.

    Each page is kept with the stamp it was built under: the sum of the job_versions counters its
    scope depends on (the owner's and the queue's; an admin's, all of them), which triggers bump
    in the transaction of every write a page shows (migration 0010), whoever writes it. Each
    counter only grows, so any bump moves the sum. The stamp is read before the page, so a kept
    page is never older than its stamp: once a write commits, the next request, in this process
    or any other, reads another stamp and builds the page anew. Nothing a page shows depends on
    the clock (an ETA is computed from metric times), so a kept page has no age limit.

    Stamps are read for many requests at once: a request waits for the next read that starts
    after it arrived (one runs at a time, in a worker thread, for every owner waiting), which under
    the benchmark's load serves about 20 requests with one statement and one thread hand-off.

    One per API process (on the app's state), bounded by pages and bytes, least recently used
    first out; it runs on the event loop (no locks) but for the reads and page builds, in worker
    threads. A page several requests miss at once is built once (they wait for the same build).
    """

    def __init__(self, engine: Engine, max_pages: int = 256, max_bytes: int = 64 << 20):
        self.engine = engine
        self.max_pages, self.max_bytes = max_pages, max_bytes
        self._pages: OrderedDict[tuple, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._building: dict[tuple, asyncio.Future] = {}
        self._next: asyncio.Future | None = None  # the stamp read that has not started yet
        self._next_scopes: set[str | None] = set()  # the owners it reads for (None: an admin's)
        self._reader: asyncio.Task | None = None
        self._marker = "%s" if engine.dialect.paramstyle in ("format", "pyformat") else "?"
        # pysqlite starts no transaction for a SELECT; psycopg would (and its pool reset a ROLLBACK)
        self._reads = (engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql"
                       else engine)

    async def stamp(self, principal: Principal) -> int:
        """The sum of the counters `principal`'s pages depend on, read after this call began."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next_scopes = set()
            if self._reader is None:
                self._reader = asyncio.ensure_future(self._read_stamps())
        scope = None if principal.admin else principal.owner
        self._next_scopes.add(scope)
        stamps = await asyncio.shield(self._next)  # a waiter going away must not cancel the others' read
        return stamps[scope]

    async def _read_stamps(self) -> None:
        """Start each pending read once the one before it has ended (until none is pending)."""
        try:
            while self._next is not None:
                done, scopes, self._next = self._next, self._next_scopes, None
                try:
                    stamps = await run_in_threadpool(self.read_stamps, scopes)
                except Exception as error:  # noqa: BLE001 - each waiter answers it (a store outage: 503)
                    done.set_exception(error)
                    done.exception()  # retrieved here: every waiter may have gone
                except BaseException:  # cancelled (the loop is closing): so are its waiters
                    done.cancel()
                    raise
                else:
                    done.set_result(stamps)
        finally:
            self._reader = None
            if self._next is not None:  # cancelled before it started: its waiters too
                self._next.cancel()
                self._next = None

    def read_stamps(self, scopes: set[str | None]) -> dict[str | None, int]:
        """{owner: the sum of their row and the queue's; None: the sum of all}, in one statement:
        SQL text through SQLAlchemy's connection (no statement to compile), in autocommit on
        PostgreSQL (one round trip, where a transaction adds a BEGIN and a ROLLBACK). A raw DBAPI
        cursor from the pool cost less (about 24 against 43 us of CPU on SQLite, 110 against 190 us
        on PostgreSQL), but a read is shared by many requests under load, and the connection turns
        an outage into SQLAlchemy's errors (a 503) and drops a broken connection from the pool."""
        owners = sorted(scope for scope in scopes if scope is not None)
        if None in scopes:
            sql, params = "SELECT owner, n FROM job_versions", ()
        else:
            sql = f"SELECT owner, n FROM job_versions WHERE owner IN ('', {', '.join([self._marker] * len(owners))})"
            params = tuple(owners)
        with self._reads.connect() as connection:
            counters = dict(connection.exec_driver_sql(sql, params).all())
        queue = counters.get("", 0)
        stamps = {owner: counters.get(owner, 0) + queue for owner in owners}
        if None in scopes:
            stamps[None] = sum(counters.values())
        return stamps

    async def page(self, factory: sessionmaker[Session], principal: Principal, state: JobState | None,
                   limit: int, offset: int, dataset_id: str | None = None) -> bytes:
        """The page's JSON (the body `page_of_jobs` writes), kept or built."""
        stamp = await self.stamp(principal)
        key = (principal.admin, None if principal.admin else principal.owner, state, dataset_id, limit, offset)
        kept = self._pages.get(key)
        if kept is not None and kept[0] == stamp:
            self._pages.move_to_end(key)
            return kept[1]
        build = self._building.get((key, stamp))
        if build is None:
            build = asyncio.ensure_future(run_in_threadpool(page_of_jobs, factory, principal, state, limit, offset,
                                                            dataset_id))
            self._building[key, stamp] = build
            build.add_done_callback(functools.partial(self._built, key, stamp))
        return await asyncio.shield(build)  # a client going away must not cancel the build others wait for

    def _built(self, key: tuple, stamp: int, build: asyncio.Future) -> None:
        del self._building[key, stamp]
        if build.cancelled() or build.exception() is not None:  # each waiter answers the error
            return
        kept = self._pages.get(key)
        if kept is not None:
            if kept[0] > stamp:  # a build under a later stamp finished first: keep the newer
                return
            self._bytes -= len(kept[1])
            del self._pages[key]
        body = build.result()
        if len(body) > self.max_bytes:
            return
        self._pages[key] = (stamp, body)
        self._bytes += len(body)
        while len(self._pages) > self.max_pages or self._bytes > self.max_bytes:
            _, (_, dropped) = self._pages.popitem(last=False)
            self._bytes -= len(dropped)


def list_metrics(session: Session, job: Job, after_step: int, limit: int) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step > after_step)
                                .order_by(JobMetric.step).limit(limit)))


def list_artifacts(session: Session, job: Job) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job.id)
                                .order_by(Artifact.created_at, Artifact.name)))


# --------------------------------------------------------------------------------------------
# Cancel, retry, delete


def _reload(session: Session, job: Job) -> Job:
    session.refresh(job)
    return job


def cancel_job(session: Session, redis, job: Job) -> Job:
    """Queued: canceled at once. Running: canceling, and the worker is flagged to stop."""
    for _ in range(3):  # the worker may move the job while we decide; decide again
        state = JobState(job.state)
        if state in FINAL_STATES:
            raise Conflict(f"job {job.id} is already {state.value}")
        if state == JobState.canceling:
            return job
        target = JobState.canceled if state == JobState.queued else JobState.canceling
        event = transition(session, job.id, state, target, event_data={"previous": state.value})
        if event is not None:
            session.commit()
            _after_commit(redis, None, [event], job.id)
            if target == JobState.canceling:
                _set_cancel_flag(redis, job.id)
            return _reload(session, job)
        session.rollback()
        job = _reload(session, job)
    raise Conflict(f"job {job.id} kept changing state; try again")


def _set_cancel_flag(redis, job_id: str) -> None:
    try:
        redis.set(cancel_key(job_id), 1, ex=CANCEL_FLAG_TTL_S)
    except redis_lib.RedisError as error:  # the worker also sees `canceling` in the database
        log.warning("job.cancel_flag_failed job=%s: %s", job_id, error)


def retry_job(session: Session, settings: Settings, redis, celery: Celery, job: Job) -> Job:
    """A failed or canceled job goes back to the queue as a new attempt."""
    state = JobState(job.state)
    if state not in (JobState.failed, JobState.canceled):
        raise Conflict(f"job {job.id} is {state.value}; only failed or canceled jobs can be retried")
    attempt = job.attempt + 1
    # A user's retry starts a new series of attempts: the automatic cap counts from here.
    event = transition(session, job.id, state, JobState.queued, attempt=job.attempt, new_attempt=attempt,
                       attempt_base=job.attempt, error=None, worker=None, started_at=None,
                       event_data={"previous": state.value, "attempt": attempt})
    if event is None:
        session.rollback()
        raise Conflict(f"job {job.id} changed state meanwhile (now {_reload(session, job).state}); try again")
    check_queued_jobs(session, settings, job.owner)
    session.commit()
    try:  # a flag left from an earlier cancel must not stop the new attempt
        redis.delete(cancel_key(job.id))
    except redis_lib.RedisError as error:
        log.warning("job.cancel_flag_clear_failed job=%s: %s", job.id, error)
    _after_commit(redis, celery, [event], job.id, attempt, session=session, settings=settings)
    return _reload(session, job)


def delete_job(session: Session, settings: Settings, redis, job: Job) -> None:
    """Remove a finished job's rows and files; 409 while it is queued, running or canceling."""
    if JobState(job.state) in ACTIVE_STATES:
        raise Conflict(f"job {job.id} is {job.state}; cancel it and let it stop before deleting it")
    # The job's row first: deleting its metrics bumps its owner's job_versions counter (migration
    # 0010), which every other writer takes after a job's row; a retry racing this delete would
    # otherwise hold the row and wait for the counter held here (a deadlock on PostgreSQL).
    if session.scalar(select(Job.id).where(Job.id == job.id, Job.state.in_([s.value for s in FINAL_STATES]))
                      .with_for_update()) is None:
        session.rollback()
        raise Conflict(f"job {job.id} changed state meanwhile; try again")
    for table in (JobMetric, JobEvent, Artifact, WebhookDelivery):
        session.execute(delete(table).where(table.job_id == job.id))
    deleted = session.execute(delete(Job).where(Job.id == job.id, Job.state.in_([s.value for s in FINAL_STATES])))
    if deleted.rowcount != 1:
        session.rollback()
        raise Conflict(f"job {job.id} changed state meanwhile; try again")
    session.commit()
    shutil.rmtree(storage.job_dir(settings, job.id), ignore_errors=True)
    object_store.remove(settings, f"jobs/{job.id}")
    try:
        redis.delete(events.stream_key(job.id), cancel_key(job.id))
    except redis_lib.RedisError as error:
        log.warning("job.stream_delete_failed job=%s: %s", job.id, error)


def artifact_file(session: Session, settings: Settings, job: Job, name: str) -> tuple[Artifact, Path, str]:
    """The artifact row named `name`, its file (checked to lie inside data_dir) and media type."""
    artifact = None if "\x00" in name else session.scalar(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}")
    root = settings.data_dir.resolve()
    path = Path(artifact.path)
    path = (path if path.is_absolute() else root / path).resolve()
    if root not in path.parents:
        log.error("artifact.outside_data_dir job=%s name=%s path=%s", job.id, name, artifact.path)
        raise NotFound(f"job {job.id} has no artifact {name!r}")
    if not path.is_file():
        raise NotFound(f"the file of artifact {name!r} of job {job.id} is missing")
    return artifact, path, mimetypes.guess_type(path.name)[0] or "application/octet-stream"
