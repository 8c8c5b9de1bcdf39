"""What every fault case checks once the fault is over: the job's final state and step count, its
artifacts byte for byte against their listed sha256, and that the service wrote nothing outside
its data directory."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from support.service import FINAL, ROOT

# Under a case's tmp_path, what is not the service's to write outside its data directory:
# the data directory itself, the service's stdout logs, the test's own files and the private
# Redis of test_restarts. TMPDIR (the service's temporary files) must be empty at the end.
DATA_DIR_NAME = "var"
OWN = {DATA_DIR_NAME, "scratch", "redis", "tmp"}


def wait_for_step(service, job_id: str, step: int, timeout: float = 120) -> dict:
    """Poll until the job has reached `step` (or ended); returns the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = service.client.get(f"/v1/jobs/{job_id}").json()
        if job["step"] >= step or job["state"] in FINAL:
            return job
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.05)


def metric_steps(service, job_id: str) -> list[int]:
    return [m["step"] for m in service.client.get(f"/v1/jobs/{job_id}/metrics").json()]


def assert_finished(job: dict, state: str, step: int, attempt: int | None = None, context: str = "") -> None:
    """The job's final state, step count (of `total_steps`) and, if given, attempt."""
    got = (job["state"], job["step"], job["attempt"] if attempt is not None else None)
    assert got == (state, step, attempt), f"{job}\n{context}"


def assert_artifacts(service, job_id: str, names: set[str]) -> dict[str, dict]:
    """The job lists exactly `names`, and each downloads with the size and sha256 it is listed with."""
    listed = service.client.get(f"/v1/jobs/{job_id}/artifacts")
    assert listed.status_code == 200, listed.text
    artifacts = {a["name"]: a for a in listed.json()}
    # TensorBoard files (worker/tensorboard.py) are named by time and host: checked below like the
    # rest, but not listed by the cases.
    listed_names = {name for name in artifacts if not name.startswith("tensorboard/")}
    assert listed_names == names, (sorted(listed_names), sorted(names))
    for name, artifact in artifacts.items():
        body = service.client.get(artifact["url"])
        assert body.status_code == 200, (name, body.text)
        assert len(body.content) == artifact["size"], name
        assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"], f"{name}: bytes differ from sha256"
    return artifacts


def final_loras() -> set[str]:
    from trainer.model import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME

    return {LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME}


def checkpoint_loras(*steps: int) -> set[str]:
    from trainer.model import LORA_WEIGHTS_NAME

    return {f"checkpoint-{step}/{LORA_WEIGHTS_NAME}" for step in steps}


def logs(*attempts: int) -> set[str]:
    return {f"logs/attempt-{attempt}.log" for attempt in attempts}


# --------------------------------------------------------------------------------------------
# Nothing written outside the data directory


def _listing(root: Path, skip=lambda path: False) -> dict[str, tuple]:
    """Every file and folder under `root`: relative path -> (kind, size, mtime) for files."""
    found = {}
    if not root.is_dir():
        return found
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not skip(Path(folder, d))]
        for name in dirs:
            found[os.path.relpath(Path(folder, name), root)] = ("dir",)
        for name in files:
            path = Path(folder, name)
            if skip(path):
                continue
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            found[os.path.relpath(path, root)] = ("file", info.st_size, info.st_mtime_ns)
    return found


class Footprint:
    """Snapshots of where a service with a misdirected path would write: the case's tmp_path
    beside the data directory, the service's TMPDIR, the repository's top level (the processes'
    working directory) and the service's folders under the repository's `var/` (the default data
    directory; the rest of `var/` belongs to other tools, such as the dashboard's screenshots)."""

    DEFAULT_DATA = ("jobs", "datasets", "uploads", "models", "loraq.db", "admin-key")

    def __init__(self, tmp_path: Path, temp: Path):
        self.tmp_path = tmp_path
        self.temp = temp
        self.before = self._take()

    def _skip(self, path: Path) -> bool:
        relative = path.relative_to(self.tmp_path)
        top = relative.parts[0]
        return top in OWN or top.startswith("logs-")

    def _take(self) -> dict:
        default = ROOT / "var"
        return {
            "tmp_path": _listing(self.tmp_path, self._skip),
            "the repository's top level": {name: ("entry",) for name in os.listdir(ROOT)},
            "the repository's var/": {
                **{name: ("entry",) for name in self.DEFAULT_DATA if (default / name).exists()},
                **{f"{name}/{key}": value for name in self.DEFAULT_DATA for key, value in _listing(default / name).items()},
            },
        }

    def assert_clean(self) -> None:
        after = self._take()
        for place, listing in self.before.items():
            added = sorted(set(after[place]) - set(listing))
            changed = sorted(k for k in set(after[place]) & set(listing) if after[place][k] != listing[k])
            assert not added and not changed, f"written outside the data directory, in {place}: {added + changed}"
        left = _listing(self.temp)
        assert not left, f"temporary files left behind in TMPDIR: {sorted(left)}"


def data_dir_listing(data_dir: Path) -> dict[str, tuple]:
    """The data directory's files and folders (the SQLite database aside, which changes in place)."""
    return _listing(data_dir, skip=lambda path: path.name.startswith("loraq.db"))
