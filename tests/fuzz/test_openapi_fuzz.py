"""Property-based fuzzing of the API against its own OpenAPI schema (schemathesis + hypothesis).

Every operation in /openapi.json gets a bounded number of generated requests, valid and invalid
(positive and negative generation), sent to the real app (create_app on the per-test database and
the real Redis, no mocks). Every answer must be a non-5xx and match the schema: a documented
status code, content type, headers and body. Half of the requests to id-taking routes use real ids
(a seeded dataset and job), so the routes behind the 404 are reached too. Most requests carry the
first admin key; some carry none or an unknown key, which must get a documented 401.

Runs through schemathesis' own ASGI transport, driven by hypothesis inside one test function: its
pytest integration (`schema.parametrize`) loads the schema at import time, which cannot use the
per-test `settings` fixture. Deterministic: derandomized, no example database.

Nothing is excluded. GET /v1/jobs/{id}/events streams until its job is final: the seeded job is
canceled (final) and reads run before the POSTs that could queue it again (retry) or queue new
jobs, and every call is cut after CALL_TIMEOUT_S regardless. Multipart uploads are fuzzed with the
same bound as everything else.
"""

from __future__ import annotations

import io
import zipfile

import redis
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

MAX_EXAMPLES = 25  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
CALL_TIMEOUT_S = 10  # an event stream of a job that is not final never ends: cut it here


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, "PNG")
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
            archive.writestr(f"{name}.png", _png(color))
            archive.writestr(f"{name}.txt", f"a {name} square")
    return buffer.getvalue()


def _seed(client) -> dict[str, str]:
    """One dataset and one final (canceled) job with a stored event, through the API itself."""
    response = client.post("/v1/datasets", files={"files": ("data.zip", _zip(), "application/zip")})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                             "options": {"resolution": 32, "max_train_steps": 2}})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "canceled", response.text
    return {"dataset_id": dataset_id, "job_id": job_id}


def _fuzz(operation, mode: GenerationMode, real_ids: dict[str, str], admin_key: str) -> None:
    path_names = {p.name for p in operation.path_parameters}
    strategy = operation.as_strategy(generation_mode=mode)

    # Mostly the admin key (to reach the routes behind it); sometimes none or an unknown one (401).
    keys = st.sampled_from([admin_key, admin_key, admin_key, None, "lq_not-a-key"])

    @hypothesis_settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=strategy, use_real=st.booleans(), key=keys)
    def run(case, use_real, key):
        if use_real:
            for name, value in real_ids.items():
                if name in path_names:
                    case.path_parameters[name] = value
            if "n" in path_names and mode == GenerationMode.POSITIVE:
                case.path_parameters["n"] = 0
            if operation.label == "POST /v1/jobs" and isinstance(case.body, dict):
                case.body["dataset_id"] = real_ids["dataset_id"]
                if mode == GenerationMode.POSITIVE:
                    case.body["base_model"] = "tiny-sd"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = case.call(timeout=CALL_TIMEOUT_S, headers=headers)
        case.validate_response(response, checks=CHECKS)

    run()


def _can_be_invalid(operation) -> bool:
    """False when every input is a plain string in the path: no invalid request exists to send."""
    if len(operation.query) or len(operation.headers) or len(list(operation.body)):
        return True
    return any({k: v for k, v in p.definition.get("schema", {}).items() if k != "title"} != {"type": "string"}
               for p in operation.path_parameters)


def test_openapi_fuzz(settings):
    from api.main import create_app
    from loraq.events import stream_key
    from loraq.models import Job

    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    try:
        admin_key = (settings.data_dir / "admin-key").read_text().strip()
        auth = {"Authorization": f"Bearer {admin_key}"}
        with asgi.get_client(app) as client:
            client.headers.update(auth)
            real_ids = _seed(client)
        failures = []
        # Reads first, deletes last (jobs before datasets), so the seeded ids live as long as possible.
        order = {"GET": 0, "POST": 1, "DELETE": 2}
        operations = sorted((result.ok() for result in schema.get_all_operations()),
                            key=lambda op: (order.get(op.method.upper(), 1), "/datasets" in op.path))
        assert len(operations) >= 15
        for operation in operations:
            if operation.method.upper() == "DELETE":
                # a fuzzed retry may have queued the seeded job again: final again, so it can go
                with asgi.get_client(app) as client:
                    client.post(f"/v1/jobs/{real_ids['job_id']}/cancel", headers=auth)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode == GenerationMode.NEGATIVE and not _can_be_invalid(operation):
                    continue
                try:
                    _fuzz(operation, mode, real_ids, admin_key)
                except (Exception, FailureGroup) as error:  # noqa: BLE001 - gathered, reported together below
                    failures.append(f"{operation.label} [{mode.value}]: {type(error).__name__}: {error}")
        assert not failures, "\n\n".join(failures)
    finally:
        with app.state.session_factory() as session:
            job_ids = list(session.scalars(select(Job.id)))
        asgi.shutdown_lifespans()
        keys = [settings.queue_name, f"_kombu.binding.{settings.queue_name}"]
        keys += [key for job_id in job_ids for key in (stream_key(job_id), f"loraq:jobs:{job_id}:cancel")]
        redis.Redis.from_url(settings.redis_url).delete(*keys)
