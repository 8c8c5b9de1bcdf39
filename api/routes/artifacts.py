"""/v1/jobs/{id}/artifacts: the files a job produced, listed and downloaded by name; a folder of
them (`tensorboard/...`, `checkpoint-10/...`) also downloads as `<folder>.zip`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import OwnedJob, SessionDep, SettingsDep
from api.schemas import ERRORS, ArtifactOut
from api.services import artifact_extras, artifact_objects
from api.services import jobs as service
from loraq import object_store
from loraq.errors import NotFound

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"])


@router.get("", responses=ERRORS)
def list_artifacts(job: OwnedJob, session: SessionDep, settings: SettingsDep) -> list[ArtifactOut]:
    """Every artifact; a LoRA file (final or a checkpoint's) also shows its training metadata."""
    store = object_store.from_settings(settings)

    def metadata(a):
        if not artifact_extras.is_lora(a):
            return None
        return artifact_objects.lora_metadata(store, job, a) if store else artifact_extras.lora_metadata(Path(a.path))

    return [ArtifactOut(kind=a.kind, name=a.name, size=a.size, sha256=a.sha256, step=a.step,
                        url=f"/v1/jobs/{job.id}/artifacts/{quote(a.name)}", metadata=metadata(a))
            for a in service.list_artifacts(session, job)]


@router.get("/{name:path}", response_class=FileResponse, responses=ERRORS)
def download_artifact(job: OwnedJob, name: str, session: SessionDep, settings: SettingsDep):
    """The artifact's bytes (looked up by name in the job's artifact list, never used as a path),
    or for `<folder>.zip` a zip of the artifacts under that folder. With an object store: streamed
    from it, or a 307 to a presigned URL (LORAQ_S3_PRESIGN)."""
    if (store := object_store.from_settings(settings)) is not None:
        return artifact_objects.download(session, store, job, name)
    try:
        artifact, path, media_type = service.artifact_file(session, settings, job, name)
    except NotFound:
        spool, size = artifact_extras.folder_zip(session, settings, job, name)
        filename = quote(name.rsplit("/", 1)[-1])
        return StreamingResponse(spool, media_type="application/zip", headers={
            "content-disposition": f"attachment; filename*=utf-8''{filename}", "content-length": str(size)})
    return FileResponse(path, media_type=media_type, filename=artifact.name.rsplit("/", 1)[-1])
