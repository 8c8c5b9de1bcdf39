"""/v1/models: the base models a job may name."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep
from api.schemas import ModelOut
from api.services.models import is_available

router = APIRouter(tags=["models"])


@router.get("/models")
def list_models(settings: SettingsDep) -> list[ModelOut]:
    return [ModelOut(name=name, source=source, available=is_available(source))
            for name, source in settings.allowed_models().items()]
