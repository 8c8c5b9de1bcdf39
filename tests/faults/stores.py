"""A PostgreSQL server of the test's own, which a test may stop (immediately, as a crash or a
failover would) and start again, beside the shared one that other tests use."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support.service import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.skip(f"needs PostgreSQL's {name} (Debian: apt install postgresql)")
    return found[-1]


class PrivatePostgres:
    """initdb into a temporary folder and pg_ctl on a free port; as the `postgres` user when run as
    root (the server refuses to run as root)."""

    def __init__(self):
        self.port = free_port()
        # Not under pytest's tmp_path, which the postgres user cannot enter.
        self.folder = Path(tempfile.mkdtemp(prefix="loraq-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._as = []
        self.running = False
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self._as, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout}\n{result.stderr}"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._run(_bin("pg_ctl"), "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", options)
        self.running = True

    def ensure_running(self) -> None:
        """Started again if a test that stopped it ended early."""
        if not self.running:
            self.start()

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: the server's processes quit at once, as in a crash (recovery on start)."""
        self.running = False
        self._run(_bin("pg_ctl"), "stop", "-w", "-D", str(self.data), "-m", mode)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("fast")
        except AssertionError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_until(check, timeout: float, message: str, interval: float = 0.05):
    """Poll `check()` until it returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, message()
        time.sleep(interval)
