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
import re
import shutil
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


# --------------------------------------------------------------------------------------------
# The API under load: many stored jobs, 50 connections, one API process (issue 11)

LOAD_ROUTES = [  # (label, path, authenticated)
    ("`GET /livez` (no authentication, does nothing: FastAPI's floor)", "/livez", False),
    ("`GET /v1/whoami` (authentication only)", "/v1/whoami", True),
    ("`GET /v1/jobs` (a page of 50)", "/v1/jobs?limit=50", True),
]
BENCH_OWNER = "bench"
PG_ADMIN_URL = os.environ.get("LORAQ_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RUNNING_ON_PAGE = 10  # running jobs among the newest 50, each with metrics, so the ETA path runs
METRICS_PER_RUNNING_JOB = 100


def job_config() -> dict:
    """A full validated trainer config, as every stored job carries one (a realistic row size)."""
    from api.services.jobs import SERVICE_FIELDS
    from trainer.config import load_config

    config = load_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "output_dir": "o",
                          "resolution": 512, "max_train_steps": 1000, "missing_captions": "empty"})
    return config.model_dump(mode="json", exclude=set(SERVICE_FIELDS))


class Database:
    """A fresh database for one backend: a SQLite file under `folder`, or a new PostgreSQL database
    (dropped by `drop`)."""

    def __init__(self, backend: str, folder: Path):
        self.backend, self.folder = backend, folder
        self.url: str | None = None
        self.name: str | None = None
        if backend == "postgresql":
            import psycopg

            self.name = f"loraq_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            self.url = f"{base}/{self.name}"

    def env(self) -> dict:
        return {"LORAQ_DATABASE_URL": self.url} if self.url else {}

    def drop(self) -> None:
        if self.name:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def postgres_available() -> str | None:
    """None when the benchmark's PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as error:  # noqa: BLE001 - any failure means: skip PostgreSQL, say why
        return f"PostgreSQL at {PG_ADMIN_URL} did not answer ({type(error).__name__})"


def seed_jobs(settings, count: int) -> str:
    """`count` stored jobs of BENCH_OWNER on one dataset, the newest RUNNING_ON_PAGE of them running
    with metrics, the rest queued (the worst case for queue positions); returns a key of BENCH_OWNER."""
    from datetime import timedelta

    from sqlalchemy import insert

    from loraq.auth import create_key
    from loraq.db import make_engine, make_session_factory
    from loraq.models import Dataset, Job, JobMetric, new_id

    engine = make_engine(settings)
    try:
        factory = make_session_factory(engine)
        with factory() as session:
            _, secret = create_key(session, BENCH_OWNER, name="bench")
            dataset = Dataset(id=new_id(), owner=BENCH_OWNER, name="bench", image_count=100, captioned_count=100,
                              total_bytes=1, content_hash="0" * 64, storage_path="bench", report={})
            session.add(dataset)
            session.commit()
            config = job_config()
            start = datetime.now(timezone.utc) - timedelta(days=1)
            rows, metrics = [], []
            for n in range(count):
                running = n >= count - RUNNING_ON_PAGE
                job_id = new_id()
                rows.append({"id": job_id, "owner": BENCH_OWNER, "name": f"job-{n}", "dataset_id": dataset.id,
                             "base_model": "tiny-sd", "config": config, "state": "running" if running else "queued",
                             "step": METRICS_PER_RUNNING_JOB if running else 0, "total_steps": 1000,
                             "last_loss": 0.1 if running else None, "queued_at": start + timedelta(seconds=n),
                             "started_at": start + timedelta(seconds=n) if running else None, "attempt": 1,
                             "attempt_base": 0, "worker": "bench" if running else None, "event_seq": 1,
                             "idempotency_key": f"seed-{n}", "request_hash": "0" * 64})
                if running:
                    metrics += [{"job_id": job_id, "step": s, "loss": 0.1, "lr": 1e-4, "grad_norm": 0.5,
                                 "epoch": 0, "images_per_s": 10.0, "time": start + timedelta(seconds=n + s / 10)}
                                for s in range(1, METRICS_PER_RUNNING_JOB + 1)]
            for chunk in range(0, len(rows), 2000):
                session.execute(insert(Job), rows[chunk:chunk + 2000])
            session.execute(insert(JobMetric), metrics)
            session.commit()
        if engine.dialect.name == "postgresql":  # as autovacuum would soon: statistics and visibility map
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                from sqlalchemy import text

                conn.execute(text("VACUUM ANALYZE"))
        return secret
    finally:
        engine.dispose()


def start_api(root: Path, env: dict, logs: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """uvicorn serving the API from `root` on a free port; returns once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(command, env={**env, "PYTHONPATH": str(root)}, cwd=root,
                               stdout=open(logs, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}; see {logs}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"the API did not answer within 60 s; see {logs}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, path: str, headers: dict, connections: int, seconds: float) -> dict:
    """wrk's requests/s, p50 and p99 (ms) and failed requests for one route."""
    command = ["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--timeout", "30s", "--latency", *[a for k, v in headers.items() for a in ("-H", f"{k}: {v}")],
               url + path]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    percent = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.M))
    if "50" not in percent or "Requests/sec" not in out:
        raise RuntimeError(f"unexpected wrk output for {path}:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": _ms(percent["50"]),
            "p99": _ms(percent["99"]), "errors": errors, "requests": requests}


def httpx_load(url: str, path: str, headers: dict, connections: int, seconds: float) -> dict:
    """The same measures with an asyncio httpx client (when wrk is not installed; it costs more CPU,
    so the figures are lower)."""
    latencies: list[float] = []
    errors = 0

    async def run() -> float:
        nonlocal errors
        stop_at = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
            async def one():
                nonlocal errors
                while time.perf_counter() < stop_at:
                    began = time.perf_counter()
                    try:
                        response = await client.get(path)
                        errors += response.status_code != 200
                    except httpx.HTTPError:
                        errors += 1
                    latencies.append(time.perf_counter() - began)

            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(connections)))
            return time.perf_counter() - began

    elapsed = asyncio.run(run())
    ms = [1000 * v for v in latencies] or [float("nan")]
    return {"rps": len(latencies) / elapsed, "p50": statistics.median(ms), "p99": percentile(ms, 99),
            "errors": errors, "requests": len(latencies)}


def load_generator() -> tuple[str, object]:
    return ("wrk", wrk) if shutil.which("wrk") else ("httpx (wrk is not installed: `apt-get install wrk`)",
                                                     httpx_load)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def routes_under_load(url: str, key: str, connections: int, seconds: float, rounds: int,
                      pid: int | None = None) -> dict[str, dict]:
    """Each route of LOAD_ROUTES loaded in turn, `rounds` times; each reported by its best round
    (another process's burst on a shared machine only ever slows a round down), with the server's
    CPU time per request in that round when `pid` is the one server process (a figure other
    processes on the machine disturb much less than requests/s)."""
    _, measure = load_generator()
    auth = {"Authorization": f"Bearer {key}"}
    for _, path, authenticated in LOAD_ROUTES:  # warm-up: imports, pools, caches
        response = httpx.get(url + path, headers=auth if authenticated else {}, timeout=60)
        response.raise_for_status()
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for _, path, authenticated in LOAD_ROUTES:
            cpu = cpu_seconds(pid) if pid else 0.0
            result = measure(url, path, auth if authenticated else {}, connections, seconds)
            if pid:
                result["cpu_ms"] = 1000 * (cpu_seconds(pid) - cpu) / max(1, result["requests"])
            result["errors_total"] = best.get(path, {}).get("errors_total", 0) + result["errors"]
            if path not in best or result["rps"] > best[path]["rps"]:
                best[path] = result
            else:
                best[path]["errors_total"] = result["errors_total"]
    return best


def small_dataset(url: str, key: str) -> str:
    """Upload two tiny captioned images; returns the dataset id."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for n, color in enumerate([(255, 0, 0), (0, 0, 255)]):
            image = io.BytesIO()
            Image.new("RGB", (32, 32), color).save(image, "PNG")
            zf.writestr(f"{n}.png", image.getvalue())
            zf.writestr(f"{n}.txt", f"a square of colour {n}")
    response = httpx.post(f"{url}/v1/datasets", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          files={"files": ("d.zip", buffer.getvalue(), "application/zip")})
    response.raise_for_status()
    return response.json()["id"]


def burst_submissions(url: str, key: str, settings, dataset_id: str, count: int, threads: int) -> dict:
    """`count` submissions, each with its own Idempotency-Key and each sent twice (as a client that
    retries after a lost answer would), from `threads` threads at once. Counts what the database
    holds afterwards: every key must have exactly one job, and both answers must name it."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from loraq.db import make_engine
    from loraq.models import Job

    run = uuid.uuid4().hex[:8]
    keys = [f"burst-{run}-{n}" for n in range(count)]
    work = [k for k in keys for _ in range(2)]
    local = threading.local()

    def submit(idempotency_key: str) -> tuple[str, int, str | None]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})
        body = {"dataset_id": dataset_id, "base_model": "tiny-sd", "name": idempotency_key,
                "options": {"resolution": 32, "max_train_steps": 10}}
        try:
            response = local.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": idempotency_key})
        except httpx.HTTPError as error:
            return idempotency_key, 0, repr(error)
        job_id = response.json().get("id") if response.status_code in (200, 201) else response.text[:300]
        return idempotency_key, response.status_code, job_id

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(submit, work))
    elapsed = time.perf_counter() - started
    answers: dict[str, set] = {}
    for idempotency_key, status, job_id in results:
        answers.setdefault(idempotency_key, set()).add(job_id if status in (200, 201) else f"status {status}")
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            stored = dict(conn.execute(select(Job.idempotency_key, func.count()).where(Job.idempotency_key.in_(keys))
                                       .group_by(Job.idempotency_key)).all())
            ids = dict(conn.execute(select(Job.idempotency_key, Job.id).where(Job.idempotency_key.in_(keys))).all())
    finally:
        engine.dispose()
    created = sum(status == 201 for _, status, _ in results)
    refused = sorted({status for _, status, _ in results if status not in (200, 201)})
    return {
        "refused_statuses": refused,
        "first_refusal": next((text for _, status, text in results if status not in (200, 201)), None),
        "submissions": count, "requests": len(work), "threads": threads, "seconds": elapsed,
        "rps": len(work) / elapsed,
        "created": created, "replayed": sum(status == 200 for _, status, _ in results),
        "failed": sum(status not in (200, 201) for _, status, _ in results),
        "stored": sum(stored.values()),
        "lost": sum(1 for k in keys if stored.get(k, 0) == 0),
        "twice": sum(1 for k in keys if stored.get(k, 0) > 1),
        "answers_disagree": sum(1 for k in keys if answers[k] != {ids.get(k)}),
        "job_ids": list(ids.values()),  # for the caller's clean-up; not a figure
    }


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (uvicorn's workers), from /proc."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for each in pids:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return total


def big_zip(path: Path, size: int) -> tuple[int, int]:
    """A stored (uncompressed) zip of distinct-named noise JPEGs (1024x768, about 0.9 MB each, as
    photos are) adding up to `size` bytes; returns (bytes, images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    count = written = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        while written < size:
            data = images[count % len(images)]
            zf.writestr(f"img-{count:05d}.jpg", data)
            zf.writestr(f"img-{count:05d}.txt", f"photo {count}")
            written += len(data)
            count += 1
    return path.stat().st_size, count


def upload_memory(url: str, key: str, pid: int, archive: Path) -> dict:
    """Upload `archive` as a dataset while sampling the API's resident memory every 10 ms."""
    peak = baseline = rss_bytes(pid)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    size = archive.stat().st_size

    def chunks():
        with open(archive, "rb") as handle:
            while block := handle.read(1 << 20):
                yield block

    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        yield from chunks()
        yield tail

    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/datasets", content=body(), timeout=1800,
                              headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": f"multipart/form-data; boundary={boundary}",
                                       "Content-Length": str(len(head) + size + len(tail))})
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
    images = response.json().get("image_count") if response.status_code == 201 else None
    return {"bytes": size, "status": response.status_code, "seconds": elapsed, "images": images,
            "baseline": baseline, "peak": peak, "growth": peak - baseline}


def api_load(backend: str, args: argparse.Namespace, work: Path, root: Path, upload_bytes: int) -> dict:
    """Seed `args.jobs` jobs on a fresh database of `backend`, start one API process on it (code
    from `root`), and measure: the three routes under load, a burst of submissions and, when
    `upload_bytes`, a dataset upload of that size beside the API's memory."""
    from loraq.settings import Settings

    folder = work / f"load-{backend}"
    folder.mkdir()
    database = Database(backend, folder)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAQ_DATA_DIR": str(folder), "LORAQ_QUEUE_NAME": queue,
           "LORAQ_MAX_QUEUED_JOBS": str(10**9)}  # the seeded jobs and the burst are one owner's
    env.pop("LORAQ_DATABASE_URL", None)
    env.update(database.env())
    settings = Settings(data_dir=folder, database_url=database.url)
    job_ids: list[str] = []
    try:
        subprocess.run([sys.executable, "-m", "loraq.migrate"], cwd=root, env={**env, "PYTHONPATH": str(root)},
                       check=True)
        key = seed_jobs(settings, args.jobs)
        model = work / "tiny-sd"  # submissions are checked against the model's files
        if not model.exists():
            subprocess.run([sys.executable, "-m", "trainer", "tiny-model", str(model)], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.copytree(model, settings.demo_model_dir)
        api, url = start_api(root, env, folder / "api.log")
        try:
            result = {"backend": backend, "jobs": args.jobs,
                      "routes": routes_under_load(url, key, args.clients, args.load_seconds, args.rounds, api.pid)}
            dataset_id = small_dataset(url, key)
            result["burst"] = burst_submissions(url, key, settings, dataset_id, args.burst, args.burst_threads)
            job_ids = result["burst"].pop("job_ids")
            if upload_bytes:
                archive = work / "upload.zip"
                if not archive.exists():
                    big_zip(archive, upload_bytes)
                result["upload"] = upload_memory(url, key, api.pid, archive)
        finally:
            stop_process(api)
        return result
    finally:
        database.drop()
        import redis

        client = redis.Redis.from_url(settings.redis_url)
        client.delete(queue, f"_kombu.binding.{queue}", *[f"loraq:jobs:{j}:events" for j in job_ids])
        client.close()


def trainer_overhead(args: argparse.Namespace, work: Path) -> dict:
    """One job through the queue, API and worker against the trainer alone, step-event latency,
    `GET /v1/jobs` under load, and event streams beside it (SQLite, one API process)."""
    data_dir = work / "var"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORAQ_DATA_DIR": str(data_dir),
           "LORAQ_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}"}
    env.pop("LORAQ_DATABASE_URL", None)
    from loraq.migrate import upgrade
    from loraq.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=None)
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
        for _ in range(600):
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
        deadline = time.monotonic() + 600
        while client.get(f"/v1/jobs/{job['id']}").json()["state"] not in ("succeeded", "failed", "canceled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job did not finish within 600 s; see {work / 'service.log'}")
            time.sleep(0.05)
        service_wall = time.perf_counter() - started
        reader.join(timeout=30)
        state = client.get(f"/v1/jobs/{job['id']}").json()["state"]
        rps, list_latencies, errors = asyncio.run(load_jobs_list(url, dict(client.headers), args.clients,
                                                                 args.seconds))

        long_job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "base_model": "tiny-sd",
                                                 "options": {**options, "max_train_steps": 100_000}}).json()
        while client.get(f"/v1/jobs/{long_job['id']}").json()["state"] != "running":
            time.sleep(0.1)
        beside = {streams: asyncio.run(list_latency_beside_streams(url, dict(client.headers), long_job["id"],
                                                                    streams, args.stream_requests))
                  for streams in (0, args.streams)}
        client.post(f"/v1/jobs/{long_job['id']}/cancel")
    finally:
        client.close()
        for process in (worker, api):
            process.terminate()
            process.wait(timeout=30)
    return {"alone": alone, "alone_training": alone_training, "service_wall": service_wall, "state": state,
            "step_latencies_ms": [1000 * v for v in latencies], "list_rps": rps,
            "list_ms": [1000 * v for v in list_latencies], "list_errors": errors, "beside": beside}


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def overhead_lines(args: argparse.Namespace, r: dict) -> list[str]:
    ms, list_ms, beside = r["step_latencies_ms"], r["list_ms"], r["beside"]
    return [
        f"- Workload: tiny-sd, 8 images of 32x32, resolution 32, batch 2, {args.steps} steps, no checkpoints;"
        f" job state: {r['state']}",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| trainer alone (`python -m trainer train`, imports included), s | {r['alone']:.2f} |",
        f"| submit to succeeded through the service (warm worker), s | {r['service_wall']:.2f} |",
        f"| trainer alone, `start` to `done` event (no imports, no model load), s | {r['alone_training']:.2f} |",
        f"| service / trainer alone (whole command) | {r['service_wall'] / r['alone']:.2f}x |",
        f"| service overhead over training itself (`start` to `done`), s | "
        f"{r['service_wall'] - r['alone_training']:.2f} |",
        f"| step event latency, trainer line to SSE client, p50 ms ({len(ms)} events) | "
        f"{statistics.median(ms) if ms else float('nan'):.1f} |",
        f"| step event latency, p99 ms | {percentile(ms, 99) if ms else float('nan'):.1f} |",
        f"| `GET /v1/jobs` (2 jobs stored) at {args.clients} concurrent clients (httpx), requests/s | "
        f"{r['list_rps']} |",
        f"| `GET /v1/jobs` latency p50 / p99, ms | {statistics.median(list_ms):.1f} / {percentile(list_ms, 99):.1f} |",
        f"| `GET /v1/jobs` non-200 responses | {r['list_errors']} |",
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
    ]


def load_lines(args: argparse.Namespace, loads: list[dict], skipped: dict[str, str], generator: str) -> list[str]:
    lines = [
        "",
        "### The API under load",
        "",
        f"- Workload: {args.jobs} stored jobs of one owner on a fresh database (the newest {RUNNING_ON_PAGE} running"
        f" with {METRICS_PER_RUNNING_JOB} metric rows each, so their ETA is computed; the rest queued, the worst"
        " case for queue positions), requests made with that owner's key",
        f"- Load: {generator}, {args.clients} connections, {args.load_seconds:g} s per route, the three routes in"
        f" turn, {args.rounds} round(s), each route's best round shown; one uvicorn process"
        " (`LORAQ_API_WORKERS=1`); the load generator shares the machine's cores with the server",
        "- Floor: `GET /livez`, a route that does nothing (no authentication, no database), is what FastAPI and"
        " uvicorn cost per request here; `GET /v1/whoami` adds authentication alone; the target is"
        " `GET /v1/jobs` at 0.5x or more of `GET /v1/whoami`",
        "",
    ]
    if not loads:
        return lines + [f"Not measured: {'; '.join(skipped.values())}."]
    header = "| route | " + " | ".join(f"{r['backend']}: requests/s | p50 / p99, ms | server CPU, ms/request"
                                     for r in loads) + " |"
    lines += [header, "| --- |" + " ---: | ---: | ---: |" * len(loads)]
    for label, path, _ in LOAD_ROUTES:
        cells = [f"{_fmt(r['routes'][path]['rps'])} | {_fmt(r['routes'][path]['p50'])} / "
                 f"{_fmt(r['routes'][path]['p99'])} | {r['routes'][path].get('cpu_ms', float('nan')):.2f}"
                 for r in loads]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratio = {path: [r["routes"][path]["rps"] for r in loads] for _, path, _ in LOAD_ROUTES}
    whoami, jobs, livez = ratio["/v1/whoami"], ratio["/v1/jobs?limit=50"], ratio["/livez"]
    lines += [
        "| `GET /v1/jobs` / `GET /v1/whoami` (target: 0.5x or more) | "
        + " | ".join(f"**{j / w:.2f}x** | | " for j, w in zip(jobs, whoami)) + " |",
        "| `GET /v1/whoami` / `GET /livez` (what authentication leaves of the floor) | "
        + " | ".join(f"{w / f:.2f}x | | " for w, f in zip(whoami, livez)) + " |",
        "| failed requests (non-2xx, socket errors), all rounds | "
        + " | ".join(f"{sum(r['routes'][p]['errors_total'] for _, p, _ in LOAD_ROUTES)} | | " for r in loads) + " |",
    ]
    b = [r["burst"] for r in loads]
    lines += [
        f"| burst: {b[0]['submissions']} submissions, each sent twice with its Idempotency-Key, from"
        f" {b[0]['threads']} threads: requests/s | " + " | ".join(f"{x['rps']:.0f} | | " for x in b) + " |",
        "| burst: created (201) / replayed (200) / failed | "
        + " | ".join(f"{x['created']} / {x['replayed']} / {x['failed']} | | " for x in b) + " |",
        "| burst: jobs stored / lost / stored twice / answers naming another job | "
        + " | ".join(f"{x['stored']} / **{x['lost']}** / **{x['twice']}** / {x['answers_disagree']} | | " for x in b)
        + " |",
    ]
    for r in loads:
        if "upload" in r:
            u = r["upload"]
            lines += [
                "",
                f"Upload ({r['backend']}, the same API process afterwards): a {u['bytes'] / 2**30:.2f} GiB zip of"
                f" {u['images'] or '?'} JPEG photos (1024x768) and captions, streamed in one `POST /v1/datasets`:"
                f" answered {u['status']} in {u['seconds']:.1f} s; the API's resident memory went from"
                f" {u['baseline'] / 2**20:.0f} MiB to a peak of {u['peak'] / 2**20:.0f} MiB (sampled every 10 ms):"
                f" **{u['growth'] / 2**20:.1f} MiB** of growth (target: under 100 MB).",
            ]
    for backend, why in skipped.items():
        lines.append(f"\n{backend} not measured: {why}.")
    return lines


QUICK = {"steps": 4, "clients": 8, "seconds": 1.0, "streams": 5, "stream_requests": 5, "jobs": 200,
         "load_seconds": 1.0, "rounds": 1, "burst": 20, "burst_threads": 4, "upload_mb": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections under load")
    parser.add_argument("--seconds", type=float, default=10.0, help="load on GET /v1/jobs beside a finished job")
    parser.add_argument("--streams", type=int, default=100, help="open event streams beside GET /v1/jobs")
    parser.add_argument("--stream-requests", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=10_000, help="stored jobs for the load part")
    parser.add_argument("--load-seconds", type=float, default=8.0, help="per route and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burst", type=int, default=1000, help="submissions in the burst")
    parser.add_argument("--burst-threads", type=int, default=50)
    parser.add_argument("--upload-mb", type=int, default=1024, help="size of the upload (MiB; 0: none)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--parts", default="overhead,load", help="overhead, load or both")
    parser.add_argument("--server-root", default=str(ROOT), help="the code the load part serves (a before/after)")
    parser.add_argument("--quick", action="store_true", help="tiny counts, seconds: checks the benchmark runs")
    parser.add_argument("--json", help="also write the figures here as JSON")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    work = Path(tempfile.mkdtemp(prefix="loraq-bench-"))
    overhead = trainer_overhead(args, work) if "overhead" in parts else None
    loads, skipped = [], {}
    generator, _ = load_generator()
    if "load" in parts:
        upload_bytes = args.upload_mb * 2**20
        for backend in args.backends.split(","):
            why = postgres_available() if backend == "postgresql" else None
            if why:
                skipped[backend] = why
                continue
            loads.append(api_load(backend, args, work, Path(args.server_root), upload_bytes))
            upload_bytes = 0  # once is enough: it does not depend on the database
    shutil.rmtree(work, ignore_errors=True)

    lines = [
        "## Service: queue, API and worker on top of the trainer",
        "",
        f"- Command: `{'make bench' if argv is None and not args.quick else 'python -m bench.service ' + ' '.join(argv or sys.argv[1:])}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), local Redis;"
        " the first table: SQLite, one warm worker, uvicorn with one process; load average at the end"
        f" {' / '.join(f'{v:.1f}' for v in os.getloadavg())} (1 / 5 / 15 min: other work on the machine)",
    ]
    if overhead:
        lines += overhead_lines(args, overhead)
    if "load" in parts:
        lines += load_lines(args, loads, skipped, generator)
    section = "\n".join(lines)
    if not (args.quick or args.no_write):
        replace_section(Path(args.output), SECTION, section)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": overhead, "loads": loads, "skipped": skipped,
                                               "generator": generator}, default=str))
    ok = overhead is None or (overhead["state"] == "succeeded" and overhead["list_errors"] == 0)
    ok = ok and all(r["burst"]["lost"] == r["burst"]["twice"] == r["burst"]["failed"] == 0 for r in loads)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
