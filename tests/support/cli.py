"""The real `loraq` command as a user runs it, against a running service (tests/support/service.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(service=None, **extra: str) -> dict[str, str]:
    """The environment of a `loraq` run against `service` (its URL and admin key), or none."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}
    env.pop("LORAQ_API_KEY", None)
    if service is not None:
        env["LORAQ_URL"] = service.url
        env["LORAQ_API_KEY"] = service.api_key
    return env


def loraq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraq_client.cli", *args]


def run_loraq(service, *args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(loraq_cmd(*args), env=cli_env(service), cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout)


# A 2x2 grid over `./data` on tiny-sd, one step a job: the batch file of the rerun tests (issue 10).
SWEEP_YAML = ("base_model: tiny-sd\ndataset: ./data\nname: sweep\n"
              "options: {resolution: 32, train_batch_size: 2, max_train_steps: 1, seed: 0, checkpointing_steps: 100000}\n"
              "grid:\n  learning_rate: [1.0e-4, 5.0e-4]\n  rank: [2, 4]\n")


def run_sweep(service, folder: Path) -> list[dict]:
    """Write SWEEP_YAML in `folder` (beside its data/) and run `loraq batch` on it; the jobs it printed."""
    (folder / "sweep.yaml").write_text(SWEEP_YAML)
    done = run_loraq(service, "batch", "sweep.yaml", "--json", cwd=folder)
    assert done.returncode == 0, done.stderr + service.tail()
    return json.loads(done.stdout)
