"""Batch files: many jobs from one YAML, each with a content-derived Idempotency-Key.

    base_model: tiny-sd
    dataset: ./photos            # a folder, a zip, or a dataset id on the server
    name: pets                   # optional: the jobs' name (grid values are appended)
    options: {resolution: 512, max_train_steps: 1000}
    grid:                        # the cartesian product: one job per combination
      learning_rate: [1.0e-4, 5.0e-4]
      rank: [4, 16]
    jobs:                        # explicit entries, each merged over the defaults above
      - {name: long, options: {max_train_steps: 3000}}
    each_subfolder: ./people     # one job per sub-folder, named after it, trained on it
    priority: 10                 # optional job fields, here or per entry: priority, num_gpus,
    gpu_class: a100-80gb         # gpu_class, min_gpu_memory_gb, webhook_url (as POST /v1/jobs)

Entries are `jobs` plus one per sub-folder of `each_subfolder` (or one plain entry when there are
neither), and every entry is crossed with the grid. Relative paths are relative to the YAML file.
The key of a job is the sha256 of the canonical JSON of (base_model, dataset identity, options,
name, and the job fields when any is set: a batch without them keeps its earlier keys), where a local dataset's identity is the sha256 of its files' names and bytes; the server
answers a known key with the job it already has, so running a batch again submits only what is
missing. A local dataset is uploaded only when none of the owner's datasets has its content hash;
when several do, the jobs go to the one this batch's earlier jobs used (else the oldest), so a
rerun sends exactly the bodies it sent before, whatever else was uploaded meanwhile.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraq_client.client import JOB_FIELDS, Client, Dataset, Job, LoraqError, _build, _job_body
from loraq_client.client import local_files
from loraq_client.fingerprint import dataset_fingerprint, hidden, legacy_content_hash

KNOWN_KEYS = {"base_model", "dataset", "options", "grid", "jobs", "each_subfolder", "name", *JOB_FIELDS}
ENTRY_KEYS = {"base_model", "dataset", "options", "name", *JOB_FIELDS}
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class BatchError(ValueError):
    """A batch file that cannot be planned (bad key, missing dataset, ...)."""


def yaml_scalar(text: str) -> Any:
    """A value as YAML reads it, with `1e-4` (a string to YAML 1.1) read as the float it means."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    return normalize(value)


def normalize(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {str(k): normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


@dataclass
class DatasetRef:
    """A local folder/zip (path set) or a server dataset id (id set)."""

    path: Path | None = None
    id: str | None = None
    fingerprint: str | None = None

    @property
    def identity(self) -> dict:
        return {"local_sha256": self.fingerprint} if self.path else {"id": self.id}

    def label(self) -> str:
        return str(self.path) if self.path else str(self.id)


@dataclass
class PlannedJob:
    base_model: str
    dataset: DatasetRef
    options: dict
    name: str | None
    key: str = ""
    job: Job | None = None
    created: bool | None = None
    extra: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)  # JOB_FIELDS given (priority, gpu_class, ...)


def _dataset_ref(value: Any, base: Path, cache: dict) -> DatasetRef:
    if value is None or value == "":
        raise BatchError("dataset: missing (a folder, a zip or a dataset id)")
    text = str(value)
    candidate = (base / text).expanduser()
    if candidate.exists():
        resolved = candidate.resolve()
        if resolved not in cache:
            cache[resolved] = DatasetRef(path=resolved, fingerprint=key_fingerprint(resolved))
        return cache[resolved]
    if "/" in text or text.endswith(".zip") or text.startswith("."):
        raise BatchError(f"dataset: {text}: no such folder or zip")
    return DatasetRef(id=text)


def key_fingerprint(path: Path) -> str:
    """A local dataset's identity in its jobs' keys: sha256 over its files' names (as the folder or
    zip holds them) and bytes. Kept exactly as earlier versions computed it, so a batch rerun
    after an upgrade finds its jobs under the same keys; which dataset on the server holds these
    files is found by the content hash (fingerprint.py), not by this."""
    digest = hashlib.sha256()
    for name, opener in _key_members(path):
        digest.update(name.encode() + b"\0")
        with opener() as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _key_members(path: Path):
    if path.is_dir():
        for name, file in local_files(path):
            yield name, (lambda file=file: open(file, "rb"))
        return
    with zipfile.ZipFile(path) as zf:
        infos = sorted((i for i in zf.infolist() if not i.is_dir()
                        and not any(hidden(p) for p in i.filename.split("/") if p)), key=lambda i: i.filename)
        for info in infos:
            yield info.filename, (lambda info=info: zf.open(info))


def idempotency_key(base_model: str, dataset: DatasetRef, options: dict, name: str | None,
                    fields: dict | None = None) -> str:
    values = {"base_model": base_model, "dataset": dataset.identity, "options": options, "name": name}
    if fields:  # only when set: the keys of batches written before these fields existed stay the same
        values["fields"] = fields
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return "loraq-batch-" + hashlib.sha256(canonical.encode()).hexdigest()


def _format_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def plan(source: str | Path | dict, base: str | Path | None = None) -> list[PlannedJob]:
    """The jobs a batch file (a path, or its parsed mapping) describes, in a stable order."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise BatchError(f"{path}: {exc}") from exc
        base = Path(base) if base else path.resolve().parent
    else:
        spec, base = source, Path(base or ".")
    if not isinstance(spec, dict):
        raise BatchError("a batch file is a mapping (base_model, dataset, options, grid, jobs, each_subfolder)")
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise BatchError(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KNOWN_KEYS))}")
    defaults_options = normalize(spec.get("options") or {})
    if not isinstance(defaults_options, dict):
        raise BatchError("options: expected a mapping of trainer options")
    grid = normalize(spec.get("grid") or {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise BatchError("grid: expected a mapping of option -> non-empty list of values")

    entries: list[dict] = []
    for i, entry in enumerate(spec.get("jobs") or []):
        if not isinstance(entry, dict) or set(entry) - ENTRY_KEYS:
            raise BatchError(f"jobs[{i}]: expected a mapping with {', '.join(sorted(ENTRY_KEYS))}")
        entries.append(entry)
    if spec.get("each_subfolder"):
        parent = (base / str(spec["each_subfolder"])).expanduser()
        if not parent.is_dir():
            raise BatchError(f"each_subfolder: {spec['each_subfolder']}: not a folder")
        for sub in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries.append({"name": sub.name, "dataset": str(sub.resolve())})
    if not entries:
        entries = [{}]

    cache: dict = {}
    planned = []
    grid_keys = list(grid)
    for entry in entries:
        base_model = entry.get("base_model", spec.get("base_model"))
        if not base_model:
            raise BatchError("base_model: missing")
        dataset = _dataset_ref(entry.get("dataset", spec.get("dataset")), base, cache)
        options = {**defaults_options, **normalize(entry.get("options") or {})}
        name = entry.get("name", spec.get("name"))
        fields = _job_fields(entry, spec)
        for combo in itertools.product(*(grid[k] for k in grid_keys)):
            job_options = {**options, **dict(zip(grid_keys, combo))}
            suffix = "-".join(f"{k}={_format_value(v)}" for k, v in zip(grid_keys, combo))
            job_name = "-".join(filter(None, [str(name) if name is not None else None, suffix])) or None
            planned.append(PlannedJob(str(base_model), dataset, job_options, job_name,
                                      idempotency_key(str(base_model), dataset, job_options, job_name, fields),
                                      fields=fields))
    return planned


_FIELD_TYPES = {"priority": (int,), "num_gpus": (int,), "gpu_class": (str,), "min_gpu_memory_gb": (int, float),
                "webhook_url": (str,)}


def _job_fields(entry: dict, spec: dict) -> dict:
    """An entry's job fields (JOB_FIELDS), each from the entry or else the top level; null or
    absent: left to the server's default. Types are checked here (a clear error before any
    upload); ranges are the server's to judge (its 422 names the field)."""
    fields = {}
    for key in JOB_FIELDS:
        value = normalize(entry[key] if key in entry else spec.get(key))
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[key]):
            expected = " or ".join(t.__name__ for t in _FIELD_TYPES[key])
            raise BatchError(f"{key}: expected {expected}, got {value!r}")
        fields[key] = value
    return fields


def resolve_datasets(client: Client, jobs: list[PlannedJob], progress=None) -> dict[Path, list[str]]:
    """For each local folder/zip of the batch, the ids of the owner's datasets with its content,
    the one to submit to first: one upload per distinct content, and none when the server already
    holds it.

    Several datasets can hold the same content (an upload with ?dedupe=false, or one from before
    the server reused identical uploads). A job's key is derived from the content, but its body
    names one dataset id, so a rerun must name the same one as before: first the dataset this
    batch's earlier jobs used (found in each candidate's job list), else the oldest. The rest stay
    as fallbacks for `submit`, which tries them when a key turns out to have been used with another.
    """
    ids: dict[Path, list[str]] = {}
    by_content: dict[str, list[str]] = {}
    owner = None
    for job in jobs:
        path = job.dataset.path
        if path is None or path in ids:
            continue
        content = dataset_fingerprint(path)
        if content not in by_content:
            if owner is None:
                owner = client.whoami()["owner"]
            found = _own_datasets(client, owner, [content, legacy_content_hash(path)])
            if found:
                used = _earlier_use(client, found, [j for j in jobs if j.dataset.path == path])
                by_content[content] = sorted(found, key=lambda d: (-used[d.id], d.created_at, d.id))
            else:
                by_content[content] = [client.upload_dataset(path, progress=progress)]
        ids[path] = [d.id for d in by_content[content]]
    return ids


def _own_datasets(client: Client, owner: str, hashes: list[str]) -> list[Dataset]:
    """The owner's datasets with any of these content hashes (an admin sees everyone's: only
    the admin's own are candidates, as for the server's reuse)."""
    found: dict[str, Dataset] = {}
    for content in dict.fromkeys(hashes):
        for dataset in client.all_datasets(content_hash=content):
            if dataset.owner in (owner, ""):  # "" : a server that does not say (older)
                found[dataset.id] = dataset
    return list(found.values())


def _earlier_use(client: Client, datasets: list[Dataset], planned: list[PlannedJob]) -> dict[str, int]:
    """How many of these planned jobs each dataset already has (same base model, name and
    options): the dataset an earlier run of this batch submitted to."""
    wanted = [(p.base_model, p.name, p.options) for p in planned]
    counts = {}
    for dataset in datasets:
        counts[dataset.id] = sum(
            1 for job in client.all_jobs(dataset_id=dataset.id)
            if any(job.base_model == base and job.name == name and _options_match(options, job.config)
                   for base, name, options in wanted))
    return counts


def _options_match(options: dict, config: dict) -> bool:
    def same(a, b) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
        return a == b

    return all(key in config and same(value, config[key]) for key, value in options.items())


def _key_reused(error: LoraqError) -> bool:
    return error.status == 422 and "Idempotency-Key" in error.message and "different request" in error.message


def submit(client: Client, jobs: list[PlannedJob], progress=None) -> list[PlannedJob]:
    """Upload what is needed and submit each job with its key; sets job.job and job.created.

    A job whose key was already used with another dataset of the same content is replayed with
    that dataset (the server refuses a key with a different body, and creates nothing then)."""
    ids = resolve_datasets(client, jobs, progress)
    for planned in jobs:
        candidates = ids[planned.dataset.path] if planned.dataset.path else [planned.dataset.id]
        first_error = None
        for dataset_id in list(candidates):
            try:
                response = client._request(
                    "POST", "/v1/jobs", headers={"Idempotency-Key": planned.key},
                    json=_job_body(dataset_id, planned.base_model, planned.options, planned.name, **planned.fields))
            except LoraqError as error:
                if not _key_reused(error):
                    raise
                first_error = first_error or error
                continue
            if dataset_id != candidates[0]:  # an earlier run used this one: prefer it from now on
                candidates.remove(dataset_id)
                candidates.insert(0, dataset_id)
            planned.job = _build(Job, response.json())
            planned.created = response.status_code == 201
            break
        else:
            raise first_error
    return jobs
