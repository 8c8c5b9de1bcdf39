"""Where files live under the data directory; every path is checked to stay inside it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraq.errors import BadRequest
from loraq.settings import Settings


def inside(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing anything that would resolve outside `root`."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise BadRequest(f"path {'/'.join(parts)!r} leaves the data directory")
    return path


def datasets_root(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "datasets"


def dataset_dir(settings: Settings, dataset_id: str) -> Path:
    return inside(datasets_root(settings), dataset_id)


def uploads_root(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "uploads"


def job_dir(settings: Settings, job_id: str) -> Path:
    return inside(settings.data_dir.resolve() / "jobs", job_id)


def attempt_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """Each attempt writes its own folder, so a stale attempt cannot overwrite a newer one."""
    return job_dir(settings, job_id) / f"attempt-{attempt}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
