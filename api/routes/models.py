"""/v1/models: the base models a job may name (with their family); admins add and remove them."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import AdminDep, SessionDep, SettingsDep
from api.schemas import ERRORS, ModelCreate, ModelOut
from api.services import models as service

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(session: SessionDep, settings: SettingsDep) -> list[ModelOut]:
    """Every base model with its family as detected from its files, and why one cannot train here."""
    return service.list_models(session, settings)


@router.post("", status_code=201, responses=ERRORS)
def add_model(body: ModelCreate, session: SessionDep, settings: SettingsDep, principal: AdminDep) -> ModelOut:
    """Admins: register a pipeline folder, a single-file .safetensors checkpoint or a cached hub id;
    its family is detected and checked now (422 naming the problem), workers see it at once."""
    return service.add_model(session, settings, body, principal.owner)


@router.delete("/{name:path}", status_code=204, responses=ERRORS)
def remove_model(name: str, session: SessionDep, settings: SettingsDep, _: AdminDep) -> Response:
    """Admins: forget an added model (its files stay); 409 for one from the settings or in use."""
    service.remove_model(session, settings, name)
    return Response(status_code=204)
