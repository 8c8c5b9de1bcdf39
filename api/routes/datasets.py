"""/v1/datasets: upload (multipart, streamed to disk; an identical upload reuses the owner's
dataset), list, show, thumbnails, delete."""

from __future__ import annotations

import shutil
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import OwnedDataset, PrincipalDep, SessionDep, SettingsDep
from api.schemas import ERRORS, MAX_OFFSET, DatasetDetail, DatasetList, DatasetSummary, DatasetUploaded
from api.services import datasets as service
from api.services.uploads import MAX_NAME_CHARS, receive_upload

router = APIRouter(prefix="/datasets", tags=["datasets"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "additionalProperties": False,
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                  "description": "one zip, or images (PNG, JPEG, WebP) with .txt captions and/or a metadata.jsonl"},
        "name": {"type": "string", "maxLength": MAX_NAME_CHARS},
    },
}}}}}


ContentHash = Annotated[str | None, Header(
    alias="X-Loraq-Content-Hash", pattern="^[0-9a-f]{64}$",
    description="the upload's content hash, if the client knows it (loraq_client.fingerprint): an owner at the "
                "storage limit may then re-upload a dataset they already have, which is reused")]
REUSED_HEADER = "X-Loraq-Dataset-Reused"


@router.post("", status_code=201, openapi_extra=UPLOAD_BODY, responses={
    200: {"model": DatasetUploaded, "description": "an identical dataset of yours, reused (nothing new stored)"},
    **ERRORS})
async def upload_dataset(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
                         principal: PrincipalDep, content_hash: ContentHash = None,
                         dedupe: Annotated[bool, Query(description="false: store a new dataset even when an "
                                                                   "identical one of yours exists")] = True,
                         ) -> DatasetUploaded:
    """Upload a dataset and get its pre-flight report; refused files are listed, not fatal. An
    upload identical to one of your datasets (same file names and bytes) answers 200 with that
    dataset and `reused: true`, unless `dedupe=false`."""
    owner = principal.owner
    # Refused before the body is read when the owner is already at the limit (unless the hash
    # names a dataset that would be reused); the exact check comes once the upload's size on disk
    # is known, and a reused dataset adds nothing.
    await run_in_threadpool(service.check_room, session, settings, owner, content_hash if dedupe else None)
    staging = service.new_staging_dir(settings)
    try:
        upload = await receive_upload(request, staging / "parts", settings)
        dataset, reused = await run_in_threadpool(service.create_dataset, session, settings, owner, upload,
                                                  staging, dedupe)
    finally:
        await run_in_threadpool(shutil.rmtree, staging, True)
    response.status_code = 200 if reused else 201
    response.headers[REUSED_HEADER] = "true" if reused else "false"
    return service.dataset_detail(dataset, reused)


@router.get("")
def list_datasets(session: SessionDep, principal: PrincipalDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                  content_hash: Annotated[str | None, Query(max_length=64, description="only datasets with this "
                                                                                       "content hash")] = None,
                  ) -> DatasetList:
    """Your datasets (an admin's: everyone's), newest first."""
    items, total = service.list_datasets(session, principal, limit, offset, content_hash)
    return DatasetList(items=[DatasetSummary.model_validate(d, from_attributes=True) for d in items],
                       total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", responses=ERRORS)
def show_dataset(dataset: OwnedDataset) -> DatasetDetail:
    return service.dataset_detail(dataset)


@router.get("/{dataset_id}/thumbnails/{n}", response_class=FileResponse, responses=ERRORS)
def thumbnail(dataset: OwnedDataset, settings: SettingsDep, n: Annotated[int, Path(ge=0, le=3)]) -> FileResponse:
    """A small PNG of the dataset's n-th image (0-based, up to 4)."""
    return FileResponse(service.require_thumbnail(settings, dataset, n), media_type="image/png")


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS)
def delete_dataset(dataset: OwnedDataset, session: SessionDep, settings: SettingsDep) -> Response:
    """Delete the dataset and its files; 409 while any job (even a finished one) refers to it."""
    service.delete_dataset(session, settings, dataset)
    return Response(status_code=204)
