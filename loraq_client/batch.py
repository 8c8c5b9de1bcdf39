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

Entries are `jobs` plus one per sub-folder of `each_subfolder` (or one plain entry when there are
neither), and every entry is crossed with the grid. Relative paths are relative to the YAML file.
The key of a job is the sha256 of the canonical JSON of (base_model, dataset identity, options,
name), where a local dataset's identity is the sha256 of its files' names and bytes; the server
answers a known key with the job it already has, so running a batch again submits only what is
missing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraq_client.client import Client, Job, _build, dataset_fingerprint, server_content_hash

KNOWN_KEYS = {"base_model", "dataset", "options", "grid", "jobs", "each_subfolder", "name"}
ENTRY_KEYS = {"base_model", "dataset", "options", "name"}
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


def _dataset_ref(value: Any, base: Path, cache: dict) -> DatasetRef:
    if value is None or value == "":
        raise BatchError("dataset: missing (a folder, a zip or a dataset id)")
    text = str(value)
    candidate = (base / text).expanduser()
    if candidate.exists():
        resolved = candidate.resolve()
        if resolved not in cache:
            cache[resolved] = DatasetRef(path=resolved, fingerprint=dataset_fingerprint(resolved))
        return cache[resolved]
    if "/" in text or text.endswith(".zip") or text.startswith("."):
        raise BatchError(f"dataset: {text}: no such folder or zip")
    return DatasetRef(id=text)


def idempotency_key(base_model: str, dataset: DatasetRef, options: dict, name: str | None) -> str:
    canonical = json.dumps({"base_model": base_model, "dataset": dataset.identity, "options": options,
                            "name": name}, sort_keys=True, separators=(",", ":"), default=str)
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
        for combo in itertools.product(*(grid[k] for k in grid_keys)):
            job_options = {**options, **dict(zip(grid_keys, combo))}
            suffix = "-".join(f"{k}={_format_value(v)}" for k, v in zip(grid_keys, combo))
            job_name = "-".join(filter(None, [str(name) if name is not None else None, suffix])) or None
            planned.append(PlannedJob(str(base_model), dataset, job_options, job_name,
                                      idempotency_key(str(base_model), dataset, job_options, job_name)))
    return planned


def resolve_datasets(client: Client, jobs: list[PlannedJob], progress=None) -> dict[Path, str]:
    """Dataset ids for the local datasets: one upload per distinct folder/zip in the batch, and none
    for a dataset the server already holds with the same content (so a rerun sends the same bodies)."""
    ids: dict[Path, str] = {}
    local = []
    for job in jobs:
        if job.dataset.path and job.dataset.path not in local:
            local.append(job.dataset.path)
    existing = None
    by_fingerprint: dict[str, str] = {}
    for path in local:
        ref = next(j.dataset for j in jobs if j.dataset.path == path)
        if ref.fingerprint in by_fingerprint:  # the same bytes under another path
            ids[path] = by_fingerprint[ref.fingerprint]
            continue
        if existing is None:
            existing = {}
            for dataset in client.all_datasets():
                existing.setdefault(dataset.content_hash, dataset.id)
        content = server_content_hash(path)
        dataset_id = existing.get(content)
        if dataset_id is None:
            dataset_id = client.upload_dataset(path, progress=progress).id
            existing[content] = dataset_id
        ids[path] = by_fingerprint[ref.fingerprint] = dataset_id
    return ids


def submit(client: Client, jobs: list[PlannedJob], progress=None) -> list[PlannedJob]:
    """Upload what is needed and submit each job with its key; sets job.job and job.created."""
    ids = resolve_datasets(client, jobs, progress)
    for planned in jobs:
        dataset_id = ids[planned.dataset.path] if planned.dataset.path else planned.dataset.id
        response = client._request(
            "POST", "/v1/jobs", headers={"Idempotency-Key": planned.key},
            json={"dataset_id": dataset_id, "base_model": planned.base_model, "options": planned.options,
                  **({"name": planned.name} if planned.name is not None else {})})
        planned.job = _build(Job, response.json())
        planned.created = response.status_code == 201
    return jobs
