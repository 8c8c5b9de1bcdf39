"""Artifacts held in the object store (LORAQ_STORAGE_URL=s3://...): the API has no file of its
own for them, so a download streams the object through (or, with LORAQ_S3_PRESIGN=true, answers
307 to a presigned URL the client fetches from the store itself), a folder zips the objects, and
a LoRA's metadata is read from its header with ranged reads."""

from __future__ import annotations

import json
import mimetypes
import struct
import tempfile
import zipfile
from urllib.parse import quote

from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.artifact_extras import MAX_HEADER_BYTES, _chunks
from loraq.errors import NotFound
from loraq.models import Artifact, Job
from loraq.object_store import ObjectStore, job_key


def _key(job: Job, artifact: Artifact) -> str:
    key = job_key(job.id, artifact.path)
    if key is None:
        raise NotFound(f"job {job.id} has no artifact {artifact.name!r}")
    return key


def download(session: Session, store: ObjectStore, job: Job, name: str):
    """The response for GET .../artifacts/{name}: one object, or `<folder>.zip` of several."""
    artifact = None if "\x00" in name else session.scalar(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        return _folder_zip(session, store, job, name)
    key = _key(job, artifact)
    filename = artifact.name.rsplit("/", 1)[-1]
    size = store.size(key)
    session.commit()  # no connection held while the bytes go out
    if size is None:
        raise NotFound(f"the file of artifact {name!r} of job {job.id} is missing")
    if store.presign:
        return RedirectResponse(store.presigned_url(key, filename), status_code=307)
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return StreamingResponse(store.stream(key), media_type=media_type,
                             headers={"content-length": str(size),
                                      "content-disposition": f"attachment; filename*=utf-8''{quote(filename)}"})


def _folder_zip(session: Session, store: ObjectStore, job: Job, name: str):
    folder = name.removesuffix(".zip")
    rows = session.scalars(select(Artifact).where(Artifact.job_id == job.id,
                                                  Artifact.name.startswith(folder + "/", autoescape=True))
                           .order_by(Artifact.name)).all()
    if not name.endswith(".zip") or not folder or not rows:
        raise NotFound(f"job {job.id} has no artifact {name!r}")
    members = [(row.name, _key(job, row)) for row in rows]
    session.commit()
    spool = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, key in members:
            if store.size(key) is None:
                raise NotFound(f"the file of artifact {member!r} of job {job.id} is missing")
            with archive.open(member, "w") as out:
                for chunk in store.stream(key):
                    out.write(chunk)
    size = spool.tell()
    spool.seek(0)
    return StreamingResponse(_chunks(spool), media_type="application/zip", headers={
        "content-disposition": f"attachment; filename*=utf-8''{quote(name.rsplit('/', 1)[-1])}",
        "content-length": str(size)})


def lora_metadata(store: ObjectStore, job: Job, artifact: Artifact) -> dict[str, str] | None:
    """The `__metadata__` of a LoRA object's safetensors header (two ranged reads)."""
    key = job_key(job.id, artifact.path)
    if key is None:
        return None
    try:
        (length,) = struct.unpack("<Q", store.read_range(key, 0, 8))
        if length > MAX_HEADER_BYTES:
            return None
        header = json.loads(store.read_range(key, 8, length))
    except Exception:  # noqa: BLE001 - missing or unreadable: no metadata shown
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None
