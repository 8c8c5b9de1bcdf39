"""A Python client for the loraq service (httpx only; none of the server's packages).

    from loraq_client import Client
    client = Client()                                  # LORAQ_URL / LORAQ_API_KEY, or the local default
    dataset = client.upload_dataset("photos/")         # a folder (zipped on the fly) or a zip
    job = client.create_job(dataset.id, "tiny-sd", {"max_train_steps": 100})
    job = client.wait(job.id)                          # follows the live events
    client.download(job.id, "pytorch_lora_weights.safetensors", "out/")

Every non-2xx answer raises LoraqError(status, message) with the server's message; a server that
cannot be reached raises LoraqError(0, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from loraq_client.fingerprint import dataset_fingerprint, hidden

DEFAULT_URL = "http://127.0.0.1:8000"
LOCAL_KEY_FILE = Path("var") / "admin-key"
FINAL_STATES = frozenset({"succeeded", "failed", "canceled"})
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CHUNK = 1 << 20


class LoraqError(Exception):
    """A non-2xx answer (status and the server's message), or status 0 when the server is unreachable."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Typed results: known fields as attributes, the whole answer in `raw`.


def _build(cls, data: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names}, raw=data)


@dataclass
class Dataset:
    id: str
    name: str
    image_count: int = 0
    captioned_count: int = 0
    total_bytes: int = 0
    content_hash: str = ""
    created_at: str = ""
    owner: str = ""
    report: dict | None = None
    thumbnails: list | None = None
    captions: list | None = None
    reused: bool = False  # an upload's answer: the owner's identical dataset, nothing new stored
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Job:
    id: str
    state: str
    name: str | None = None
    step: int = 0
    total_steps: int = 0
    progress: float = 0.0
    last_loss: float | None = None
    dataset_id: str = ""
    base_model: str = ""
    config: dict = field(default_factory=dict)
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    attempt: int = 1
    worker: str | None = None
    queue_position: int | None = None
    priority: int = 0
    num_gpus: int = 1
    gpu_class: str | None = None
    min_gpu_memory_gb: float | None = None
    webhook_url: str | None = None  # GET /v1/jobs/{id} only
    images_per_s: float | None = None  # while running
    eta_s: float | None = None  # while running: seconds left at the pace of the last steps
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def family(self) -> str:
        """The model family the job trains ("sd", "sdxl"), as its validated config records it."""
        return self.config.get("family", "sd")


@dataclass
class Metric:
    step: int
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    epoch: int | None = None
    images_per_s: float | None = None
    time: str | None = None
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Artifact:
    name: str
    kind: str = ""
    size: int = 0
    sha256: str = ""
    step: int | None = None
    url: str = ""
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Model:
    name: str
    source: str = ""
    available: bool = False
    family: str | None = None  # "sd", "sdxl"; None when the server cannot read or support it
    kind: str | None = None  # folder, hub or single_file
    origin: str = ""  # demo, settings or added
    problem: str | None = None  # why a job cannot train on it
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Event:
    """One Server-Sent Event: `id` is the job's event sequence number, `type` e.g. state, step, done."""

    id: int
    type: str
    data: dict


@dataclass
class Page:
    items: list
    total: int
    limit: int
    offset: int


def as_dict(obj) -> Any:
    """JSON-ready form of a result (the server's own answer for Dataset/Job/...)."""
    if isinstance(obj, list):
        return [as_dict(o) for o in obj]
    if isinstance(obj, Page):
        return {"items": as_dict(obj.items), "total": obj.total, "limit": obj.limit, "offset": obj.offset}
    if isinstance(obj, Event):
        return {"id": obj.id, "type": obj.type, "data": obj.data}
    if dataclasses.is_dataclass(obj):
        return obj.raw or {k: v for k, v in dataclasses.asdict(obj).items() if k != "raw"}
    return obj


# --------------------------------------------------------------------------------------------
# Local datasets


def local_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix name, path) of a folder's files, sorted, hidden ones left out (as the server does)."""
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(hidden(p) for p in rel.parts):
            found.append((rel.as_posix(), path))
    return sorted(found)


# One definition of a dataset's content hash for the client and the server (fingerprint.py):
# `dataset_fingerprint(path)` is the `content_hash` the server records when the folder or zip is
# uploaded, whatever it then refuses.
server_content_hash = dataset_fingerprint


def _sha256_stream(fh) -> str:
    digest = hashlib.sha256()
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for name, path in local_files(folder):
            zf.write(path, name)
    return dest


# --------------------------------------------------------------------------------------------
# SSE


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    current: dict[str, str] = {}
    data_lines: list[str] = []
    for line in lines:
        if line == "":
            if data_lines:
                try:
                    data = json.loads("\n".join(data_lines))
                except ValueError:
                    data = {"text": "\n".join(data_lines)}
                yield Event(id=int(current.get("id") or 0), type=current.get("event", "message"), data=data)
            current, data_lines = {}, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            data_lines.append(value)
        else:
            current[key] = value


# --------------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in {"127.0.0.1", "localhost", "::1"}


def resolve(url: str | None = None, api_key: str | None = None) -> tuple[str, str | None]:
    """Explicit values, then LORAQ_URL / LORAQ_API_KEY, then the local default and ./var/admin-key."""
    url = (url or os.environ.get("LORAQ_URL") or DEFAULT_URL).rstrip("/")
    key = api_key or os.environ.get("LORAQ_API_KEY") or None
    if key is None and _is_local(url) and LOCAL_KEY_FILE.is_file():
        key = LOCAL_KEY_FILE.read_text().strip() or None
    return url, key


# A job's placement and notification fields (POST /v1/jobs; README "Fleets, routing and priorities",
# "Webhooks"): sent only when given, so a body without them stays the one older servers accept.
JOB_FIELDS = ("priority", "num_gpus", "gpu_class", "min_gpu_memory_gb", "webhook_url")


def _job_body(dataset_id: str, base_model: str, options: dict | None, name: str | None,
              **fields: Any) -> dict[str, Any]:
    unknown = set(fields) - set(JOB_FIELDS)
    if unknown:
        raise TypeError(f"unknown job field(s) {', '.join(sorted(unknown))}; known: {', '.join(JOB_FIELDS)}")
    body: dict[str, Any] = {"dataset_id": dataset_id, "base_model": base_model, "options": options or {}}
    if name is not None:
        body["name"] = name
    body.update({key: value for key, value in fields.items() if value is not None})
    return body


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, reconnect_delay: float = 1.0,
                 max_reconnects: int = 30):
        self.url, self.api_key = resolve(url, api_key)
        headers = {"User-Agent": "loraq-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.reconnect_delay = reconnect_delay
        self.max_reconnects = max_reconnects
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            response.read()
            body = response.json()
            message = body["error"]["message"]
        except Exception:  # not the service's error shape
            message = (response.text or response.reason_phrase or "").strip()[:500]
        raise LoraqError(response.status_code, message or f"HTTP {response.status_code}")

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise LoraqError(0, f"cannot reach {self.url}: {exc}") from exc
        self._raise_for(response)
        return response

    # -- datasets ---------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str | None = None,
                       progress: Callable[[int, int], None] | None = None, dedupe: bool = True) -> Dataset:
        """Upload a folder (zipped into a temporary file first) or a zip, streamed from disk.

        When you already have a dataset with the same files (names and bytes), the server answers
        with it (`reused` is True, and `name` is not applied) and stores nothing; `dedupe=False`
        stores a new copy anyway."""
        path = Path(path)
        if not path.exists():
            raise LoraqError(0, f"{path}: no such file or folder")
        # The content hash tells the server, before it reads the body, that this may be a dataset
        # it holds already (an owner at the storage limit can still be answered with it).
        content = dataset_fingerprint(path) if dedupe else None
        if path.is_dir():
            with tempfile.TemporaryDirectory(prefix="loraq-upload-") as tmp:
                archive = zip_folder(path, Path(tmp) / f"{path.resolve().name or 'dataset'}.zip")
                # A default name from the folder fits the server's 200-character limit.
                return self._upload_file(archive, name or path.resolve().name[:200], progress, dedupe, content)
        return self._upload_file(path, name, progress, dedupe, content)

    def _upload_file(self, path: Path, name: str | None, progress, dedupe: bool = True,
                     content: str | None = None) -> Dataset:
        boundary = uuid.uuid4().hex
        head = b""
        if name:
            head += (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode()
                     + name.encode() + b"\r\n")
        filename = path.name.replace('"', "_")
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                 f"Content-Type: application/zip\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = path.stat().st_size
        total = len(head) + size + len(tail)

        def body() -> Iterator[bytes]:
            sent = 0
            for part in (head,):
                sent += len(part)
                yield part
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    sent += len(chunk)
                    if progress:
                        progress(sent, total)
                    yield chunk
            yield tail
            if progress:
                progress(total, total)

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(total)}
        if content:
            headers["X-Loraq-Content-Hash"] = content
        response = self._request("POST", "/v1/datasets", content=body(), headers=headers,
                                 params=None if dedupe else {"dedupe": "false"},
                                 timeout=httpx.Timeout(self.http.timeout.connect, read=600, write=600, pool=None))
        return _build(Dataset, response.json())

    def datasets(self, limit: int = 50, offset: int = 0, content_hash: str | None = None) -> Page:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if content_hash:
            params["content_hash"] = content_hash
        data = self._request("GET", "/v1/datasets", params=params).json()
        return Page([_build(Dataset, d) for d in data["items"]], data["total"], data["limit"], data["offset"])

    def all_datasets(self, content_hash: str | None = None) -> Iterator[Dataset]:
        offset = 0
        while True:
            page = self.datasets(limit=200, offset=offset, content_hash=content_hash)
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def dataset(self, dataset_id: str) -> Dataset:
        return _build(Dataset, self._request("GET", f"/v1/datasets/{quote(dataset_id, safe='')}").json())

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{quote(dataset_id, safe='')}")

    def models(self) -> list[Model]:
        return [_build(Model, m) for m in self._request("GET", "/v1/models").json()]

    def add_model(self, source: str, name: str | None = None, config: str | None = None) -> Model:
        """Admins: register a server-side folder, single-file checkpoint or cached hub id."""
        body = {k: v for k, v in {"source": source, "name": name, "config": config}.items() if v is not None}
        return _build(Model, self._request("POST", "/v1/models", json=body).json())

    def remove_model(self, name: str) -> None:
        self._request("DELETE", f"/v1/models/{name}")

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, dataset_id: str, base_model: str, options: dict | None = None, name: str | None = None,
                   idempotency_key: str | None = None, *, priority: int | None = None, num_gpus: int | None = None,
                   gpu_class: str | None = None, min_gpu_memory_gb: float | None = None,
                   webhook_url: str | None = None) -> Job:
        """Queue a job. `priority` (higher first; above the server's LORAQ_MAX_JOB_PRIORITY only with
        an admin key), `num_gpus` (training processes on one worker), `gpu_class` (only workers of
        that class), `min_gpu_memory_gb` (only workers with that much per GPU), `webhook_url`
        (POSTed each state change): left out of the request when None (the server's defaults)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = _job_body(dataset_id, base_model, options, name, priority=priority, num_gpus=num_gpus,
                         gpu_class=gpu_class, min_gpu_memory_gb=min_gpu_memory_gb, webhook_url=webhook_url)
        return _build(Job, self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def validate_job(self, dataset_id: str, base_model: str, options: dict | None = None,
                     name: str | None = None, *, priority: int | None = None, num_gpus: int | None = None,
                     gpu_class: str | None = None, min_gpu_memory_gb: float | None = None,
                     webhook_url: str | None = None) -> dict:
        """What create_job would train ({"total_steps", "config"}), or the LoraqError it would
        raise; nothing is queued."""
        body = _job_body(dataset_id, base_model, options, name, priority=priority, num_gpus=num_gpus,
                         gpu_class=gpu_class, min_gpu_memory_gb=min_gpu_memory_gb, webhook_url=webhook_url)
        return self._request("POST", "/v1/jobs/validate", json=body).json()

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0, dataset_id: str | None = None) -> Page:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if dataset_id:
            params["dataset_id"] = dataset_id
        data = self._request("GET", "/v1/jobs", params=params).json()
        return Page([_build(Job, j) for j in data["items"]], data["total"], data["limit"], data["offset"])

    def all_jobs(self, dataset_id: str | None = None) -> Iterator[Job]:
        offset = 0
        while True:
            page = self.jobs(limit=200, offset=offset, dataset_id=dataset_id)
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def whoami(self) -> dict:
        """{"owner", "admin", "key_id"} of the key this client sends."""
        return self._request("GET", "/v1/whoami").json()

    def _job_path(self, job_id: str) -> str:
        return f"/v1/jobs/{quote(job_id, safe='')}"

    def job(self, job_id: str) -> Job:
        return _build(Job, self._request("GET", self._job_path(job_id)).json())

    def cancel(self, job_id: str) -> Job:
        return _build(Job, self._request("POST", self._job_path(job_id) + "/cancel").json())

    def retry(self, job_id: str) -> Job:
        return _build(Job, self._request("POST", self._job_path(job_id) + "/retry").json())

    def checkpoint_now(self, job_id: str) -> dict:
        """Ask a running job for a checkpoint at its next step (202; 409 unless running)."""
        return self._request("POST", self._job_path(job_id) + "/checkpoint").json()

    def sample_now(self, job_id: str) -> dict:
        """Ask a running job for validation images at its next step (202; 409 unless running
        with a validation_prompt)."""
        return self._request("POST", self._job_path(job_id) + "/sample").json()

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", self._job_path(job_id))

    def metrics(self, job_id: str) -> list[Metric]:
        return [_build(Metric, m) for m in self._request("GET", self._job_path(job_id) + "/metrics").json()]

    def artifacts(self, job_id: str) -> list[Artifact]:
        return [_build(Artifact, a) for a in self._request("GET", self._job_path(job_id) + "/artifacts").json()]

    # -- events -----------------------------------------------------------------------------

    def events(self, job_id: str, after: int | None = None, follow: bool = True,
               idle_timeout: float = 2.0) -> Iterator[Event]:
        """The job's events after `after`, live. Ends when the server closes the stream after a final
        state; a dropped connection is resumed with Last-Event-ID (no gap, no repeat).

        follow=False: only the events stored so far (stops after `idle_timeout` s without one).
        """
        last = after or 0
        failures = 0
        read_timeout = 60.0 if follow else idle_timeout  # the server sends a keep-alive every 15 s
        timeout = httpx.Timeout(self.http.timeout.connect or 10.0, read=read_timeout, write=30.0, pool=None)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.http.stream("GET", self._job_path(job_id) + "/events", headers=headers,
                                      timeout=timeout) as response:
                    self._raise_for(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        last = max(last, event.id)
                        yield event
            except httpx.ReadTimeout:
                if not follow:
                    return
                failures += 1
            except httpx.TransportError:
                failures += 1
            else:
                # A clean close: the job is final (or gone). Make sure, in case a proxy cut it short.
                if not follow or self.job(job_id).final:
                    return
                failures += 1
            if failures > self.max_reconnects:
                raise LoraqError(0, f"lost the event stream of job {job_id} {failures} times; giving up")
            time.sleep(min(self.reconnect_delay * failures, 10.0))

    def wait(self, job_id: str, on_event: Callable[[Event], None] | None = None) -> Job:
        """Follow the job's events until it is final; return the final job."""
        for event in self.events(job_id):
            if on_event:
                on_event(event)
        return self.job(job_id)

    # -- artifacts --------------------------------------------------------------------------

    def download(self, job_id: str, name: str = LORA_WEIGHTS, dest: str | Path = ".") -> Path:
        """Download an artifact to `dest` (a folder, or a file path); resumes a `<file>.part` left by
        an interrupted download with a Range request, and checks the sha256 the artifact list gives."""
        listed = {a.name: a for a in self.artifacts(job_id)}
        if name not in listed:
            raise LoraqError(404, f"job {job_id} has no artifact {name!r} (it has: {', '.join(sorted(listed)) or 'none'})")
        artifact = listed[name]
        dest = Path(dest)
        target = dest / name.rsplit("/", 1)[-1] if dest.is_dir() or str(dest).endswith(("/", os.sep)) else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.stat().st_size == artifact.size and _sha256_file(target) == artifact.sha256:
            return target
        part = target.with_name(target.name + ".part")
        have = part.stat().st_size if part.is_file() else 0
        if have > artifact.size:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and have == artifact.size:
            headers = {}  # nothing left to fetch; verify below (a bad file is fetched whole)
        else:
            self._fetch(job_id, name, part, headers)
        if _sha256_file(part) != artifact.sha256:
            if headers or have:  # the kept bytes may be stale: once more from the start
                part.unlink()
                self._fetch(job_id, name, part, {})
            if _sha256_file(part) != artifact.sha256:
                part.unlink()
                raise LoraqError(0, f"{name}: sha256 mismatch after download")
        os.replace(part, target)
        return target

    def _fetch(self, job_id: str, name: str, part: Path, headers: dict) -> None:
        path = self._job_path(job_id) + "/artifacts/" + quote(name)
        timeout = httpx.Timeout(self.http.timeout.connect or 10.0, read=120.0, write=30.0, pool=None)
        try:
            with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code == 416:  # range past the end: start over
                    part.unlink(missing_ok=True)
                    return self._fetch(job_id, name, part, {})
                self._raise_for(response)
                mode = "ab" if response.status_code == 206 and headers else "wb"  # 200: Range ignored
                with open(part, mode) as fh:
                    for chunk in response.iter_bytes(CHUNK):
                        fh.write(chunk)
        except httpx.TransportError as exc:
            raise LoraqError(0, f"download of {name} interrupted ({exc}); run it again to resume") from exc


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return _sha256_stream(fh)
