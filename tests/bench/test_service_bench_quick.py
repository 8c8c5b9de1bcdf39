"""`make bench`'s service benchmark, run once in its quick mode (tiny counts, seconds): it runs
end to end and every figure it reports is there and sane. No timing is asserted here; the
figures themselves belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROUTES = ("/livez", "/v1/whoami", "/v1/jobs?limit=50")


def test_service_benchmark_quick_mode(tmp_path):
    out, section = tmp_path / "figures.json", tmp_path / "BENCHMARKS.md"
    result = subprocess.run([sys.executable, "-m", "bench.service", "--quick", "--json", str(out),
                             "--output", str(section)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not section.exists()  # quick mode never writes the benchmarks file
    figures = json.loads(out.read_text())

    overhead = figures["overhead"]
    assert overhead["state"] == "succeeded" and overhead["list_errors"] == 0
    assert overhead["alone"] > 0 and overhead["service_wall"] > 0 and overhead["step_latencies_ms"]

    backends = {load["backend"] for load in figures["loads"]}
    assert "sqlite" in backends and backends | set(figures["skipped"]) == {"sqlite", "postgresql"}
    for load in figures["loads"]:
        for route in ROUTES:
            measured = load["routes"][route]
            assert measured["rps"] > 0 and measured["requests"] > 0, (load["backend"], route, measured)
            assert 0 < measured["p50"] <= measured["p99"] and measured["errors_total"] == 0, measured
        burst = load["burst"]
        assert burst["created"] == burst["stored"] == burst["submissions"] > 0, burst
        assert burst["replayed"] == burst["submissions"] and burst["failed"] == 0, burst
        assert burst["lost"] == burst["twice"] == burst["answers_disagree"] == 0, burst
    uploads = [load["upload"] for load in figures["loads"] if "upload" in load]
    assert len(uploads) == 1 and uploads[0]["status"] == 201 and uploads[0]["images"] > 0, uploads
    assert uploads[0]["peak"] >= uploads[0]["baseline"] > 0
    for line in ("### The API under load", "`GET /v1/jobs` / `GET /v1/whoami`", "burst:", "Upload ("):
        assert line in result.stdout
