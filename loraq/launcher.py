"""`make run`: the whole service on one machine — migrations, Redis, demo model, API and a worker.

Ctrl-C stops everything this started. Other workers join with `make worker` (same settings).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import redis

from loraq.migrate import upgrade
from loraq.settings import DEMO_MODELS, Settings

log = logging.getLogger("loraq.launcher")


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis(settings: Settings) -> subprocess.Popen | None:
    """Use the Redis at LORAQ_REDIS_URL; if none answers, start a local one under data_dir."""
    if redis_answers(settings.redis_url):
        return None
    server = shutil.which("redis-server")
    parsed = urlparse(settings.redis_url)
    if server is None or parsed.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(
            f"No Redis answers at {settings.redis_url}. Start one (Debian: `apt install redis-server`, "
            "then `redis-server`), or point LORAQ_REDIS_URL at yours."
        )
    folder = settings.data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [server, "--port", str(parsed.port or 6379), "--bind", "127.0.0.1", "--dir", str(folder.resolve()),
         "--appendonly", "yes", "--save", ""],
        stdout=open(folder / "redis.log", "ab"), stderr=subprocess.STDOUT,
    )
    for _ in range(50):
        if redis_answers(settings.redis_url):
            print(f"started redis-server under {folder}", flush=True)
            return process
        time.sleep(0.1)
    process.terminate()
    raise SystemExit(f"redis-server did not start; see {folder / 'redis.log'}")


def ensure_demo_files(settings: Settings) -> Path:
    """Generate the demo models (tiny-sd, tiny-sdxl, tiny-flux (dev-like), tiny-sd3) and a small
    sample dataset (a folder and a zip) on first start."""
    for name, family in DEMO_MODELS.items():
        folder = settings.demo_dir(name)
        if not (folder / "model_index.json").is_file():
            print(f"generating the demo model {name} ...", flush=True)
            subprocess.run([sys.executable, "-m", "trainer", "tiny-model", str(folder), "--family", family],
                           check=True, stdout=subprocess.DEVNULL)
    samples = settings.data_dir / "samples"
    archive = samples / "demo-dataset.zip"
    if not archive.is_file():
        folder = samples / "demo-dataset"
        subprocess.run([sys.executable, "-m", "trainer", "sample-data", str(folder), "--count", "8",
                        "--size", "64"], check=True, stdout=subprocess.DEVNULL)
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(folder.iterdir()):
                zf.write(path, path.name)
    return archive


def start(command: list[str], name: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    # A new process group, so Ctrl-C reaches it only through us, in order.
    return subprocess.Popen(command, env=env, start_new_session=True)


def stop(processes: list[tuple[str, subprocess.Popen]], grace_s: float = 30.0) -> None:
    """SIGTERM each process and wait for it, in reverse start order: the worker first, which hands
    its running job back (a checkpoint, the job queued again) within `grace_s` while the API and
    Redis it needs are still up."""
    for name, process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s + 5 if name == "worker" else 20)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop; killing it", name)
            process.kill()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings)
    processes: list[tuple[str, subprocess.Popen]] = []
    redis_process = ensure_redis(settings)
    if redis_process is not None:
        processes.append(("redis", redis_process))
    archive = ensure_demo_files(settings)
    processes.append(("api", start([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
                                    "--host", settings.host, "--port", str(settings.port),
                                    "--workers", str(settings.api_workers),  # LORAQ_API_WORKERS
                                    # open event streams would otherwise hold a shutdown until their job ends
                                    "--timeout-graceful-shutdown", "5"], "api")))
    processes.append(("worker", start([sys.executable, "-m", "worker"], "worker")))
    url = f"http://{settings.host}:{settings.port}"
    print(
        f"\nloraq is up: {url}  (dashboard: {url}/ , API docs: {url}/docs, health: {url}/healthz)\n"
        f"Every /v1 call needs the admin key the API made on its first start ({settings.data_dir / 'admin-key'}):\n"
        f"  curl -H \"Authorization: Bearer $(cat {settings.data_dir / 'admin-key'})\" -F files=@{archive} {url}/v1/datasets\n"
        f"Then POST {url}/v1/jobs with the dataset id and base_model tiny-sd (or tiny-sdxl, tiny-flux, tiny-sd3). "
        "Ctrl-C stops everything.\n",
        flush=True,
    )
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        if stopping:  # a second Ctrl-C: the worker stops at once too (its job is left to the lease)
            for name, process in processes:
                if name == "worker" and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        while not stopping:
            for name, process in processes:
                if process.poll() is not None:
                    print(f"{name} exited with code {process.returncode}; stopping", file=sys.stderr)
                    stopping, code = True, 1
            time.sleep(0.5)
    finally:
        print(f"stopping ... (the worker hands its job back within {settings.shutdown_grace_s:g} s; "
              "Ctrl-C again stops it at once)", flush=True)
        stop(processes, settings.shutdown_grace_s)
    return code


if __name__ == "__main__":
    sys.exit(main())
