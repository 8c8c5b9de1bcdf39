"""Base models: the registry (loraq.registry) as the API shows it, and admins' additions."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.schemas import ModelCreate, ModelOut
from loraq import registry
from loraq.errors import Invalid
from loraq.registry import ModelStatus
from loraq.settings import Settings


def model_out(status: ModelStatus) -> ModelOut:
    entry = status.entry
    return ModelOut(name=entry.name, source=entry.source, available=status.available, family=status.family,
                    kind=status.info.kind if status.info else None, config=status.config_dir,
                    origin=entry.origin, problem=status.problem)


def list_models(session: Session, settings: Settings) -> list[ModelOut]:
    models = registry.all_models(settings, session)
    session.commit()  # hand the connection back before reading model files
    return [model_out(registry.describe(settings, entry)) for entry in models.values()]


def add_model(session: Session, settings: Settings, body: ModelCreate, owner: str) -> ModelOut:
    return model_out(registry.add_model(session, settings, body.source, body.name, body.config, added_by=owner))


def remove_model(session: Session, settings: Settings, name: str) -> None:
    registry.remove_model(session, settings, name)


def resolve_for_job(session: Session, settings: Settings, name: str) -> ModelStatus:
    """The registered model `name` as a job would train it, or a 422 naming why it cannot."""
    entry = registry.find_model(settings, session, name)
    if entry is None:
        raise Invalid(f"base_model: unknown base model {name!r}; GET /v1/models lists them")
    status = registry.describe(settings, entry)
    if status.problem is not None:
        raise Invalid(f"base_model: {name!r} cannot be trained here: {status.problem}")
    return status
