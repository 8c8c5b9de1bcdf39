"""The dashboard's files as the API serves them, and its pure helpers under Node's test runner.
No browser and no running service: these take a second."""

from __future__ import annotations

import re
import subprocess

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.services.jobs import SERVICE_DEFAULTS, SERVICE_FIELDS
from loraq.settings import Settings
from support.service import ROOT
from trainer.config import TrainConfig

DASHBOARD = ROOT / "api" / "dashboard"
IMPORT = re.compile(r"""(?:from|import)\s*\(?\s*['"]([^'"]+)['"]""")


@pytest.fixture
def client(tmp_path):
    # Page routes need none of the lifespan's clients, so the app is not started.
    return TestClient(create_app(Settings(data_dir=tmp_path)))


@pytest.mark.parametrize("path", ["/", "/jobs", "/jobs/new", "/jobs/0123abcd", "/datasets", "/workers", "/key"])
def test_every_page_is_the_shell(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="/static/app.js">' in response.text


def test_scripts_styles_and_the_chart_library_are_served(client):
    assert client.get("/static/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    uplot = client.get("/vendor/uplot/uPlot.esm.js")
    assert uplot.status_code == 200, "node_modules/uplot is missing: run `make setup` (npm ci)"
    assert "export { uPlot as default }" in uplot.text
    assert client.get("/vendor/uplot/uPlot.min.css").status_code == 200
    assert client.get("/static/../routes/pages.py").status_code == 404


def test_every_module_a_script_imports_is_served(client):
    for script in DASHBOARD.rglob("*.js"):
        for target in IMPORT.findall(script.read_text()):
            url = target if target.startswith("/") else \
                "/static/" + (script.parent / target).resolve().relative_to(DASHBOARD).as_posix()
            assert client.get(url).status_code == 200, f"{script.name} imports {target} ({url})"


def test_options_schema_is_the_trainers_less_what_the_service_sets(client):
    properties = client.get("/dashboard/options.json").json()["properties"]
    # ... and less the family, which the chosen base model decides (per family: tests/api/test_models_api.py)
    assert set(properties) == set(TrainConfig.model_fields) - SERVICE_FIELDS - {"family"}
    for name, default in SERVICE_DEFAULTS.items():
        assert properties[name]["default"] == default
    assert properties["resolution"]["default"] == 512


def test_pages_are_not_part_of_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    pages = {"/", "/jobs", "/jobs/new", "/jobs/{job_id}", "/datasets", "/workers", "/key", "/dashboard/options.json"}
    assert not pages & set(paths)


def test_sse_parser_and_message_split_under_node():
    result = subprocess.run(["node", "--test", str(ROOT / "tests" / "dashboard" / "units.test.mjs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
