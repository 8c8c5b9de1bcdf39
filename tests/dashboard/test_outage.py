"""The dashboard while the database is away: a notice and retries, never an error page.

The service runs on a private PostgreSQL (tests/faults/stores.py) that this test stops and
starts; the browser scenario and the test meet through marker files.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from faults.stores import PrivatePostgres, wait_until
from support.service import ROOT, submit, upload

HERE = Path(__file__).resolve().parent
SCENARIO_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def postgres():
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def service(settings, postgres, start_service):
    """The API and a worker on a fresh, migrated database of the private server."""
    from loraq.migrate import upgrade

    moved = settings.model_copy(update={"database_url": postgres.create_database(f"loraq_ui_{uuid.uuid4().hex[:10]}")})
    upgrade(moved)
    return start_service(moved)


def test_database_outage_shows_a_retrying_notice(service, postgres, api_key, browser_ready, screenshots, tmp_path):
    # given a finished job on the jobs page
    job = submit(service, upload(service, tmp_path), max_train_steps=2)
    service.wait_for(job["id"], {"succeeded"})
    control = tmp_path / "control"
    control.mkdir()
    command = ["node", str(HERE / "outage_notice.mjs"), service.url, api_key, str(screenshots),
               json.dumps({"control": str(control), "job_id": job["id"]})]
    browser = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # when the database stops while the page is open, and starts again once the browser saw it
        wait_until(lambda: (control / "ready").exists() or browser.poll() is not None, 90, lambda: "no page")
        postgres.stop("immediate")
        (control / "stopped").touch()
        wait_until(lambda: (control / "seen").exists() or browser.poll() is not None, 60, lambda: "no notice")
        postgres.start()
        (control / "started").touch()
        out, err = browser.communicate(timeout=SCENARIO_TIMEOUT_S)
    finally:
        if browser.poll() is None:
            browser.kill()
        if not (control / "started").exists():
            postgres.start()
    lines = out.strip().splitlines()
    seen = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    report = f"error: {seen.get('error')}\nsteps: {seen.get('steps')}\nstderr: {err[-3000:]}\n{service.tail()}"
    assert browser.returncode == 0 and seen.get("ok"), report
    assert seen["console_errors"] == [], report

    # then the page showed the notice naming the store, kept its rows, and no error anywhere
    assert seen["notice"].startswith("Service unavailable, retrying"), seen["notice"]
    assert "the database is not answering" in seen["notice"], seen["notice"]
    assert seen["row_kept"] is True and seen["errors_shown"] == [] and seen["job_page_errors"] == []
    assert seen["notice_on_job_page"] is True
    # and everything came back by itself, in the same document (no reload)
    assert seen["same_document"] is True
    assert any("status of 503" in entry for entry in seen["allowed_console"]), seen["allowed_console"]
