"""Settings and fixtures for the whole suite, applied before any test module imports torch.

Service tests run against both databases: each gets a fresh, migrated SQLite file or PostgreSQL
database (copied from a template migrated once per session), its own data folder and its own
Celery queue on the real Redis.
"""

import os
import shutil
import uuid
from pathlib import Path

import pytest

# The tiny models run fastest on one thread; more threads only fight over this machine's 2 cores
# (a run of 80 steps took 96 s with the default threads beside other work, 12 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

PG_ADMIN_URL = os.environ.get("LORAQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LORAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD pipeline (32 px default), written once per session; treat it as read-only."""
    from trainer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline (32 px default), written once per session; treat it as read-only.
    The settings fixture does not copy it: a test that trains on `tiny-sdxl` copies it into
    data_dir/models/tiny-sdxl (see tests/e2e/test_sdxl_service.py)."""
    from trainer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-sdxl-model"), family="sdxl")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory) -> Path:
    """A tiny random Flux.1-dev-shaped pipeline (trainer/tiny_flow.py), once per session; read-only.
    Not copied by the settings fixture: a test on `tiny-flux` copies it to data_dir/models/tiny-flux."""
    from trainer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-flux-model"), family="flux")


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory) -> Path:
    """A tiny random SD3-shaped pipeline, once per session; read-only (copy it to use as `tiny-sd3`)."""
    from trainer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-sd3-model"), family="sd3")


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True)


def _sqlalchemy_pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    from loraq.migrate import upgrade
    from loraq.settings import Settings

    folder = tmp_path_factory.mktemp("sqlite-template")
    upgrade(Settings(data_dir=folder))
    return folder / "loraq.db"


@pytest.fixture(scope="session")
def pg_template():
    from loraq.migrate import upgrade
    from loraq.settings import Settings

    name = f"loraq_tpl_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    upgrade(Settings(database_url=_sqlalchemy_pg_url(name)))
    yield name
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def settings(backend, request, tmp_path, tiny_model):
    """Service settings on a fresh migrated database, with the demo model in its data folder."""
    from loraq.settings import Settings

    data_dir = tmp_path / "var"
    (data_dir / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, data_dir / "models" / "tiny-sd")
    database_url = None
    if backend == "sqlite":
        shutil.copy(request.getfixturevalue("sqlite_template"), data_dir / "loraq.db")
    else:
        template = request.getfixturevalue("pg_template")
        name = f"loraq_t_{uuid.uuid4().hex[:12]}"
        with _pg_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        database_url = _sqlalchemy_pg_url(name)

        def drop():
            with _pg_admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        request.addfinalizer(drop)
    return Settings(data_dir=data_dir, database_url=database_url, redis_url=REDIS_URL,
                    queue_name=f"train-test-{uuid.uuid4().hex[:8]}", lease_s=30, heartbeat_s=1)


@pytest.fixture
def start_service(tmp_path):
    """start_service(settings, python=None) -> the API on a free port and one worker
    (`worker-1.log`), up and answering; everything it started is stopped after the test."""
    import sys

    from support.service import launch, shut_down

    started = []

    def start(settings, python: str | None = None):
        started.append(launch(settings, tmp_path / f"logs-{len(started)}", python or sys.executable))
        return started[-1]

    yield start
    for running in started:
        shut_down(running)


@pytest.fixture
def service(settings, start_service):
    """The API and one worker on the test's settings."""
    return start_service(settings)
