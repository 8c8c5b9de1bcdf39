"""The real service of tests/e2e (uvicorn API + Celery worker), re-exported for the fault tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("loraq_faults_e2e_conftest", ROOT / "tests" / "e2e" / "conftest.py")
_e2e = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _e2e  # dataclasses look their module up
_spec.loader.exec_module(_e2e)

service = _e2e.service  # the fixtures themselves, unchanged
start_service = _e2e.start_service
