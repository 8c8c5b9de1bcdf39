"""/v1/jobs/{id}/artifacts: the files a job produced, listed and downloaded by name."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import OwnedJob, SessionDep, SettingsDep
from api.schemas import ERRORS, ArtifactOut
from api.services import jobs as service

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"])


@router.get("", responses=ERRORS)
def list_artifacts(job: OwnedJob, session: SessionDep) -> list[ArtifactOut]:
    return [ArtifactOut(kind=a.kind, name=a.name, size=a.size, sha256=a.sha256, step=a.step,
                        url=f"/v1/jobs/{job.id}/artifacts/{quote(a.name)}")
            for a in service.list_artifacts(session, job)]


@router.get("/{name:path}", response_class=FileResponse, responses=ERRORS)
def download_artifact(job: OwnedJob, name: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The artifact's bytes (looked up by name in the job's artifact list, never used as a path)."""
    artifact, path, media_type = service.artifact_file(session, settings, job, name)
    return FileResponse(path, media_type=media_type, filename=artifact.name.rsplit("/", 1)[-1])
