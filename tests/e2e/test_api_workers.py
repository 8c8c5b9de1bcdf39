"""LORAQ_API_WORKERS: several uvicorn processes on one database make one first admin key between
them, and an event stream follows its job whichever process serves it and whichever process
changed the job (streams wake on Redis, not on process memory)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
from sqlalchemy import func, select

from loraq.db import make_engine
from loraq.models import ApiKey
from support.service import ROOT, dataset_zip, free_port, read_sse, service_env, stop

WORKERS = 3
STREAMS = 6


def test_several_api_processes_make_one_admin_key_and_all_serve_event_streams(settings, tmp_path):
    port = free_port()
    env = {**service_env(settings), "LORAQ_API_WORKERS": str(WORKERS)}
    command = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(WORKERS),  # as loraq.launcher passes LORAQ_API_WORKERS
               "--timeout-graceful-shutdown", "5"]
    log = tmp_path / "api.log"
    api = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # up once every process has started (each makes or finds the key on its start)
            try:
                if (httpx.get(f"{url}/livez", timeout=5).status_code == 200
                        and log.read_text().count("Application startup complete") == WORKERS):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and api.poll() is None, log.read_text()
            time.sleep(0.3)
        engine = make_engine(settings)
        try:
            with engine.connect() as conn:
                assert conn.scalar(select(func.count()).select_from(ApiKey)) == 1
        finally:
            engine.dispose()
        assert log.read_text().count("created the first admin API key") == 1
        key = (settings.data_dir / "admin-key").read_text().strip()
        client = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"})
        for _ in range(2 * WORKERS):  # the key works whichever process answers
            assert client.get("/v1/whoami").json()["admin"] is True

        dataset = client.post("/v1/datasets", files={"files": ("d.zip", dataset_zip(tmp_path), "application/zip")})
        assert dataset.status_code == 201, dataset.text
        job = client.post("/v1/jobs", json={"dataset_id": dataset.json()["id"], "base_model": "tiny-sd",
                                            "options": {"resolution": 32}}).json()
        seen: list[list[dict]] = [[] for _ in range(STREAMS)]

        def follow(n: int) -> None:  # each on its own connection, so the processes share them out
            with httpx.Client(base_url=url, headers=client.headers, timeout=60) as own:
                seen[n] = read_sse(own, f"/v1/jobs/{job['id']}/events", timeout=60)

        readers = [threading.Thread(target=follow, args=(n,)) for n in range(STREAMS)]
        for reader in readers:
            reader.start()
        time.sleep(1.5)  # every stream has sent the stored event and waits on Redis
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "canceled"
        for reader in readers:
            reader.join(timeout=60)
        for events in seen:  # every stream got the live event and ended with the job
            assert [e["data"]["state"] for e in events if e["event"] == "state"] == ["queued", "canceled"], events
        client.close()
    finally:
        stop(api)

