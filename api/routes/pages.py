"""The browser dashboard: one HTML shell for every page, its scripts and styles, and the chart
library from node_modules (installed by `make` with `npm ci`, never copied into the repository).

The pages are public; the data they show comes from /v1 with the API key the browser keeps.
None of this is in the OpenAPI schema: it is not part of the API.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api.services.jobs import SERVICE_DEFAULTS, SERVICE_FIELDS
from loraq.errors import NotFound
from trainer.config import ConfigError, config_model

log = logging.getLogger("loraq.api.pages")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "api" / "dashboard"
UPLOT_DIR = ROOT / "node_modules" / "uplot" / "dist"
# The shell is small and changes with the scripts: always revalidated, never served stale.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _shell() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/")
@router.get("/jobs")
@router.get("/jobs/new")
@router.get("/datasets")
@router.get("/workers")
@router.get("/key")
def page() -> FileResponse:
    """Every page is the same shell; the script draws the page its path names."""
    return _shell()


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return _shell()


@router.get("/dashboard/options.json")
def training_options(family: str = "sd") -> dict:
    """A family's option schema as a submission sees it: without the options the service sets (and
    the family, which the base model decides), with the service's defaults. The form is built from
    it, so it never drifts from the trainer and offers only the chosen model's family's options."""
    try:
        schema = config_model(family).model_json_schema()
    except ConfigError as error:
        raise NotFound(str(error)) from None
    properties = {name: spec for name, spec in schema["properties"].items()
                  if name not in SERVICE_FIELDS and name != "family"}
    for name, default in SERVICE_DEFAULTS.items():
        if name in properties:
            properties[name] = {**properties[name], "default": default}
    return {"family": family, "description": schema.get("description", ""), "properties": properties,
            "required": [n for n in schema.get("required", []) if n in properties]}


def mount_static(app: FastAPI) -> None:
    """/static: the dashboard's files; /vendor/uplot: uPlot's dist folder from node_modules."""
    if not UPLOT_DIR.is_dir():
        log.warning("dashboard.uplot_missing %s: run `make setup` (npm ci); charts stay empty", UPLOT_DIR)
    app.mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
    app.mount("/vendor/uplot", StaticFiles(directory=UPLOT_DIR, check_dir=False), name="uplot")
