"""The full training config of one attempt: the user's options plus what only the service decides."""

from __future__ import annotations

import logging
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.orm import object_session

from loraq import object_store, registry, storage
from loraq.errors import AppError
from loraq.models import Dataset, Job
from loraq.settings import Settings
from trainer.checkpoints import complete_checkpoints, is_complete
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.model import LORA_WEIGHTS_NAME

log = logging.getLogger("loraq.worker")

# Options the service sets; a value the user gave for one of these is dropped, never obeyed, so a
# job cannot read another model or write outside its attempt folder.
SERVICE_OPTIONS = frozenset({"pretrained_model_name_or_path", "pretrained_config_dir", "train_data_dir",
                             "output_dir", "device", "resume_from_checkpoint", "cache_dir", "cache_max_bytes",
                             "validation_data_dir"})


def build_train_config(settings: Settings, job: Job, dataset: Dataset, attempt: int) -> TrainConfig:
    """Validate the job's options with the paths of this attempt; raises ConfigError naming the problem."""
    # The job's own session reads the registry: a model an admin added since start is known here too.
    entry = registry.find_model(settings, object_session(job), job.base_model)
    if entry is None:
        raise ConfigError(f"base_model: {job.base_model!r} is not one of the allowed models")
    model = registry.describe(settings, entry)
    if model.problem is not None:
        raise ConfigError(f"base_model: {job.base_model!r} cannot be trained here: {model.problem}")
    ignored = sorted(SERVICE_OPTIONS & set(job.config))
    if ignored:
        log.warning("job.options_ignored job=%s options=%s", job.id, ",".join(ignored))
    values = {key: value for key, value in job.config.items() if key not in SERVICE_OPTIONS}
    values.update(
        **model.trainer_values(),
        train_data_dir=str(local_dataset(settings, dataset)),
        output_dir=str(storage.attempt_dir(settings, job.id, attempt)),
        device=settings.worker_device,
        # One latent cache for every job here: a sweep over one dataset encodes it once.
        cache_dir=str(settings.latent_cache_dir.resolve()),
        cache_max_bytes=settings.cache_max_bytes,
    )
    resume = resume_checkpoint(settings, job.id, attempt)
    if resume is not None:
        values["resume_from_checkpoint"] = str(resume)
    return load_config(values, model.family)


def local_dataset(settings: Settings, dataset: Dataset) -> Path:
    """The dataset's folder on this host: with an object store, its copy in this host's data
    directory (pulled once, then reused by every job on it); else where the API stored it."""
    store = object_store.from_settings(settings)
    if store is None:
        return dataset_path(settings, dataset.storage_path)
    try:
        return object_store.pull_dataset(settings, store, dataset.id, storage.dataset_dir(settings, dataset.id))
    except FileNotFoundError as error:
        raise ConfigError(f"train_data_dir: {error}") from None
    except (BotoCoreError, ClientError) as error:  # the job fails naming it; a retry pulls again
        raise ConfigError(f"train_data_dir: the dataset could not be read from {store.url}: {error}") from None


def dataset_path(settings: Settings, storage_path: str) -> Path:
    """The dataset's folder (or zip), which must lie inside the data directory."""
    try:  # an absolute path replaces the root in the join, and is then checked the same way
        return storage.inside(settings.data_dir, storage_path)
    except AppError:
        raise ConfigError(f"train_data_dir: dataset folder {storage_path} is outside the data directory") from None


def resume_checkpoint(settings: Settings, job_id: str, attempt: int) -> Path | None:
    """The furthest complete checkpoint any attempt of this job (up to `attempt`) left behind
    (with an object store, pulled from it when it is further than what this host has)."""
    found = [
        (_step(path), number, path)
        for number in range(1, attempt + 1)
        for path in complete_checkpoints(storage.attempt_dir(settings, job_id, number))
    ]
    try:
        pulled = object_store.pull_checkpoint(settings, job_id, attempt, storage.attempt_dir, LORA_WEIGHTS_NAME,
                                              max(found)[0] if found else -1)
    except (BotoCoreError, ClientError) as error:  # never train again from scratch in silence
        raise ConfigError(f"resume_from_checkpoint: the object store did not answer ({error})") from None
    if pulled is not None and is_complete(pulled):
        return pulled
    return max(found)[2] if found else None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])
