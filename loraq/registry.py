"""The base models a job may name: the demo models, LORAQ_MODELS, and those admins add while the
service runs (rows of `base_models`, so every API process and worker sees them at once).

Each model's family is detected from its files (trainer.detect: model_index.json, or a single
file's key names), never from its name; a single-file checkpoint also needs its family's config
folder, which the trainer loads it with instead of downloading one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loraq.errors import Conflict, Invalid, NotFound
from loraq.models import ACTIVE_STATES, BaseModelRow, Job
from loraq.settings import DEMO_MODELS, Settings
from trainer.detect import ModelInfo, UnsupportedModel, inspect_model, local_path

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?")


@dataclass(frozen=True)
class ModelEntry:
    """One registered base model: its name, what the trainer loads, and where it was registered."""

    name: str
    source: str
    origin: str  # "demo" | "settings" | "added"
    config_dir: str | None = None  # for a single file: its own config folder, if given


@dataclass(frozen=True)
class ModelStatus:
    """What the model's files say on this machine: its family and form, or why it cannot train."""

    entry: ModelEntry
    info: ModelInfo | None
    config_dir: str | None  # the config folder a single file loads with (own, or the family's default)
    problem: str | None

    @property
    def family(self) -> str | None:
        return self.info.family if self.info else None

    @property
    def available(self) -> bool:
        """A job can train on it here: its files are here, of a supported family, and complete."""
        return self.info is not None and self.problem is None

    def trainer_values(self) -> dict[str, str]:
        """The trainer options this model sets (its source, and a single file's config folder)."""
        values = {"pretrained_model_name_or_path": self.entry.source}
        if self.info is not None and self.info.single_file:
            values["pretrained_config_dir"] = self.config_dir
        return values


def all_models(settings: Settings, session: Session) -> dict[str, ModelEntry]:
    """Every model by name: demo models and LORAQ_MODELS first, then the added ones."""
    models = {name: ModelEntry(name, source, "demo" if name in DEMO_MODELS else "settings")
              for name, source in settings.allowed_models().items()}
    for row in session.scalars(select(BaseModelRow).order_by(BaseModelRow.created_at, BaseModelRow.name)):
        models.setdefault(row.name, ModelEntry(row.name, row.source, "added", row.config_dir))
    return models


def find_model(settings: Settings, session: Session, name: str) -> ModelEntry | None:
    static = settings.allowed_models()
    if name in static:
        return ModelEntry(name, static[name], "demo" if name in DEMO_MODELS else "settings")
    row = session.get(BaseModelRow, name)
    return None if row is None else ModelEntry(row.name, row.source, "added", row.config_dir)


def describe(settings: Settings, entry: ModelEntry) -> ModelStatus:
    """Detect the entry's family on this machine; a problem names why it cannot train here."""
    try:
        info = _inspect(entry.source)
    except UnsupportedModel as error:
        return ModelStatus(entry, None, entry.config_dir, str(error))
    if not info.single_file:
        return ModelStatus(entry, info, None, None)
    config = entry.config_dir or settings.model_configs.get(info.family)
    try:
        return ModelStatus(entry, info, config_folder(config, info.family, entry.source), None)
    except UnsupportedModel as error:
        return ModelStatus(entry, info, config, str(error))


def config_folder(config: str | None, family: str, source: str) -> str:
    """The local folder of a single file's config: given (a folder or a cached hub id) and of the
    file's own family, or UnsupportedModel saying what to give."""
    if not config:
        raise UnsupportedModel(f"{source}: a single-file {family} checkpoint needs its family's config "
                               f"folder (a diffusers {family} pipeline folder or cached hub id): give "
                               f"one with the model, or set LORAQ_MODEL_CONFIGS={family}=FOLDER")
    info = _inspect(config)
    if info.single_file:
        raise UnsupportedModel(f"config {config}: a config must be a pipeline folder or hub id, not a file")
    if info.family != family:
        raise UnsupportedModel(f"config {config}: it is a pipeline of the {info.family} family, but {source} "
                               f"is a checkpoint of the {family} family")
    return info.path


def _inspect(source: str) -> ModelInfo:
    """inspect_model, remembered while the file or folder is unchanged (a single file's header
    can be a few hundred kB of JSON, and GET /v1/models looks at every model)."""
    path = local_path(source)
    try:
        marker = path / "model_index.json" if path.is_dir() else path
        stat = marker.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError):
        stamp = None
    return _inspect_cached(source, stamp) if stamp is not None else inspect_model(source)


@lru_cache(maxsize=256)
def _inspect_cached(source: str, stamp: tuple[int, int]) -> ModelInfo:
    return inspect_model(source)


# --------------------------------------------------------------------------------------------
# Adding and removing (admins: POST/DELETE /v1/models, loraq-admin models)


def default_name(source: str) -> str:
    path = Path(source)
    if _exists(path):
        return path.name if path.is_dir() else path.stem
    return source  # a hub id names itself, as in LORAQ_MODELS


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the filesystem: no such path
        return False


def add_model(session: Session, settings: Settings, source: str, name: str | None = None,
              config: str | None = None, added_by: str | None = None) -> ModelStatus:
    """Register a base model after checking it here: it exists, its family is supported, and a
    single file has a config folder of its family. 422 naming the problem; 409 for a taken name."""
    source = source.strip()
    path = local_path(source)
    if _exists(path):  # stored absolute: workers run from other folders
        source = str(path.resolve())
    if config:
        config_path = local_path(config.strip())
        config = str(config_path.resolve()) if _exists(config_path) else config.strip()
    name = name or default_name(source)
    status = describe(settings, ModelEntry(name, source, "added", config))
    if status.problem is not None:
        field = "config" if status.info is not None else "source"
        raise Invalid(f"{field}: {status.problem}")
    if not NAME_PATTERN.fullmatch(name):
        raise Invalid(f"name: {name!r} is not a usable model name (letters, digits, '.', '_', '-', "
                      "at most one '/'; give one with --name)")
    if status.info is not None and not status.info.single_file and config:
        raise Invalid(f"config: only a single-file checkpoint takes a config folder; {source} is a "
                      f"{status.info.kind} with its own")
    if find_model(settings, session, name) is not None:
        raise Conflict(f"a base model named {name!r} already exists; choose another --name")
    session.add(BaseModelRow(name=name, source=source, config_dir=config, family=status.family,
                             added_by=added_by))
    try:
        session.commit()
    except IntegrityError:  # another admin added the same name meanwhile
        session.rollback()
        raise Conflict(f"a base model named {name!r} already exists; choose another --name") from None
    return status


def remove_model(session: Session, settings: Settings, name: str) -> None:
    """Forget an added model (its files stay); 409 for a model from settings or one active jobs use."""
    if name in settings.allowed_models():
        raise Conflict(f"base model {name!r} comes from the settings (LORAQ_MODELS or the demo models); "
                       "change them there")
    row = session.get(BaseModelRow, name)
    if row is None:
        raise NotFound(f"base model {name!r} not found")
    active = session.scalar(select(Job.id).where(Job.base_model == name,
                                                 Job.state.in_([s.value for s in ACTIVE_STATES])).limit(1))
    if active is not None:
        raise Conflict(f"base model {name!r} is used by active job {active}; let it finish or cancel it first")
    session.delete(row)
    session.commit()
