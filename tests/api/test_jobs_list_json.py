"""The jobs page's hand-written item JSON equals JobOut's own (pydantic) JSON, field for field."""

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from api.services.jobs import _listed_job_json, _listed_job_json_pydantic

BASE = dict(id="j1", name="a run", state="queued", step=0, total_steps=100, last_loss=None, dataset_id="d1",
            base_model="tiny-sd", queued_at=datetime(2026, 12, 2, 18, 0, 0, 123456), started_at=None,
            finished_at=None, error=None, attempt=1, worker=None, priority=0, num_gpus=1, gpu_class=None,
            min_gpu_memory_gb=None, config_json='{"learning_rate": 0.0001, "seed": 0}')


@pytest.mark.parametrize("changes, position, speed", [
    ({}, 7, (None, None)),
    ({"name": None, "queued_at": datetime(2026, 1, 1)}, 1, (None, None)),  # no microseconds
    ({"state": "running", "step": 33, "last_loss": 0.123456789, "worker": "w-1",
      "started_at": datetime(2026, 12, 2, 19, 0, tzinfo=timezone(timedelta(hours=2))),  # not UTC
      "queued_at": datetime(2026, 12, 2, 17, 0, 1, 5, tzinfo=timezone.utc)}, None, (12.5, 41.25)),
    ({"state": "succeeded", "step": 90, "finished_at": datetime(2026, 12, 3), "last_loss": float("nan")},
     None, (None, None)),
    ({"state": "failed", "error": 'bad "thing"\n\u00e9\u4e2d\U0001f600', "name": "\u00e9\\x", "total_steps": 0,
      "gpu_class": "a100", "min_gpu_memory_gb": 40.0, "priority": -3, "num_gpus": 4, "attempt": 3},
     None, (float("inf"), None)),
    ({"step": 250, "total_steps": 200, "last_loss": 1e-30, "min_gpu_memory_gb": 1e20}, 10_000, (None, None)),
])
def test_listed_item_json_equals_jobout_json(changes, position, speed):
    row = SimpleNamespace(**{**BASE, **changes})
    fast = json.loads(_listed_job_json(row, position, speed))
    reference = json.loads(_listed_job_json_pydantic(row, position, speed))
    assert fast == reference
