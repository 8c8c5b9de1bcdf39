"""Datasets and artifacts in an S3-compatible object store (`LORAQ_STORAGE_URL=s3://bucket/prefix`).

The local data directory stays the default: with no storage URL (or `file:`/a path) nothing here
runs and every file lives under `data_dir` as before. With an `s3://` URL the store is the truth
and `data_dir` a per-host cache, so workers on other hosts share no filesystem with the API:

- an object's key is its file's path relative to `data_dir` under the URL's prefix
  (`<prefix>/datasets/<id>/...`, `<prefix>/jobs/<id>/attempt-N/...`), the layout each host's
  cache keeps too;
- the API validates an upload locally, then writes it to the store before the row commits;
- a worker pulls a dataset once into its own `data_dir/datasets/<id>` and pushes each artifact as
  it is recorded (a checkpoint's whole folder, its LoRA file last, so a folder in the store is
  complete once that is there), from a thread of its own so the lease renewal never waits on an
  upload (worker/pusher.py); multipart above `LORAQ_S3_MULTIPART_BYTES`;
- a resumed attempt whose host has no checkpoint pulls the furthest complete one from the store;
- downloads stream through the API, or (`LORAQ_S3_PRESIGN=true`) answer 307 to a presigned URL;
- deletes remove the objects under the dataset's or job's prefix.

Credentials and region come from boto3's own chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, a profile, an instance role); the endpoint from `LORAQ_S3_ENDPOINT_URL`
(MinIO, moto, another S3-compatible server).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loraq.settings import Settings

log = logging.getLogger("loraq.storage")

_CHECKPOINT_KEY = re.compile(r"^attempt-(\d+)/(checkpoint-(\d+))/(.+)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_url(url: str | None) -> tuple[str, str] | None:
    """(bucket, prefix) of an `s3://bucket/prefix` URL; None for the local directory (no URL,
    `file:` or a plain path); ValueError naming the problem otherwise."""
    if not url or not url.strip() or url.startswith("file:") or "://" not in url:
        return None
    scheme, _, rest = url.partition("://")
    if scheme != "s3":
        raise ValueError(f"storage_url: {url!r} is neither s3://bucket/prefix nor a local directory")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"storage_url: {bucket!r} is not a valid bucket name (in {url!r})")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@dataclass
class ObjectStore:
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    multipart_bytes: int = 64 * 1024**2
    presign: bool = False
    presign_expires_s: int = 3600

    def __post_init__(self) -> None:
        self._clients: dict[int, object] = {}
        self._lock = threading.Lock()

    @property
    def client(self):
        # One client per process: boto3 clients are thread-safe but not fork-safe (the worker forks).
        pid = os.getpid()
        with self._lock:
            if pid not in self._clients:
                import boto3
                from botocore.config import Config

                self._clients[pid] = boto3.client(
                    "s3", endpoint_url=self.endpoint_url,
                    config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                  s3={"addressing_style": "path"} if self.endpoint_url else None))
            return self._clients[pid]

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_bytes, multipart_chunksize=self.multipart_bytes)

    def key(self, rel: str) -> str:
        return self.prefix + rel.lstrip("/")

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # Writing

    def put_file(self, local: Path, rel: str) -> None:
        """Upload one file (multipart above `multipart_bytes`: boto3's managed transfer)."""
        self.client.upload_file(str(local), self.bucket, self.key(rel), Config=self._transfer())

    def put_folder(self, local: Path, rel_prefix: str, last: str | None = None) -> int:
        """Upload every file under `local` (hidden ones too) to `rel_prefix/...`; the file named
        `last` (relative) goes last. Returns how many went."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
        for path in files:
            self.put_file(path, f"{rel_prefix.rstrip('/')}/{path.relative_to(local).as_posix()}")
        return len(files)

    def delete_prefix(self, rel_prefix: str) -> int:
        """Remove every object under `rel_prefix/`; returns how many."""
        base = rel_prefix.rstrip("/")
        keys = [self.key(f"{base}/{rel}") for rel, _ in self.list(rel_prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys at most
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
        return len(keys)

    # Reading

    def list(self, rel_prefix: str) -> list[tuple[str, int]]:
        """(path relative to `rel_prefix/`, size) of every object under it."""
        base = self.key(rel_prefix.rstrip("/") + "/")
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            found += [(item["Key"][len(base):], item["Size"]) for item in page.get("Contents", [])]
        return found

    def exists_prefix(self, rel_prefix: str) -> bool:
        answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(rel_prefix.rstrip("/") + "/"),
                                             MaxKeys=1)
        return answer.get("KeyCount", 0) > 0

    def get_file(self, rel: str, dest: Path) -> None:
        """Download to `dest` through a temporary name, so `dest` is whole or absent."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.download")
        try:
            self.client.download_file(self.bucket, self.key(rel), str(partial), Config=self._transfer())
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)

    def get_folder(self, rel_prefix: str, dest: Path, last: str | None = None) -> int:
        """Download every object under `rel_prefix/` into `dest`; returns how many."""
        members = self.list(rel_prefix)
        members.sort(key=lambda item: item[0] == last)
        for rel, _ in members:
            target = dest.joinpath(*PurePosixPath(rel).parts)
            if ".." in PurePosixPath(rel).parts:  # a key no loraq wrote; never leave dest
                raise ValueError(f"object {rel!r} would leave {dest}")
            self.get_file(f"{rel_prefix.rstrip('/')}/{rel}", target)
        return len(members)

    def size(self, rel: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(rel))["ContentLength"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        answer = self.client.get_object(Bucket=self.bucket, Key=self.key(rel),
                                        Range=f"bytes={start}-{start + length - 1}")
        return answer["Body"].read()

    def stream(self, rel: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def presigned_url(self, rel: str, filename: str) -> str:
        from urllib.parse import quote

        return self.client.generate_presigned_url("get_object", ExpiresIn=self.presign_expires_s, Params={
            "Bucket": self.bucket, "Key": self.key(rel),
            "ResponseContentDisposition": f"attachment; filename*=utf-8''{quote(filename)}"})


_stores: dict[tuple, ObjectStore] = {}
_stores_lock = threading.Lock()


def from_settings(settings: Settings) -> ObjectStore | None:
    """The configured store, or None when files live in the local data directory."""
    parsed = parse_url(settings.storage_url)
    if parsed is None:
        return None
    spec = (*parsed, settings.s3_endpoint_url, settings.s3_multipart_bytes, settings.s3_presign,
            settings.s3_presign_expires_s)
    with _stores_lock:
        if spec not in _stores:
            _stores[spec] = ObjectStore(*spec)
        return _stores[spec]


def relative(settings: Settings, path: Path) -> str:
    """A local file's key (relative to the data directory)."""
    return path.resolve().relative_to(settings.data_dir.resolve()).as_posix()


def job_key(job_id: str, path: str) -> str | None:
    """The key of a job's artifact from its recorded path, as written on whichever host:
    `.../jobs/<job_id>/attempt-N/...` -> `jobs/<job_id>/attempt-N/...` (None if it is not one)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "jobs" and parts[i + 1] == job_id:
            rest = parts[i:]
            return None if ".." in rest else "/".join(rest)
    return None


# --------------------------------------------------------------------------------------------
# What the API and the workers call (each a no-op on the local directory)


def push(settings: Settings, path: Path, folder_last: str | None = None) -> None:
    """Push a file the worker wrote (or, with `folder_last`, its whole folder with that file
    last). Never raises: a store that refuses is logged, and the download then says the file is
    missing, rather than failing the job over an upload."""
    store = from_settings(settings)
    if store is None:
        return
    try:
        if folder_last is not None:
            store.put_folder(path.parent, relative(settings, path.parent), last=folder_last)
        else:
            store.put_file(path, relative(settings, path))
    except Exception:  # noqa: BLE001 - see above
        log.exception("storage.push_failed path=%s store=%s", path, store.url)


def remove(settings: Settings, rel_prefix: str) -> None:
    """Delete the objects under a dataset's or job's prefix (after its row is gone)."""
    store = from_settings(settings)
    if store is None:
        return
    try:
        store.delete_prefix(rel_prefix)
    except Exception:  # noqa: BLE001 - the row is gone already; leftovers are only space
        log.exception("storage.delete_failed prefix=%s store=%s", rel_prefix, store.url)


def pull_dataset(settings: Settings, store: ObjectStore, dataset_id: str, dest: Path) -> Path:
    """The dataset's local copy in `dest` (this host's cache), downloaded once; FileNotFoundError
    when the store holds none."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        if store.get_folder(f"datasets/{dataset_id}", partial) == 0:
            raise FileNotFoundError(f"dataset {dataset_id} has no files in {store.url}")
        try:
            os.replace(partial, dest)
        except OSError:  # another worker on this host pulled it meanwhile
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("storage.dataset_pulled dataset=%s into=%s", dataset_id, dest)
    return dest


def pull_checkpoint(settings: Settings, job_id: str, attempt: int, attempt_dir, marker: str,
                    local_best: int) -> Path | None:
    """Download the furthest complete checkpoint (its `marker` file is pushed last) any attempt up
    to `attempt` left in the store, when it is further than `local_best`, the furthest step this
    host has. Returns its local folder, or None."""
    store = from_settings(settings)
    if store is None:
        return None
    folders: dict[tuple[int, int], set[str]] = {}
    for rel, _ in store.list(f"jobs/{job_id}"):
        if (match := _CHECKPOINT_KEY.match(rel)) and int(match.group(1)) <= attempt:
            folders.setdefault((int(match.group(3)), int(match.group(1))), set()).add(match.group(4))
    complete = [key for key, files in folders.items() if marker in files]
    if not complete:
        return None
    step, number = max(complete)
    if step <= local_best:
        return None
    dest = Path(attempt_dir(settings, job_id, number)) / f"checkpoint-{step}"
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        store.get_folder(f"jobs/{job_id}/attempt-{number}/checkpoint-{step}", partial, last=marker)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("storage.checkpoint_pulled job=%s checkpoint=%s", job_id, dest)
    return dest
