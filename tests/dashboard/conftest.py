"""Browser tests of the dashboard: Debian's Chromium driven by playwright-core from Node scripts
(`<scenario>.mjs <url> <key> <screenshot-dir> <json-args>`), against the real API and worker.

Each scenario prints one JSON line (what it saw, every console error, its screenshots) and exits
non-zero on failure. Screenshots of every page, at a laptop and a phone size, go to
var/screenshots/<test name>/. They run on SQLite only: they test the pages, and the service is
tested on both databases elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.service import ROOT

HERE = Path(__file__).resolve().parent
SCREENSHOTS = ROOT / "var" / "screenshots"
CHROMIUM = Path(os.environ.get("LORAQ_CHROMIUM", "/usr/bin/chromium"))
SCENARIO_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def backend() -> str:
    return "sqlite"


@pytest.fixture(scope="session")
def browser_ready() -> None:
    """Node, playwright-core (npm ci) and Chromium (apt) are installed by `make test`."""
    problems = []
    if shutil.which("node") is None:
        problems.append("node is not installed")
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        problems.append("node_modules/playwright-core is missing: run `npm ci` (make setup does)")
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make test does)")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def screenshots(request) -> Path:
    folder = SCREENSHOTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def api_key(service) -> str:
    """The first admin key, which the server wrote on its first start: what a person pastes."""
    assert service.api_key and service.api_key.startswith("lq_")
    return service.api_key


@pytest.fixture
def browse(service, api_key, browser_ready, screenshots):
    """browse("scenario.mjs", **args) -> the scenario's JSON result; fails with its error, the
    console errors it recorded, and the service's logs."""

    def run(script: str, **args) -> dict:
        command = ["node", str(HERE / script), service.url, api_key, str(screenshots), json.dumps(args)]
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
        lines = process.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        report = (f"{script} exited {process.returncode}\nerror: {result.get('error')}\n"
                  f"steps: {result.get('steps')}\nconsole errors: {result.get('console_errors')}\n"
                  f"stderr: {process.stderr[-3000:]}\nscreenshots: {screenshots}\n{service.tail()}")
        assert process.returncode == 0 and result.get("ok"), report
        assert result["console_errors"] == [], report
        return result

    return run
