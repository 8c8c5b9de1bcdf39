"""What the artifacts routes add to single files: a folder of artifacts as one zip
(`tensorboard.zip`, `checkpoint-10.zip`) and a LoRA file's training metadata (its safetensors
header: kohya's `ss_*` and the `modelspec.*` keys)."""

from __future__ import annotations

import json
import struct
import tempfile
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.jobs import artifact_file
from loraq.errors import NotFound
from loraq.models import Artifact, ArtifactKind, Job
from loraq.settings import Settings

MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors' own cap on a header


def folder_zip(session: Session, settings: Settings, job: Job, name: str):
    """A temporary zip of every artifact under `folder/` for `folder.zip`, or NotFound."""
    folder = name.removesuffix(".zip")
    if "\x00" in name or not name.endswith(".zip") or not folder:  # PostgreSQL refuses NUL in text
        raise NotFound(f"job {job.id} has no artifact {name!r}")
    names = session.scalars(select(Artifact.name).where(Artifact.job_id == job.id,
                                                         Artifact.name.startswith(folder + "/", autoescape=True))
                            .order_by(Artifact.name)).all()
    if not names:
        raise NotFound(f"job {job.id} has no artifact {name!r}")
    spool = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in names:
            _, path, _ = artifact_file(session, settings, job, member)  # checked to lie in data_dir
            archive.write(path, member)
    size = spool.tell()
    spool.seek(0)
    return _chunks(spool), size


def _chunks(spool, size: int = 1 << 20):
    with spool:
        while chunk := spool.read(size):
            yield chunk


def lora_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file's header (None when it is not readable as one)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def is_lora(artifact: Artifact) -> bool:
    return artifact.kind in (ArtifactKind.lora.value, ArtifactKind.checkpoint.value) and \
        artifact.name.endswith(".safetensors")
