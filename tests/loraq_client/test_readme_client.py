"""The README's Python client example, run exactly as written against the real service."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r'^```python title="client-example"\n(.*?)^```', text, re.S | re.M)
    assert len(found) == 1, "README has one ```python title=\"client-example\"``` block"
    return found[0]


def test_readme_client_example_runs_as_written(service, loraq, dataset_folder, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    out = tmp_path / "out"
    out.mkdir()
    env = {**loraq.env, "LORAQ_EXAMPLE_DATA": str(dataset_folder), "LORAQ_EXAMPLE_OUT": str(out)}
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr + service.tail()
    assert sum(line.startswith("step ") for line in done.stdout.splitlines()) == 4
    job_id, state, path = done.stdout.splitlines()[-1].split()
    assert state == "succeeded" and Path(path) == out / "pytorch_lora_weights.safetensors" and Path(path).is_file()
    assert service.client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
