"""Service benchmark: what the queue, API and worker add on top of the trainer.

Measures, in one run on one machine: submit-to-succeeded wall time against the trainer alone on
the same config; latency from the trainer emitting a step to an SSE client receiving it (p50,
p99); `GET /v1/jobs` requests per second with p99 latency at 50 concurrent clients; and the
latency of `GET /v1/jobs` while a job trains, with no event stream open and with many open.
Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench.trainer import replace_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "service"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return buffer.getvalue()


def trainer_alone(env: dict, model: Path, data: Path, out: Path, options: dict) -> tuple[float, float]:
    """Wall time of `python -m trainer train` on the same config (imports included), and the
    time from its `start` event to its `done` event (training only)."""
    command = [sys.executable, "-m", "trainer", "train", "--no-progress",
               "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
               "--output_dir", str(out)]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    times = {event["type"]: event["time"] for event in map(json.loads, result.stdout.splitlines())}
    return wall, times["done"] - times["start"]


def follow_events(client: httpx.Client, job_id: str, latencies: list[float]) -> None:
    """Read the job's SSE stream; for each step, now minus the trainer's own event time."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
                if "loss" in data and "time" in data:
                    latencies.append(time.time() - float(data["time"]))


async def load_jobs_list(url: str, headers: dict, clients: int, seconds: float) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        async def one_client():
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await client.get("/v1/jobs", params={"limit": 20})
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return round(len(latencies) / elapsed), latencies, errors


FIRST_EVENT_WAIT_S = 30.0


async def list_latency_beside_streams(url: str, headers: dict, job_id: str, streams: int, requests: int
                                      ) -> tuple[int, float | None, list[float]]:
    """With `streams` clients following the job's events: how many got their first event within
    FIRST_EVENT_WAIT_S, how long until all had (None: not all did), and the latencies of
    `requests` sequential `GET /v1/jobs` made after that (a request past 30 s counts as 30 s)."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        served = 0
        all_served = asyncio.Event()

        async def follow():
            nonlocal served
            try:
                async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    async for line in response.aiter_lines():
                        if line.startswith("id:"):
                            served += 1
                            if served == streams:
                                all_served.set()
                            break
                    async for _line in response.aiter_lines():  # stay open, as a watching page does
                        pass
            except (httpx.HTTPError, asyncio.CancelledError):
                pass

        started = time.perf_counter()
        tasks = [asyncio.create_task(follow()) for _ in range(streams)]
        if streams:
            try:
                await asyncio.wait_for(all_served.wait(), timeout=FIRST_EVENT_WAIT_S)
            except TimeoutError:
                pass
        to_all = time.perf_counter() - started if served == streams else None
        latencies = []
        for _ in range(requests):
            began = time.perf_counter()
            try:
                response = await client.get("/v1/jobs", params={"limit": 20}, timeout=30)
                response.raise_for_status()
                latencies.append(time.perf_counter() - began)
            except httpx.TimeoutException:
                latencies.append(30.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return served, to_all, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=100, help="open event streams beside GET /v1/jobs")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loraq-bench-"))
    data_dir = work / "var"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORAQ_DATA_DIR": str(data_dir),
           "LORAQ_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}"}
    env.pop("LORAQ_DATABASE_URL", None)
    from loraq.migrate import upgrade
    from loraq.settings import Settings

    settings = Settings(data_dir=data_dir)
    upgrade(settings)
    subprocess.run([sys.executable, "-m", "trainer", "tiny-model", str(settings.demo_model_dir)], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = work / "images"
    subprocess.run([sys.executable, "-m", "trainer", "sample-data", str(images), "--count", "8", "--size", "32"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    options = {"resolution": 32, "train_batch_size": 2, "max_train_steps": args.steps, "seed": 0,
               "checkpointing_steps": 10_000}

    alone, alone_training = trainer_alone(env, settings.demo_model_dir, images, work / "alone", options)

    port = free_port()
    logs = open(work / "service.log", "wb")
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--port",
                            str(port), "--log-level", "warning"], env=env, cwd=ROOT, stdout=logs, stderr=logs)
    worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=ROOT, stdout=logs, stderr=logs)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60)
    try:
        for _ in range(300):
            try:
                if client.get("/healthz").json().get("workers", 0) >= 1:
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.3)
        client.headers["Authorization"] = f"Bearer {(data_dir / 'admin-key').read_text().strip()}"
        dataset = client.post("/v1/datasets", files={"files": ("d.zip", make_zip(images), "application/zip")}).json()
        latencies: list[float] = []
        started = time.perf_counter()
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "base_model": "tiny-sd",
                                            "options": options}).json()
        reader = threading.Thread(target=follow_events, args=(client, job["id"], latencies))
        reader.start()
        while client.get(f"/v1/jobs/{job['id']}").json()["state"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.05)
        service_wall = time.perf_counter() - started
        reader.join(timeout=30)
        state = client.get(f"/v1/jobs/{job['id']}").json()["state"]
        rps, list_latencies, errors = asyncio.run(load_jobs_list(url, dict(client.headers), args.clients, args.seconds))

        long_job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "base_model": "tiny-sd",
                                                 "options": {**options, "max_train_steps": 100_000}}).json()
        while client.get(f"/v1/jobs/{long_job['id']}").json()["state"] != "running":
            time.sleep(0.1)
        beside = {streams: asyncio.run(list_latency_beside_streams(url, dict(client.headers), long_job["id"],
                                                                    streams, 40))
                  for streams in (0, args.streams)}
        client.post(f"/v1/jobs/{long_job['id']}/cancel")
    finally:
        client.close()
        for process in (worker, api):
            process.terminate()
            process.wait(timeout=30)

    ms = [1000 * v for v in latencies]
    list_ms = [1000 * v for v in list_latencies]
    section = "\n".join([
        "## Service: queue, API and worker on top of the trainer",
        "",
        "- Command: `make bench`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), SQLite, local Redis,"
        " one warm worker, uvicorn with one process",
        f"- Workload: tiny-sd, 8 images of 32x32, resolution 32, batch 2, {args.steps} steps, no checkpoints;"
        f" job state: {state}",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| trainer alone (`python -m trainer train`, imports included), s | {alone:.2f} |",
        f"| submit to succeeded through the service (warm worker), s | {service_wall:.2f} |",
        f"| trainer alone, `start` to `done` event (no imports, no model load), s | {alone_training:.2f} |",
        f"| service / trainer alone (whole command) | {service_wall / alone:.2f}x |",
        f"| service overhead over training itself (`start` to `done`), s | {service_wall - alone_training:.2f} |",
        f"| step event latency, trainer line to SSE client, p50 ms ({len(ms)} events) | "
        f"{statistics.median(ms) if ms else float('nan'):.1f} |",
        f"| step event latency, p99 ms | {percentile(ms, 99) if ms else float('nan'):.1f} |",
        f"| `GET /v1/jobs` at {args.clients} concurrent clients, requests/s | {rps} |",
        f"| `GET /v1/jobs` latency p50 / p99, ms | {statistics.median(list_ms):.1f} / {percentile(list_ms, 99):.1f} |",
        f"| `GET /v1/jobs` non-200 responses | {errors} |",
        f"| event streams opened on a training job / given their first event within {FIRST_EVENT_WAIT_S:.0f} s | "
        f"{args.streams} / {beside[args.streams][0]} |",
        f"| time until every stream had its first event, s | "
        f"{'not within %.0f s' % FIRST_EVENT_WAIT_S if beside[args.streams][1] is None else '%.2f' % beside[args.streams][1]} |",
        *[f"| `GET /v1/jobs` one at a time while a job trains, {n} event streams open: p50 / p99, ms | "
          f"{statistics.median(v[2]) * 1000:.1f} / {percentile(v[2], 99) * 1000:.1f} |" for n, v in beside.items()],
        f"| `GET /v1/jobs` p50, {args.streams} streams open / none | "
        f"{statistics.median(beside[args.streams][2]) / statistics.median(beside[0][2]):.2f}x |",
        "",
        "The service's worker has torch and diffusers imported before the job arrives (it forks a",
        "warm child), so it beats the cold command; the overhead line is what queueing, the claim,",
        "model loading in the child, event recording and polling add. The load generator runs on the",
        "same 2 cores as the server, so requests/s is a floor.",
    ])
    replace_section(Path(args.output), SECTION, section)
    print(section)
    return 0 if state == "succeeded" and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
