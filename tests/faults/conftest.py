"""Faults suite fixtures.

Every case runs real processes (uvicorn, `python -m worker`, Redis, the database) and ends with
the same checks (faults/checks.py). Which cases run on both databases: the ones whose outcome
hangs on the database's locking and transactions (worker SIGKILL and the lease reaper, the API
restart, 20 concurrent submissions with one Idempotency-Key); the others run on one, to keep the
suite under its 5 minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults.checks import Footprint


@pytest.fixture(autouse=True)
def footprint(tmp_path, monkeypatch) -> Footprint:
    """Snapshots, taken before the service starts, of where it must not write; the service's
    temporary files go to `tmp_path/tmp` (checked empty at the end)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    (tmp_path / "scratch").mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the service's processes inherit it
    return Footprint(tmp_path, temp)


@pytest.fixture
def scratch(tmp_path) -> Path:
    """The test's own files (datasets it uploads, FIFOs): not the service's writes."""
    return tmp_path / "scratch"


@dataclass
class SmallDisk:
    """A tmpfs of `size` mounted over `mountpoint` in a private mount namespace, which a holder
    process keeps alive. Processes started through `python` (a launcher script) run in that
    namespace and see the small disk; everything else sees the empty folder underneath."""

    holder: subprocess.Popen
    mountpoint: Path
    python: Path

    def view(self, path: Path) -> Path:
        """`path` as the namespace sees it, readable from outside through /proc/<holder>/root."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).resolve().relative_to("/")

    def free_bytes(self) -> int:
        stats = os.statvfs(self.view(self.mountpoint))
        return stats.f_bfree * stats.f_frsize


@pytest.fixture
def small_disk(scratch):
    """small_disk(mountpoint, size) -> SmallDisk; start_service_on(settings, disk)
    starts the service's processes inside its namespace."""
    holders: list[subprocess.Popen] = []

    def make(mountpoint: Path, size: str) -> SmallDisk:
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
            pytest.skip("needs root, unshare and nsenter for a private tmpfs")
        mountpoint.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o "size=$1,mode=0755" loraq-small-disk "$0" && echo mounted && exec sleep 3600',
             str(mountpoint), size],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        holders.append(holder)
        line = holder.stdout.readline().strip()
        assert line == "mounted", f"could not mount a tmpfs in a private namespace: {line}"
        python = scratch / f"python-in-namespace-{holder.pid}"
        python.write_text(f'#!/bin/sh\nexec nsenter --target {holder.pid} --mount --wd="$PWD" -- {sys.executable} "$@"\n')
        python.chmod(0o755)
        return SmallDisk(holder, mountpoint, python)

    yield make
    for holder in holders:  # the namespace ends with the last process in it
        holder.kill()
        holder.wait()


@pytest.fixture
def start_service_on(start_service):
    """start_service_on(settings, disk): the API and worker started inside the disk's namespace."""

    def start(settings, disk: SmallDisk):
        return start_service(settings, python=str(disk.python))

    return start
